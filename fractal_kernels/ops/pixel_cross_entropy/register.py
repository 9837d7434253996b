"""Fused pixel cross-entropy: the autograd function (gradients made during the forward for "mean"/"sum",
recomputed chunk by chunk for "none")."""
from __future__ import annotations

import torch

from fractal_kernels.ops.pixel_cross_entropy.launch import _chunked


class _PixelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, ignore_index, backend):
        x32, w32, b32 = x.float(), weight.float(), bias.float()
        want = any(ctx.needs_input_grad[:3])
        precompute = want and reduction != "none"
        loss, dx, dw, db = _chunked(x32, w32, b32, target, ignore_index, backend, precompute)
        ctx.reduction, ctx.ignore_index, ctx.backend = reduction, ignore_index, backend
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, target)
            return loss.to(x.dtype) if x.dtype == torch.float64 else loss
        total = loss.sum()
        if reduction == "mean":
            count = (target != ignore_index).sum().clamp(min=1).to(torch.float32)
            out = total / count
        else:
            count = torch.ones((), device=x.device)
            out = total
        if precompute:
            ctx.save_for_backward(dx, dw, db, count)
        return out

    @staticmethod
    def backward(ctx, grad):
        tx, tw, tb = ctx.dtypes
        if ctx.reduction == "none":
            x, weight, bias, target = ctx.saved_tensors
            _, dx, dw, db = _chunked(x.float(), weight.float(), bias.float(), target, ctx.ignore_index, ctx.backend,
                                     True, row_scale=grad.float().contiguous())
        else:
            dx, dw, db, count = ctx.saved_tensors
            s = (grad.float() / count)
            dx, dw, db = dx * s, dw * s, db * s
        return (dx.to(tx) if ctx.needs_input_grad[0] else None, dw.to(tw) if ctx.needs_input_grad[1] else None,
                db.to(tb) if ctx.needs_input_grad[2] else None, None, None, None, None)

