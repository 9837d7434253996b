"""benchmarks.launches: the launch/sync classification on small known programs, the reductions that make the
published-config counts exact (narrow clones, memoised sub-level calls, count-only kernels) and the tiny-config
rows of the fast engine (host syncs, launch ratio)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from benchmarks.launches import (NON_LAUNCHING, count_generate, counting, narrow_clone, roofline, floors,
                                 predict_s_per_image)
from fractal_kernels import dispatch, policy
from fractal_models import build_model


def counts(fn):
    with torch.no_grad(), counting() as st:
        fn()
    c = st.counts
    kinds = {k: n for (_, k), n in c.launches.items()}
    syncs = {k: n for (_, k), n in c.syncs.items()}
    return sum(c.launches.values()), sum(c.syncs.values()), kinds, syncs


x = torch.randn(2, 5, 16)
w = torch.randn(32, 16)
b = torch.randn(32)


@pytest.mark.parametrize("name, fn, launches, syncs", [
    ("linear 3-D -> view, t, addmm, view", lambda: F.linear(x, w, b), 1, 0),
    ("linear 2-D -> t, addmm", lambda: F.linear(x[0], w, b), 1, 0),
    ("layer_norm -> native_layer_norm", lambda: F.layer_norm(x, (16,)), 1, 0),
    ("rms_norm -> _fused_rms_norm on CUDA", lambda: F.rms_norm(x, (16,), eps=1e-5), 1, 0),
    ("softmax", lambda: torch.softmax(x, -1), 1, 0),
    ("batched matmul -> views + bmm", lambda: x @ x.transpose(-1, -2), 1, 0),
    ("views only", lambda: x.view(10, 16).t().reshape(16, 10).permute(1, 0)[1:].unsqueeze(0).expand(3, 9, 16), 0, 0),
    ("contiguous of a contiguous tensor", lambda: x.contiguous(), 0, 0),
    ("contiguous of a transposed tensor", lambda: x.transpose(0, 1).contiguous(), 1, 0),
    ("empty / empty_like", lambda: (torch.empty(3, device=x.device), torch.empty_like(x)), 0, 0),
    ("zeros on the device -> one fill", lambda: torch.zeros(3, device=x.device), 1, 0),
    ("zeros on the host", lambda: torch.zeros(3), 0, 0),
    ("host rand + argsort (the MAR orders)", lambda: torch.argsort(torch.rand(2, 16), dim=1), 0, 0),
    ("host -> device copy (blocking)", lambda: torch.rand(2, 16).to(x.device), 1, 1),
    ("host -> device copy (non_blocking)", lambda: torch.rand(2, 16).to(x.device, non_blocking=True), 1, 0),
    ("torch.tensor(data, device=)", lambda: torch.tensor([1.0, 2.0], device=x.device), 1, 1),
    ("item", lambda: x.sum().item(), 2, 1),
    ("bool of a tensor", lambda: bool(x.sum() > 0), 3, 1),
    ("tolist", lambda: x.tolist(), 1, 1),
    (".cpu() then host math", lambda: x.cpu() * 2 + 1, 1, 1),
    ("nonzero", lambda: x.nonzero(), 1 + 2, 1),  # count kernel + D2H copy + select kernel
    ("boolean index", lambda: x[x > 0], 1 + 1 + 2 + 1, 1),  # gt, index, nonzero kernels, its D2H copy
    ("multinomial, one sample", lambda: torch.multinomial(torch.softmax(x[0], -1), 1), 1 + 11 + 2, 2),
    ("F.pad -> fill + copy", lambda: F.pad(x, (1, 0)), 2, 0),
    ("empty output launches nothing", lambda: x[:, :0] + 1, 0, 0),
    ("int() of a host tensor (Philox seed)", lambda: int(torch.randint(0, 2 ** 62, (1,))), 0, 0),
])
def test_classification_small_programs(name, fn, launches, syncs):
    n, s, kinds, _ = counts(fn)
    assert (n, s) == (launches, syncs), (name, kinds)


def test_device_comparison_sees_the_host():
    """Code that moves host tensors only when devices differ takes the GPU machine's branch."""
    def prog():
        orders = torch.argsort(torch.rand(2, 16), dim=1)
        if orders.device != x.device:
            orders = orders.to(x.device)
        return orders + 1
    n, s, kinds, _ = counts(prog)
    assert (n, s) == (2, 1), kinds
    assert torch.zeros(1).device == torch.device("cpu")  # restored after counting


