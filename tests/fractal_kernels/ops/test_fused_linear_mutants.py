"""fused_linear's edges random inputs do not reach (mutation survivors): the LayerNorm weight and bias read past
K, seen only when what lies past them in memory is not finite."""
import torch

from fractal_kernels.ops.fused_linear.launch import FusedLinearConfig

from tests.fractal_kernels.ops.test_fused_linear import close, inputs, run


def test_norm_weight_and_bias_are_not_read_past_k():
    # K = 72 with 64-deep chunks: the second chunk's lanes past K must not read the norm parameters' neighbours
    # (NaN here): a read past K puts NaN into the normalised input, and 0 (the masked weight) times NaN is NaN
    x, w, kw = inputs(70, 40, 72, torch.bfloat16, {"norm", "bias", "residual"})
    for name in ("norm_weight", "norm_bias"):
        buf = torch.full((200,), float("nan"))
        buf[:72] = kw[name]
        kw[name] = buf[:72]
    cfg = FusedLinearConfig(bm=64, bn=64, bk=64, group_m=8, dot16=1, num_warps=4, num_stages=3)
    got = run(x, w, kw, config=cfg)
    assert torch.isfinite(got).all()
    close(got, x, w, kw)


def test_x_is_not_read_past_k():
    # x as the first K columns of wider rows whose tail is NaN (K = 72, 64-deep chunks)
    x, w, kw = inputs(70, 40, 72, torch.bfloat16, {"norm", "bias", "residual"})
    buf = torch.full((70, 200), float("nan"))
    buf[:, :72] = x
    cfg = FusedLinearConfig(bm=64, bn=64, bk=64, group_m=8, dot16=1, num_warps=4, num_stages=3)
    got = run(buf[:, :72], w, kw, config=cfg)
    assert torch.isfinite(got).all()
    close(got, x, w, kw)
