"""skinny_linear's edges random inputs do not reach (mutation survivors): the RMSNorm weight read past K, seen
only when what lies past it in memory is not finite."""
import torch

from fractal_kernels.ops.skinny_linear import launch_triton, skinny_linear_config

from tests.fractal_kernels.ops.test_skinny_linear import CPU, close, inputs, run


def test_norm_weight_is_not_read_past_k():
    # K = 72 with 64-wide chunks: the second chunk's lanes past K must not read the norm weight's neighbours
    # (NaN here): a read past K multiplies 0 by NaN
    x, w, kw = inputs(3, 40, 72, torch.bfloat16, {"norm", "residual"})
    buf = torch.full((200,), float("nan"))
    buf[:72] = kw["norm_weight"]
    kw["norm_weight"] = buf[:72]
    cfg = skinny_linear_config(3, 40, 72, False, CPU, arch=90, interpret=False)._replace(bk=64)
    got = run(x, w, kw, config=cfg)
    assert torch.isfinite(got).all()
    close(got, x, w, kw)


def test_x_is_not_read_past_k():
    # x as the first K columns of wider rows whose tail is NaN (K = 72, 64-wide chunks): lanes past K must read
    # the fill 0, not the row's next elements
    x, w, kw = inputs(3, 40, 72, torch.bfloat16, {"norm", "residual"})
    buf = torch.full((3, 200), float("nan"))
    buf[:, :72] = x
    cfg = skinny_linear_config(3, 40, 72, False, CPU, arch=90, interpret=False)._replace(bk=64)
    got = run(buf[:, :72], w, kw, config=cfg)
    assert torch.isfinite(got).all()
    close(got, x, w, kw)


def test_weight_and_gate_are_not_read_past_k():
    # weight and gate rows as the first K columns of wider rows whose tail is NaN: lanes past K must be masked
    x, w, kw = inputs(3, 40, 72, torch.bfloat16, {"norm", "gate"})
    wide = {}
    for name, t in (("w", w), ("gate", kw["gate"])):
        buf = torch.full((40, 100), float("nan"), dtype=t.dtype)
        buf[:, :72] = t
        wide[name] = buf[:, :72]
    cfg = skinny_linear_config(3, 40, 72, True, CPU, arch=90, interpret=False)._replace(bk=64)
    got = run(x, wide["w"], dict(kw, gate=wide["gate"]), config=cfg)
    assert torch.isfinite(got).all()
    close(got, x, w, kw)
