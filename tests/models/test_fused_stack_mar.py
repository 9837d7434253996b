"""The fast engine's fused MAR block stack (one launch per level step) in the models: on the triton backend
(interpreter on CPU) a MAR level's fused stack equals its op-by-op ``blocks_eval``, ``generate`` runs with it,
and ``fused_stack=False`` / the torch backend keep the op-by-op path."""
import pytest
import torch

from fractal_kernels import dispatch
from fractal_models import FractalGen, generate, uniform_draw
from fractal_models.engine.mar import explain_fused_blocks, fused_blocks
from fractal_models.mar import MAR
from tests.conftest import load_fixture

OP = "mar_block_stack"


def model_for(name, backend, fuse=True):
    """The fixture's model with its MAR levels' ``fused_stack`` set to ``fuse`` (no level fuses by default)."""
    meta, data = load_fixture(name)
    model = FractalGen(**meta["constructor"], backend=backend)
    model.load_state_dict(data["state_dict"], strict=True)
    for m in mar_levels(model):
        m.fused_stack = fuse
    return model.eval()


def mar_levels(model):
    return [lv for lv in model.levels() if isinstance(lv, MAR)]


def seq_of(m):
    return m.seq_len + m.num_conds + int(m.guiding_pixel)


@pytest.mark.parametrize("name", ["tiny_mar", "tiny_mar_gp"])
def test_fused_level_equals_blocks_eval(name):
    model = model_for(name, "triton")
    levels = mar_levels(model)
    assert levels
    for i, m in enumerate(levels):
        seq, width = seq_of(m), m.norm.normalized_shape[0]
        run = fused_blocks(m, torch.device("cpu"), seq)
        assert run is not None, f"level {i} not fused"
        x = torch.randn(3, seq, width, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            got, want = run(x), m.blocks_eval(x)
        assert dispatch.last_backend(OP) == "triton"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"level {i}")
        # packed once: a second call reuses the cache, a changed parameter repacks
        cache = m.__dict__["_fused_stack_cache"]
        packed = next(iter(cache.values()))[1]
        fused_blocks(m, torch.device("cpu"), seq)
        assert next(iter(cache.values()))[1] is packed
        with torch.no_grad():
            m.blocks[0].mlp.fc2.bias.add_(1.0)
        run = fused_blocks(m, torch.device("cpu"), seq)
        assert next(iter(cache.values()))[1] is not packed
        with torch.no_grad():
            torch.testing.assert_close(run(x), m.blocks_eval(x), atol=1e-5, rtol=1e-5)
            m.blocks[0].mlp.fc2.bias.sub_(1.0)
        assert "fused_stack" not in m.state_dict() and "_fused_stack_cache" not in str(list(m.state_dict()))


def test_bf16_autocast_packs_in_the_autocast_dtype():
    model = model_for("tiny_mar", "triton")
    m = mar_levels(model)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run = fused_blocks(m, torch.device("cpu"), seq_of(m))
    assert run is not None
    assert (torch.bfloat16, m.norm.weight.device) in m.__dict__["_fused_stack_cache"]


def test_fused_stack_attribute_and_backends_choose_the_path():
    model = model_for("tiny_mar", "triton")
    m = mar_levels(model)[0]
    seq = seq_of(m)
    m.fused_stack = False
    assert fused_blocks(m, torch.device("cpu"), seq) is None
    m.fused_stack = None  # the safe default (issue #28): op by op
    assert fused_blocks(m, torch.device("cpu"), seq) is None
    assert explain_fused_blocks(m, torch.device("cpu"), seq)[1].startswith("default: op by op")
    m.fused_stack = True
    assert fused_blocks(m, torch.device("cpu"), seq) is not None
    assert fused_blocks(m, torch.device("cpu"), 65) is None  # past the kernel's sequence limit
    assert "MAR_STACK_MAX_L" in explain_fused_blocks(m, torch.device("cpu"), 65)[1]
    m.train()
    assert fused_blocks(m, torch.device("cpu"), seq) is None
    m.eval()
    for b in ("torch", "auto"):  # torch: the reference path, bit-exact; auto on a CPU: torch too
        model.set_backend(b)
        m.fused_stack = True
        assert fused_blocks(m, torch.device("cpu"), seq) is None
        assert "only the Triton kernel fuses" in explain_fused_blocks(m, torch.device("cpu"), seq)[1]


def test_generate_default_is_op_by_op():
    """No fused stack unless asked: the default fast engine never resolves the fused op."""
    model = model_for("tiny_mar", "torch", fuse=None)
    dispatch.forget(OP)
    _generate(model, "triton")
    assert dispatch.last_backend(OP) is None


def _generate(model, backend):
    # one unguided image, one step per level: the interpreter runs ~0.2 s per sequence and block
    g = torch.Generator().manual_seed(0)
    draw = uniform_draw(lambda n, c: torch.rand(n, generator=g, dtype=torch.float64))
    return generate(model, torch.tensor([5]), cfg=1.0, num_iter_list=[1] * (len(model.levels()) - 1), seed=0,
                    draw=draw, backend=backend)


@pytest.mark.parametrize("name", ["tiny_mar", "tiny_mar_gp"])
def test_generate_runs_the_fused_stack(name):
    model = model_for(name, "torch")
    dispatch.forget(OP)
    fused = _generate(model, "triton")
    assert dispatch.last_backend(OP) == "triton"
    assert fused.dtype == torch.uint8 and fused.shape == (1, 3, 16, 16)
    if name != "tiny_mar":
        return  # the op-by-op comparison once (the interpreter is slow)
    for m in mar_levels(model):
        m.fused_stack = False
    dispatch.forget(OP)
    plain = _generate(model, "triton")
    assert dispatch.last_backend(OP) is None  # the op-by-op path never asked for the fused op
    # fp32 both ways, another summation order: the same draws pick the same values nearly everywhere
    assert (fused == plain).float().mean() >= 0.99
