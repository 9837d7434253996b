"""The MAR levels' op-by-op step with every linear a fused_linear launch (fractal_models/engine/mar.py
linear_blocks: LayerNorm prologues, bias / GELU / residual epilogues) on the triton backend (interpreter on CPU):
equal to ``blocks_eval`` (fp32: atol = rtol = 1e-5, another summation order), generate() with it, the switch and
its reasons."""
import pytest
import torch

from fractal_kernels import dispatch, policy
from fractal_models.engine import mar as engine_mar
from tests.models.test_fused_stack_mar import _generate, mar_levels, model_for, seq_of

OP = "fused_linear"
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["tiny_mar", "tiny_mar_gp"])
def test_fused_linear_step_equals_blocks_eval(name):
    model = model_for(name, "triton", fuse=None)
    for i, m in enumerate(mar_levels(model)):
        m.fused_linears = True
        seq, width = seq_of(m), m.norm.normalized_shape[0]
        run = engine_mar.linear_blocks(m, CPU, 3)
        assert run is not None, f"level {i}"
        x = torch.randn(3, seq, width, generator=torch.Generator().manual_seed(i))
        dispatch.forget(OP)
        with torch.no_grad():
            got, want = run(x), m.blocks_eval(x)
        assert dispatch.last_backend(OP) == "triton"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"level {i}")


def test_generate_runs_the_fused_linear_step():
    model = model_for("tiny_mar", "torch", fuse=None)
    for m in mar_levels(model):
        m.fused_linears = True
    dispatch.forget(OP)
    got = _generate(model, "triton")
    assert dispatch.last_backend(OP) == "triton"
    for m in mar_levels(model):
        m.fused_linears = False
    dispatch.forget(OP)
    plain = _generate(model, "triton")
    assert dispatch.last_backend(OP) is None
    assert got.shape == plain.shape and (got == plain).float().mean() >= 0.99


def test_default_is_off_forcing_and_crossover(monkeypatch):
    model = model_for("tiny_mar", "triton", fuse=None)
    m = mar_levels(model)[0]
    which, why = engine_mar.explain_fused_linear_step(m, CPU, n=8)
    assert which is None and why.startswith("default: aten linears")
    monkeypatch.setattr(policy, "BLOCK_STACK_MAX_WIDTH", 4096)  # the block stacks' width rule is not this step's
    assert engine_mar.linear_blocks(m, CPU, 8) is None
    m.fused_linears = True
    assert engine_mar.explain_fused_linear_step(m, CPU) == ("triton", "fused_linears=True on the level")
    m.train()
    assert engine_mar.explain_fused_linear_step(m, CPU)[0] is None
    m.eval()
    m.fused_linears = None
    width = m.norm.normalized_shape[0]
    table = {("mar_linear_step", "float16", "sm_90", str(width)): ([[64, 65536]], "test-data")}  # policy view: fp16
    monkeypatch.setattr(policy, "block_stack_table", lambda: table)
    monkeypatch.setattr("fractal_kernels._target.device_arch", lambda device=None: 90)
    cuda = torch.device("cuda")
    assert engine_mar.explain_fused_linear_step(m, cuda, policy_only=True, n=256)[0] == "triton"
    which, why = engine_mar.explain_fused_linear_step(m, cuda, policy_only=True, n=2)
    assert which is None and "at N=2 the fused-linear step loses" in why
    model_t = model_for("tiny_mar", "torch", fuse=None)
    mt = mar_levels(model_t)[0]
    mt.fused_linears = True
    assert engine_mar.explain_fused_linear_step(mt, CPU)[0] is None
