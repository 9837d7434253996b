"""Per-position step graphs of the AR fast engine (fractal_models/engine/graphs.py, issue #28 item 4).

On a CPU the graph is :class:`graphs._Recorder` (capture runs the step and keeps it, replay runs it again into the
same output), so the plumbing runs as on a GPU: static caches and buffers, one capture per (rows, position) kept
across sample() calls, re-capture on a new key, release, the autocast weight casts, the fallbacks. Images must be
bitwise equal with and without graphs in fp32. The real CUDA capture runs only where there is a GPU (last test).
"""
import copy
import pickle

import pytest
import torch

from fractal_models import generate
from fractal_models.engine import ar as engine_ar
from fractal_models.engine import graphs
from fractal_models.engine.paths import describe, level_paths
from tests.models.test_kernel_backends import model_for

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(graphs, "_OFF_CUDA", graphs._Recorder)


def _ar_levels(model):
    return model.levels()[:-1]


def _level_call(level, rows, guided, seed=0, **kw):
    """One engine sample() call with fixed patches fed back: (per-step outputs' clones, their data_ptrs, image)."""
    g = torch.Generator().manual_seed(seed)
    cond = [torch.randn(rows, level.cond_emb.in_features, generator=g).to(level.cond_emb.weight.device)]
    dim = 3 * level.patch_size ** 2
    patches = torch.randn(level.seq_len, rows // 2 if guided else rows, dim, generator=g).to(cond[0].device)
    seen, ptrs = [], []

    def next_level(cond_list, cfg, temperature, filter_threshold):
        seen.append(cond_list[0].clone())
        ptrs.append(cond_list[0].data_ptr())
        return patches[len(seen) - 1]

    with torch.no_grad():
        img = engine_ar.sample(level, cond, 2.0 if guided else 1.0, "linear", 1.0, 0.0, next_level, **kw)
    return torch.stack(seen), ptrs, img


def test_images_bitwise_equal_one_capture_per_position(recorder):
    model, _ = model_for("tiny_ar", "torch")
    labels = torch.tensor([3, 7])
    run = lambda: generate(model, labels, cfg=2.0, seed=0, backend=None)  # noqa: E731
    eager = run()
    for m in _ar_levels(model):
        m.step_graphs = True
    first = run()
    states = [graphs.info(m) for m in _ar_levels(model)]
    second = run()
    assert torch.equal(first, eager) and torch.equal(second, eager)
    top, low = _ar_levels(model)
    # level 0: one call per generate; level 1: one call per level-0 step (16) -- captured once, then replayed
    for m, calls, before in ((top, 1, states[0]), (low, top.seq_len, states[1])):
        st = graphs.info(m)
        assert st["rows"] == 4 and st["positions"] == list(range(m.seq_len)) and st["failed"] is None
        assert st["captures"] == m.seq_len and before["captures"] == m.seq_len  # none in the second generate
        assert st["replays"] == 2 * calls * m.seq_len
        assert st["input_ptrs"] == before["input_ptrs"] and len(st["input_ptrs"]) == 1
        assert st["kv_ptrs"] == before["kv_ptrs"]
        assert all(b.attention.kv_cache is None for b in m.blocks)  # detached after sample(), kept on the state
    for m in _ar_levels(model):
        assert m.release_step_graphs() and graphs.info(m) is None and not m.release_step_graphs()
    assert torch.equal(run(), eager)  # captured again after the release


def test_static_buffers_reused_and_recaptured_on_new_shape(recorder):
    model, _ = model_for("tiny_ar", "torch")
    level = _ar_levels(model)[1]
    want, _, img = _level_call(level, 4, True)
    got, ptrs, img_g = _level_call(level, 4, True, step_graphs=True)
    got2, ptrs2, _ = _level_call(level, 4, True, step_graphs=True)
    assert torch.equal(got, want) and torch.equal(got2, want) and torch.equal(img_g, img)
    assert ptrs2 == ptrs  # each position's static output, the same storage in every call
    st = graphs.info(level)
    assert st["captures"] == level.seq_len and st["replays"] == 2 * level.seq_len
    # unguided, 3 rows: a new key -> the old graphs go, one capture per position again
    want3, _, _ = _level_call(level, 3, False, seed=1)
    got3, _, _ = _level_call(level, 3, False, seed=1, step_graphs=True)
    assert torch.equal(got3, want3)
    st = graphs.info(level)
    assert st["rows"] == 3 and st["captures"] == level.seq_len
    # a parameter changed in place (a new version): captured again, and still equal to eager
    with torch.no_grad():
        level.blocks[0].attention.wo.weight.mul_(1.5)
    want4, _, _ = _level_call(level, 3, False, seed=1)
    got4, _, _ = _level_call(level, 3, False, seed=1, step_graphs=True)
    assert torch.equal(got4, want4) and graphs.info(level)["captures"] == level.seq_len
    # a copy of the module does not carry graphs or caches
    twin = copy.deepcopy(level)
    assert graphs.info(twin) is None and graphs._ATTR in level.__dict__
    assert graphs.info(pickle.loads(pickle.dumps(level))) is None
    assert level.release_step_graphs()


def test_autocast_casts_once_and_matches_eager(recorder):
    model, _ = model_for("tiny_ar", "torch")
    level = _ar_levels(model)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _, img = _level_call(level, 4, True)
        got, _, img_g = _level_call(level, 4, True, step_graphs=True)
    assert got.dtype == want.dtype and torch.equal(got, want) and torch.equal(img_g, img)
    st = level.__dict__[graphs._ATTR]
    assert st.amp == torch.bfloat16 and len(st.casts) == 5 * len(level.blocks)  # wqkv, wo, w1, w2, w3
    assert all(isinstance(p, torch.nn.Parameter) for b in level.blocks for p in b.parameters())  # swapped back
    with torch.no_grad():  # changed in place: the casts are stale, so a new key casts and captures again
        level.blocks[-1].feed_forward.w2.weight.mul_(0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _, _ = _level_call(level, 4, True)
        got, _, _ = _level_call(level, 4, True, step_graphs=True)
    assert torch.equal(got, want) and level.__dict__[graphs._ATTR] is not st
    with torch.no_grad():  # no autocast: another key (fp32 weights, no casts)
        _level_call(level, 4, True, step_graphs=True)
    assert level.__dict__[graphs._ATTR].amp is None and not level.__dict__[graphs._ATTR].casts
    level.release_step_graphs()


def test_cpu_without_graphs_runs_eagerly_and_says_why():
    model, _ = model_for("tiny_ar", "torch")
    level = _ar_levels(model)[1]
    assert level.step_graphs is False
    assert graphs.explain_step_graphs(level, CPU) == (False, "step_graphs off (the default): eager launches")
    level.step_graphs = True
    assert graphs.explain_step_graphs(level, CPU) == (False, "CPU: CUDA graphs need a CUDA device")
    want, _, _ = _level_call(level, 4, True, step_graphs=False)
    got, _, _ = _level_call(level, 4, True)  # step_graphs=True on a CPU: eager, no error
    assert torch.equal(got, want) and graphs.info(level) is None
    assert "visualize" in graphs.explain_step_graphs(level, torch.device("cuda"), visualize=print)[1]
    level.train()
    assert graphs.explain_step_graphs(level, torch.device("cuda")) == (False, "train mode: eager")
    level.eval()
    ok, why = graphs.explain_step_graphs(level, torch.device("cuda"))
    assert ok and "CUDA graph per position" in why
    rows = level_paths(model, torch.device("cuda"), policy_only=True)
    assert rows[1]["step_graphs"] is True and rows[0]["step_graphs"] is False and "step_graphs" not in rows[-1]
    assert "step graphs: step_graphs=True" in describe(rows)[1]
    level.fused_stack = True  # the fused stack comes first: one launch per step already
    rows = level_paths(model, torch.device("cuda"), "triton", policy_only=True)
    assert rows[1]["path"] == "fused" and rows[1]["step_graphs"] is False and "fused" in rows[1]["step_graphs_why"]


def test_capture_failure_falls_back_to_eager(recorder, monkeypatch):
    model, _ = model_for("tiny_ar", "torch")
    level = _ar_levels(model)[1]
    want, _, _ = _level_call(level, 4, True)

    def refuse(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs._Recorder, "capture", refuse)
    with pytest.warns(UserWarning, match="capture at position 0 failed"):
        got, _, _ = _level_call(level, 4, True, step_graphs=True)
    assert torch.equal(got, want)
    ok, why = graphs.explain_step_graphs(level, CPU, enabled=True)
    assert not ok and "capture failed (RuntimeError" in why
    assert graphs.begin(level, 4, CPU, level.freqs_cis, engine_ar._blocks_step, True) is None
    assert level.release_step_graphs() and graphs.explain_step_graphs(level, CPU, enabled=True)[0]


def test_kernel_path_through_the_interpreter(recorder):
    """The decode-kernel path (Triton interpreter on a CPU): its lazily made cache slots live on the static caches."""
    model, _ = model_for("tiny_ar", "triton")
    level = _ar_levels(model)[1]
    want, _, _ = _level_call(level, 2, True)
    got, _, _ = _level_call(level, 2, True, step_graphs=True)
    got2, _, _ = _level_call(level, 2, True, step_graphs=True)
    assert torch.equal(got, want) and torch.equal(got2, want)
    st = level.__dict__[graphs._ATTR]
    assert all(c.slots is not None for c in st.caches) and st.captures == level.seq_len
    level.release_step_graphs()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_graphs_equal_eager(backend):
    """The real capture (GPU only): fp32 images equal with and without step graphs; one capture per position."""
    model, _ = model_for("tiny_ar", backend)
    model = model.cuda()
    labels = torch.tensor([3, 7], device="cuda")
    run = lambda: generate(model, labels, cfg=2.0, seed=0, backend=None, precision="fp32")  # noqa: E731
    eager = run()
    for m in _ar_levels(model):
        m.step_graphs = True
    assert torch.equal(run(), eager) and torch.equal(run(), eager)
    for m in _ar_levels(model):
        st = graphs.info(m)
        assert st["failed"] is None and st["captures"] == m.seq_len, st
        m.release_step_graphs()


def test_graphs_replay_the_skinny_linear_step(recorder):
    """The graphed step is the step dispatch picks: with ``skinny_linears`` the skinny-linear step (triton
    interpreter here), equal outputs with and without graphs, and the graphs keyed on that step function."""
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[1]
    level.skinny_linears = True
    try:
        eager = _level_call(level, 4, True)
        level.step_graphs = True
        graphed = _level_call(level, 4, True)
        assert graphs.info(level)["captures"] == level.seq_len
        assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[2], eager[2])
    finally:
        level.release_step_graphs()
        level.step_graphs = False
        level.__dict__.pop("skinny_linears", None)


def test_level_paths_say_the_pixel_heads_schedule_rule():
    """``fractalgen info``'s pixel-head row names the Triton schedule rule for the GPU (the crossover data's
    rows for this width, or the tile kernel without data / without a GPU arch)."""
    from fractal_kernels import policy
    from fractal_kernels._target import target_arch
    model, _ = model_for("tiny_ar", "torch")
    with target_arch(90):
        rows = level_paths(model, torch.device("cuda"), "triton", policy_only=True)
    assert rows[-1]["path"] == "pixel_head" and "Triton schedule:" in rows[-1]["why"]
    width = rows[-1]["width"]
    have = ("pixel_head_phases", "float32", "sm_90", str(width)) in policy.block_stack_table()
    assert ("phases at rows in" in rows[-1]["why"]) == have
    assert "no GPU arch" in level_paths(model, CPU)[-1]["why"]
