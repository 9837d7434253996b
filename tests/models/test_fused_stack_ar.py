"""The AR levels' fused block stack (fractal_models/engine/ar.py -> ar_block_stack_decode) on the triton backend
(interpreter on CPU): per-step outputs against the op-by-op kernel path, generate() end to end, the switch.

Tolerance of the per-step outputs (LayerNorm outputs, fp32 weights): atol = rtol = 1e-4 (the op-by-op kernel
path uses F.rms_norm and the decode kernel's own summation order; observed ~1e-6).
"""
import pytest
import torch

from fractal_kernels import dispatch, policy
from fractal_models import generate, uniform_draw
from fractal_models.engine import ar as engine_ar
from tests.models.test_kernel_backends import model_for


def _steps(level, rows, guided, seed=0):
    """The level's per-step outputs [seq_len, rows, E] with fixed patches fed back (so both paths see the same
    inputs whatever they compute) and its sampled image."""
    g = torch.Generator().manual_seed(seed)
    cond = [torch.randn(rows, level.cond_emb.in_features, generator=g)]
    dim = 3 * level.patch_size ** 2
    patches = torch.randn(level.seq_len, rows // 2 if guided else rows, dim, generator=g)
    seen = []

    def next_level(cond_list, cfg, temperature, filter_threshold):
        seen.append(cond_list[0].clone())
        return patches[len(seen) - 1]

    with torch.no_grad():
        img = engine_ar.sample(level, cond, 2.0 if guided else 1.0, "linear", 1.0, 0.0, next_level)
    return torch.stack(seen), img


@pytest.mark.parametrize("index,guided", [(0, True), (1, False)])
def test_fused_steps_match_kernel_path(index, guided):
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[index]
    out = {}
    for fuse in (False, True):
        level.fused_stack = fuse
        dispatch.forget("ar_block_stack_decode")
        dispatch.forget("tiny_attention_decode")
        out[fuse] = _steps(level, 4 if guided else 3, guided)
        if fuse:
            assert dispatch.last_backend("ar_block_stack_decode") == "triton"
        else:  # the old path: the decode kernel per block, the fused op never resolved
            assert dispatch.last_backend("ar_block_stack_decode") is None
            assert dispatch.last_backend("tiny_attention_decode") == "triton"
    assert out[True][0].shape == (level.seq_len, 4 if guided else 3, level.config.dim)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[True][1], out[False][1])
    assert "_fused_stack_cache" in level.__dict__ and "_fused_stack_cache" not in "".join(level.state_dict())


def test_default_rule_and_torch_backend(monkeypatch):
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[0]
    assert level.fused_stack is None  # default: op by op (issue #28's safe default), and it says why
    assert engine_ar._fused_stack_backend(level, torch.device("cpu")) is None
    assert "default: op by op" in engine_ar.explain_fused_stack(level, torch.device("cpu"))[1]
    monkeypatch.setattr(policy, "BLOCK_STACK_MAX_WIDTH", 64)  # a width rule still works where set
    assert engine_ar._fused_stack_backend(level, torch.device("cpu")) == "triton"
    level.fused_stack = True
    monkeypatch.setattr(policy, "BLOCK_STACK_MAX_WIDTH", 0)
    assert engine_ar.explain_fused_stack(level, torch.device("cpu")) == ("triton", "fused_stack=True on the level")
    level.train()
    assert engine_ar._fused_stack_backend(level, torch.device("cpu")) is None  # train mode: never fused
    level.eval()
    model_t, _ = model_for("tiny_ar", "torch")
    assert engine_ar._fused_stack_backend(model_t.levels()[0], torch.device("cpu")) is None


def test_packed_weights_cached_and_repacked():
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[1]
    a = engine_ar._packed_stack(level, torch.device("cpu"))
    assert engine_ar._packed_stack(level, torch.device("cpu")) is a
    with torch.no_grad():
        level.blocks[0].attention.wo.weight.mul_(2.0)
    b = engine_ar._packed_stack(level, torch.device("cpu"))
    assert b is not a and torch.equal(b.wo[0], level.blocks[0].attention.wo.weight)


def test_generate_runs_the_fused_stack(monkeypatch):
    # the top AR level on the triton backend (fused: 16 interpreted launches per image); the level below and the
    # pixel head on torch, since their 256 calls per image would take minutes in the interpreter
    out, calls = {}, []
    real = engine_ar.ar_block_stack_decode
    monkeypatch.setattr(engine_ar, "ar_block_stack_decode",
                        lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    for b in ("torch", "triton"):
        calls.clear()
        model, _ = model_for("tiny_ar", b)
        levels = model.levels()
        levels[0].fused_stack = True  # no level fuses by default (issue #28)
        for blk in levels[1].blocks:
            blk.attention.backend = "torch"
        levels[-1].backend = "torch"
        g = torch.Generator().manual_seed(0)
        draw = uniform_draw(lambda n, c: torch.rand(n, generator=g, dtype=torch.float64))
        out[b] = generate(model, torch.tensor([3, 7]), cfg=2.0, num_iter_list=[1, 1], seed=0, draw=draw, backend=None)
        # fused on triton only: one call per step of the top level (16 steps, the batch in one call)
        assert calls == (["triton"] * levels[0].seq_len if b == "triton" else [])
    assert out["triton"].shape == out["torch"].shape and out["triton"].dtype == torch.uint8
    # shared uniforms: the fused fp32 stack draws the reference's pixels up to rare near-ties of a CDF boundary
    assert (out["torch"] == out["triton"]).float().mean() >= 0.99


@pytest.mark.parametrize("schedule", ["phases", "tiles"])
def test_phased_step_matches_the_kernel_path(schedule, monkeypatch):
    """The level's step as ar_block_stack_decode with the phased schedule (forced here; on a GPU the crossover
    data picks it at few rows): the same per-step outputs and image as the op-by-op kernel path."""
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[1]
    level.fused_stack = False
    want = _steps(level, 4, True)
    level.fused_stack = True
    monkeypatch.setenv("FRACTAL_AR_STEP_SCHEDULE", schedule)
    dispatch.forget("ar_step_schedule")
    got = _steps(level, 4, True)
    assert dispatch.last_backend("ar_step_schedule") == schedule
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1], want[1])


def test_the_phased_step_follows_the_crossover_data(tmp_path, monkeypatch):
    """On a GPU (a CUDA device object under target_arch(90); no kernel runs) the engine takes the phased step
    where policy.schedule_rule picks it for the level's width and rows (here a measured overlay entry for the tiny
    level's width: rows 1-8), and says so; elsewhere op by op; fused_stack=False wins."""
    import json
    from fractal_kernels._target import target_arch
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[1]
    width = str(level.config.dim)
    doc = {"entries": {policy.AR_PHASES_OP: {"float32": {"sm_90": {width: {"fused_n": [[1, 8]]}}}}}}
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path))
    (tmp_path / policy.BLOCK_STACK).write_text(json.dumps(doc))
    dispatch.reload()
    cuda = torch.device("cuda")
    try:
        with target_arch(90):
            which, why = engine_ar.explain_fused_stack(level, cuda, policy_only=True, rows=2)
            assert which == "triton" and "the phased step (phases)" in why and "measured" in why
            which, why = engine_ar.explain_fused_stack(level, cuda, policy_only=True, rows=64)
            assert which is None and "tiles win here" in why
            level.fused_stack = False
            assert engine_ar.explain_fused_stack(level, cuda, policy_only=True, rows=2)[0] is None
    finally:
        monkeypatch.delenv("FRACTAL_HOME")
        dispatch.reload()