def test_non_launching_set_has_views_and_allocations():
    for name in ("view", "_unsafe_view", "expand", "t", "transpose", "permute", "select", "slice", "as_strided",
                 "empty", "empty_like", "unsqueeze", "squeeze", "detach", "alias", "unbind", "split"):
        assert name in NON_LAUNCHING


def test_custom_op_counts_its_triton_launch():
    """A custom op counts what it launches: the packed attention is one Triton kernel, nothing else."""
    from fractal_kernels.ops.tiny_attention import tiny_attention_packed
    qkv = torch.randn(3, 7, 3 * 2 * 16)
    for execute in (True, False):
        with torch.no_grad(), counting(execute_kernels=execute) as st:
            out = tiny_attention_packed(qkv, 2, causal=False, backend="triton")
        kinds = {k: n for (_, k), n in st.counts.launches.items()}
        assert kinds == {"triton:_attn_fwd_kernel": 1}, kinds
        if not execute:
            assert out.abs().max() == 0  # count-only: outputs zero-filled
        else:
            assert out.abs().max() > 0


SMALL = {"tiny_mar": [2, 2], "tiny_ar": [16, 16], "tiny_mar_gp": [2, 2, 2]}


def _totals(r):
    return {k: r[k] for k in ("launches", "copies", "syncs")}, {
        lbl: (v["launches"], v["syncs"], v["calls"], tuple(sorted(v["kinds"].items())))
        for lbl, v in r["levels"].items()}


@pytest.mark.parametrize("config, over", [
    ("tiny_mar_gp", {}), ("tiny_ar", {}),
    # 3 heads, as fractalmar_base_in256's level 2: a clone width of 3 x 8 = 24, not a power of two
    ("tiny_mar", {"num_heads_list": (3, 3, 2), "embed_dim_list": (48, 48, 16)}),
])
@pytest.mark.parametrize("max_width", [None, 32, 512])
def test_narrow_clone_counts_equal_the_original(config, over, max_width, monkeypatch):
    """Counts do not depend on the width, only on the heads: the clone with 8-wide heads (the 128-wide
    guiding-pixel heads narrowed too) gives the original's counts, reference loop and fast engine; also when
    the fused-block-stack width limit falls between the original's widths and the clone's (the clone's levels
    are all narrow enough to fuse, the original's are not)."""
    if max_width is not None:
        monkeypatch.setattr(policy, "BLOCK_STACK_MAX_WIDTH", max_width)
    torch.manual_seed(0)
    orig = build_model(config, **over).eval()
    clone = narrow_clone(config, **over)  # the widths in over: the original's, for pinning its fused stacks
    widths = lambda m: [g.patch_emb.out_features for g in m.levels()[:-1]]  # noqa: E731
    assert widths(clone) != widths(orig)
    for fast, backend in ((True, "triton"), (False, "torch")):
        a = count_generate(orig, [1], fast=fast, backend=backend, num_iter_list=SMALL[config], warmup=fast)[1]
        c = count_generate(clone, [1], fast=fast, backend=backend, num_iter_list=SMALL[config], warmup=fast)[1]
        assert _totals(a) == _totals(c), (config, fast)


