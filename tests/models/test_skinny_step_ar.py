"""The AR levels' op-by-op step with the linears as skinny_linear launches (fractal_models/engine/ar.py ->
_blocks_step_skinny) on the triton backend (interpreter on CPU): per-step outputs against the op-by-op kernel
path (aten linears), generate() end to end, the switch and its reasons.

Tolerance of the per-step outputs (LayerNorm outputs, O(1), fp32 weights): atol = rtol = 1e-4, as the fused
stack's test (the paths differ in summation order only; observed ~1e-6).
"""
import pytest
import torch

from fractal_kernels import dispatch, policy
from fractal_models import generate, uniform_draw
from fractal_models.engine import ar as engine_ar
from tests.models.test_fused_stack_ar import _steps
from tests.models.test_kernel_backends import model_for

CPU = torch.device("cpu")


@pytest.mark.parametrize("index,guided", [(0, True), (1, False)])
def test_skinny_steps_match_kernel_path(index, guided):
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[index]
    out = {}
    for on in (False, True):
        level.skinny_linears = on
        dispatch.forget("skinny_linear")
        out[on] = _steps(level, 4 if guided else 3, guided)
        assert dispatch.last_backend("skinny_linear") == ("triton" if on else None)
    level.skinny_linears = None
    assert out[True][0].shape == (level.seq_len, 4 if guided else 3, level.config.dim)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[True][1], out[False][1])


def test_generate_runs_the_skinny_step(monkeypatch):
    # the top AR level on the triton backend (4 skinny launches per block and step); the level below and the
    # pixel head on torch, since their 256 calls per image would take minutes in the interpreter
    out, calls = {}, []
    real = engine_ar.skinny_linear
    monkeypatch.setattr(engine_ar, "skinny_linear", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    for on in (False, True):
        calls.clear()
        model, _ = model_for("tiny_ar", "triton")
        levels = model.levels()
        levels[0].skinny_linears = on
        for blk in levels[1].blocks:
            blk.attention.backend = "torch"
        levels[-1].backend = "torch"
        g = torch.Generator().manual_seed(0)
        draw = uniform_draw(lambda n, c: torch.rand(n, generator=g, dtype=torch.float64))
        out[on] = generate(model, torch.tensor([3, 7]), cfg=2.0, num_iter_list=[1, 1], seed=0, draw=draw,
                           backend=None)
        assert calls == (["triton"] * (4 * len(levels[0].blocks) * levels[0].seq_len) if on else [])
    assert out[True].shape == out[False].shape and out[True].dtype == torch.uint8
    # shared uniforms: the paths differ in summation order, so a pixel may differ at a near-tie of a CDF boundary
    assert (out[True] == out[False]).float().mean() >= 0.99


def test_default_is_off_and_says_why(monkeypatch):
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[0]
    assert level.__dict__.get("skinny_linears") is None
    which, why = engine_ar.explain_skinny_step(level, CPU, rows=2)
    assert which is None and why.startswith("default: aten linears")
    monkeypatch.setattr(policy, "BLOCK_STACK_MAX_WIDTH", 4096)  # the block stacks' width rule is not this step's
    assert engine_ar.explain_skinny_step(level, CPU, rows=2)[0] is None
    level.skinny_linears = True
    assert engine_ar.explain_skinny_step(level, CPU) == ("triton", "skinny_linears=True on the level")
    level.skinny_linears = False
    assert engine_ar.explain_skinny_step(level, CPU)[0] is None
    level.skinny_linears = True
    level.train()
    assert engine_ar.explain_skinny_step(level, CPU) == (None, "train mode: aten linears")
    level.eval()
    level.__dict__.pop("skinny_linears")
    model_t, _ = model_for("tiny_ar", "torch")
    assert engine_ar.explain_skinny_step(model_t.levels()[0], CPU)[0] is None


def test_crossover_data_decides_on_a_gpu(monkeypatch):
    """On a CUDA device with rows known, the MODEL's crossover entry for ar_skinny_step decides per N."""
    model, _ = model_for("tiny_ar", "triton")
    level = model.levels()[0]
    width = level.config.dim
    table = {("ar_skinny_step", "float16", "sm_90", str(width)): ([[1, 16]], "test-data")}  # policy view: fp16
    monkeypatch.setattr(policy, "block_stack_table", lambda: table)
    monkeypatch.setattr("fractal_kernels._target.device_arch", lambda device=None: 90)
    cuda = torch.device("cuda")
    assert engine_ar.explain_skinny_step(level, cuda, policy_only=True, rows=2)[0] == "triton"
    which, why = engine_ar.explain_skinny_step(level, cuda, policy_only=True, rows=64)
    assert which is None and "N=64" in why and "skinny-linear step loses" in why