def test_memo_and_count_only_are_exact():
    """Memoised sub-level calls and count-only kernels give exactly the counts of the plain run."""
    torch.manual_seed(0)
    model = build_model("tiny_mar").eval()
    iters = SMALL["tiny_mar"]
    plain = count_generate(model, [1], fast=False, backend="torch", num_iter_list=iters, memo=False, warmup=False)[1]
    memo = count_generate(model, [1], fast=False, backend="torch", num_iter_list=iters, memo=True, warmup=False)[1]
    assert _totals(plain) == _totals(memo)
    executed = count_generate(model, [1], fast=True, backend="triton", num_iter_list=iters, memo=False,
                              execute_kernels=True)[1]
    quick = count_generate(model, [1], fast=True, backend="triton", num_iter_list=iters, memo=True,
                           execute_kernels=False)[1]
    assert _totals(executed) == _totals(quick)


@pytest.mark.parametrize("config", ["tiny_mar", "tiny_ar", "tiny_mar_gp"])
def test_tiny_rows_fast_engine(config):
    """The fast engine on the tiny configs: far fewer launches than the reference loop, and no host sync inside
    any level loop -- the MAR orders (drawn on the CPU generator) are copied without waiting (one non-blocking
    H2D copy per call), the AR RoPE table lives on the device from the first call; the only syncs left are
    generate's own, outside the loops."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    iters = SMALL[config]
    ref = count_generate(model, [2], fast=False, backend="torch", num_iter_list=iters, warmup=False)[2]
    fast = count_generate(model, [2], fast=True, backend="triton", num_iter_list=iters)[2]
    assert ref["launches"] > 3 * fast["launches"]
    assert ref["syncs"] > 10 * max(1, fast["syncs"])
    for lbl, v in fast["levels"].items():
        if lbl == "generate":
            # label validation (labels.min/max read back) and to_uint8's two mean/std tables
            assert v["sync_kinds"] == {"_local_scalar_dense": 2, "memcpy_h2d": 2}, v
            continue
        assert v["syncs"] == 0, (lbl, v)
        if "MAR" in lbl:  # the orders: one queued copy per call
            assert v["kinds"]["memcpy_h2d"] == v["copies"] == v["calls"], (lbl, v)
        else:
            assert v["copies"] == 0, (lbl, v)
    assert not fast["implicit_h2d"] and not ref["implicit_h2d"]


def test_roofline_model_is_consistent():
    """The MODEL's per-level figures come from the model's modules: weight bytes per image fall with the batch,
    FLOPs per image do not; the published FractalMAR-L weights add up to its parameter count."""
    m1, m256 = roofline("fractalmar_large_in256", 1), roofline("fractalmar_large_in256", 256)
    assert m1["totals"]["ref_flops"] == m256["totals"]["ref_flops"] > 1e11
    assert m1["totals"]["ref_weight_bytes"] == pytest.approx(256 * m256["totals"]["ref_weight_bytes"])
    per_call = sum(v["weight_bytes_per_call"] for v in m1["levels"].values()) / 2
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model("fractalmar_large_in256").parameters())
    assert per_call == pytest.approx(n - 1000 * 1024 - 1024, rel=1e-6)  # all but the class embedding
    p = predict_s_per_image(m1, "ref", "H100", 1e5, 1e3)
    assert p["predicted_s"] == pytest.approx(floors(m1, "ref", "H100")["floor_s"] + 1e5 * 4e-6 + 1e3 * 10e-6)


def test_cli_writes_tables(tmp_path):
    """``python -m benchmarks.launches --tiny`` end to end (one tiny config, 2 iterations per level)."""
    from benchmarks.launches import main
    assert main(["--tiny", "--configs", "tiny_mar", "--batches", "1", "--iters", "2", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "launches_tiny.md").read_text()
    assert "| tiny_mar | 1 |" in md and "Which levers" in md
    import json
    doc = json.loads((tmp_path / "launches_tiny.json").read_text())
    row = doc["configs"][0]["batches"]["1"]
    assert row["ref"]["launches"] > row["fast"]["launches"] > 0
    assert (tmp_path / "launches_tiny.png").exists()


def test_depth_extrapolation_is_exact():
    """A level's own counts are affine in its depth: counts at depths 1 and 2 extrapolate exactly to a direct
    count at depth 3 (reference loop and fast engine)."""
    from benchmarks.launches import combine_depths
    iters = SMALL["tiny_mar"]
    depths = {"L0 MAR": 3, "L1 MAR": 3}
    for fast, backend in ((False, "torch"), (True, "triton")):
        runs = {d: count_generate(narrow_clone("tiny_mar", num_blocks_list=(d, d, 1)), [1], fast=fast,
                                  backend=backend, num_iter_list=iters, warmup=fast)[1] for d in (1, 2, 3)}
        combined = combine_depths(runs[1], runs[2], depths)
        assert _totals(combined)[0] == _totals(runs[3])[0], fast
        for lbl, v in runs[3]["levels"].items():
            assert combined["levels"][lbl]["kinds"] == v["kinds"], lbl
            assert combined["levels"][lbl]["sync_kinds"] == v["sync_kinds"], lbl


@pytest.mark.parametrize("config", ["tiny_mar_gp", "tiny_ar"])
def test_counts_per_batch_do_not_depend_on_the_batch(config):
    """Launches, copies and syncs per batch are the same at batch 1 and 3, level by level and kind by kind, for
    the reference loop and the fast engine (steady state: warmed up at the counted batch), so the published rows
    at batch 256 are the batch-1 counts / 256 (``at_batch``)."""
    from benchmarks.launches import at_batch
    model = narrow_clone(config)
    iters = SMALL[config]
    for fast, backend in ((False, "torch"), (True, "triton")):
        r = count_generate(model, [1, 3], fast=fast, backend=backend, num_iter_list=iters, warmup=fast)
        assert _totals(r[1]) == _totals(r[3]), (config, fast)
        assert at_batch(r[1], 3)["launches_per_image"] == r[3]["launches_per_image"]


def test_published_run_in_worker_processes(tmp_path):
    """The published run's path end to end on a tiny config: pieces counted in two child processes
    (``--workers 2``), assembled with the depth and batch extrapolations, tables written."""
    from benchmarks.launches import main
    assert main(["--configs", "tiny_mar", "--batches", "1,4", "--workers", "2", "--out-dir", str(tmp_path)]) == 0
    import json
    doc = json.loads((tmp_path / "launches.json").read_text())
    rows = doc["configs"][0]["batches"]
    assert rows["1"]["fast"]["syncs"] == rows["4"]["fast"]["syncs"] == 4  # generate's own only
    assert rows["4"]["ref"]["launches_per_image"] * 4 == rows["1"]["ref"]["launches"]
    assert sorted(p.name for p in (tmp_path / "raw_launches").iterdir()) == [
        f"job_tiny_mar_{p}_{d}.json" for p in ("fast", "ref") for d in (1, 2)]
    assert "Full run:" in (tmp_path / "launches.md").read_text()


def test_narrow_clone_pins_the_originals_fused_stacks():
    """A clone's levels fuse their blocks exactly where the full-width model's would (width <= the limit)."""
    pins = lambda m: [g.fused_stack for g in m.levels()[:-1]]  # noqa: E731
    # the safe default (issue #28): no level fuses
    assert pins(narrow_clone("fractalar_in64")) == [False, False]
    assert pins(narrow_clone("fractalmar_large_in256")) == [False, False, False]
    assert pins(narrow_clone("tiny_mar")) == [False, False]


def test_narrow_clone_pins_follow_a_raised_width_limit(monkeypatch):
    """With the default rule set to fuse up to D=512 (the rule before issue #28), the clone fuses the original's
    narrow levels only."""
    monkeypatch.setattr(policy, "BLOCK_STACK_MAX_WIDTH", 512)
    pins = lambda m: [g.fused_stack for g in m.levels()[:-1]]  # noqa: E731
    assert pins(narrow_clone("fractalar_in64")) == [False, True]
    assert pins(narrow_clone("fractalmar_large_in256")) == [False, True, True]
    assert pins(narrow_clone("tiny_mar")) == [True, True]
