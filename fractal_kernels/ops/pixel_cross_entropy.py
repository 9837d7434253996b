"""Fused pixel logits + cross-entropy (training) and log-probabilities (NLL evaluation).

Computes ``cross_entropy(x @ weight^T + bias, target)`` without keeping ``[N, V]`` fp32 logits or their
gradient alive: rows are processed in chunks of ``CHUNK_ROWS``; per chunk the logits come from one fp32
GEMM, a row kernel (Triton, or CUDA) turns them *in place* into ``softmax - onehot`` while writing the
per-row loss, and two more GEMMs fold that into ``dx`` and ``dweight``/``dbias``. For ``reduction`` "mean"
or "sum" the gradients are produced during the forward pass (nothing but ``dx``, ``dweight``, ``dbias`` is
kept); for "none" the backward recomputes the chunks with the per-row output gradients.

Peak extra memory: one ``[CHUNK_ROWS, V]`` fp32 buffer plus the gradients themselves, versus
``2 x [N, V]`` fp32 for the reference (logits and their gradient). Numerics: fp32 logits, log-sum-exp with
max subtraction, fp32 accumulation of the gradients; outputs are cast back to the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fractal_kernels._checks import host_checks
from fractal_kernels.dispatch import resolve, shape_class
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

CHUNK_ROWS = 8192
REDUCTIONS = ("mean", "sum", "none")

if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, target_ptr, loss_ptr, scale_ptr, M, V, stride, ignore_index,
                        WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        # logits [M, V] fp32 -> loss [M]; with WRITE_GRAD the buffer becomes (softmax - onehot) * scale
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_V)
        rmask = rows < M
        m2 = rmask[:, None] & (cols < V)[None, :]
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :]
        x = tl.load(ptrs, mask=m2, other=float("-inf"))
        t = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
        valid = (t != ignore_index) & rmask
        bad = valid & ((t < 0) | (t >= V))  # out-of-range target: a NaN row, found without a host read
        mx = tl.max(x, axis=1)
        mx = tl.where(rmask, mx, 0.0)
        e = tl.where(m2, tl.exp(x - mx[:, None]), 0.0)
        s = tl.sum(e, axis=1)
        s = tl.where(rmask, s, 1.0)
        lse = mx + tl.log(s)
        hit = cols[None, :] == t[:, None]
        x_t = tl.sum(tl.where(hit & m2, x, 0.0), axis=1)
        tl.store(loss_ptr + rows, tl.where(valid, tl.where(bad, float("nan"), lse - x_t), 0.0), mask=rmask)
        if WRITE_GRAD:
            g = e / s[:, None] - tl.where(hit, 1.0, 0.0)
            if ROW_SCALE:
                g = g * tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
            g = tl.where(valid[:, None], tl.where(bad[:, None], float("nan"), g), 0.0)
            tl.store(ptrs, g, mask=m2)


def _rows(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, ignore_index: int, write_grad: bool,
          row_scale: Optional[torch.Tensor], backend: str) -> None:
    m, v = logits.shape
    if m == 0:
        return
    if backend == "triton":
        block_v = max(16, triton.next_power_of_2(v))
        block_n = max(1, (2048 if logits.device.type == "cuda" else 131072) // block_v)
        _ce_rows_kernel[(triton.cdiv(m, block_n),)](
            logits, target, loss, row_scale if row_scale is not None else loss, m, v, logits.stride(0), ignore_index,
            WRITE_GRAD=write_grad, ROW_SCALE=row_scale is not None, BLOCK_N=block_n, BLOCK_V=block_v)
    else:
        from fractal_kernels.dispatch import _cuda_ext
        _cuda_ext().ce_rows(logits, target, loss, row_scale, ignore_index, write_grad)


def _chunked(x32, w32, b32, target, ignore_index, backend, want_grads, row_scale=None):
    """Loss rows, and (softmax - onehot)-derived dx, dweight, dbias when ``want_grads``."""
    n = x32.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=x32.device)
    dx = torch.empty_like(x32) if want_grads else None
    dw = torch.zeros_like(w32) if want_grads else None
    db = torch.zeros_like(b32) if want_grads else None
    for start in range(0, n, CHUNK_ROWS):
        sl = slice(start, min(n, start + CHUNK_ROWS))
        with torch.autocast(x32.device.type, enabled=False):  # fp32 logits even if backward runs under autocast
            logits = torch.addmm(b32, x32[sl], w32.t())  # [chunk, V] fp32, reused for the gradient
        _rows(logits, target[sl], loss[sl], ignore_index, want_grads,
              row_scale[sl] if row_scale is not None else None, backend)
        if want_grads:
            torch.mm(logits, w32, out=dx[sl])
            dw.addmm_(logits.t(), x32[sl])
            db.add_(logits.sum(0))
    return loss, dx, dw, db


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


def _check(x, weight, bias, target, reduction):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor [N, C], got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
    n, c = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != c:
        raise ValueError(f"weight: expected [V, {c}] (one row per class, C matching x), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight}")
    v = weight.shape[0]
    if not isinstance(bias, torch.Tensor) or bias.numel() != v:
        raise ValueError(f"bias: expected {v} values (V of weight), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias}")
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != (n,):
        raise ValueError(f"target: expected shape ({n},), got {tuple(target.shape) if isinstance(target, torch.Tensor) else target}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target: expected int64 class indices, got {target.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x on {x.device}")
    if not (weight.is_floating_point() and bias.is_floating_point()):
        raise TypeError("weight, bias: expected floating-point tensors")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def pixel_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                        reduction: str = "mean", ignore_index: int = -100, backend: Optional[str] = None) -> torch.Tensor:
    """``cross_entropy(x @ weight^T + bias, target)`` without materialising the logits; differentiable in
    ``x``, ``weight`` and ``bias``. ``x`` ``[N, C]``, ``weight`` ``[V, C]``, ``bias`` ``[V]`` (or ``[1, V]``),
    ``target`` int64 ``[N]`` in ``[0, V)`` or ``ignore_index`` (ignored rows add 0 and are not counted by
    "mean"). Returns a scalar ("mean", "sum") or fp32 ``[N]`` ("none"). Empty batch: "mean" is NaN like
    PyTorch's, "sum" 0, "none" empty. The logits are fp32 on every backend, also under ``torch.autocast``
    (which is turned off inside the op).

    Target values are checked on CPU tensors (a ValueError). On CUDA that check would synchronise with the
    host every call, so it runs only with ``FRACTAL_KERNELS_DEBUG=1``; otherwise an out-of-range target makes
    its row's loss (and gradient) NaN on the fused kernels, and trips PyTorch's device-side assert on the
    torch backend."""
    _check(x, weight, bias, target, reduction)
    bias = bias.reshape(-1)
    v = weight.shape[0]
    if target.numel() and host_checks(target.device):
        live = target[target != ignore_index]
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= v):
            raise ValueError(f"target: values must be in [0, {v}) or ignore_index={ignore_index}; got min "
                             f"{int(live.min())}, max {int(live.max())}")
    which = resolve("pixel_cross_entropy", backend, x.device, shape_class=shape_class(V=v))
    with torch.autocast(x.device.type, enabled=False):  # documented fp32 logits; autocast would make them 16-bit
        if which == "torch" or x.shape[0] == 0:
            return pixel_cross_entropy_reference(x, weight, bias, target.long(), reduction, ignore_index)
        return _PixelCrossEntropy.apply(x, weight, bias, target.long().contiguous(), reduction, ignore_index, which)


def pixel_log_probs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``log p(target)`` per row, fp32 ``[N]`` (for NLL evaluation): ``-pixel_cross_entropy(..., "none")``."""
    return -pixel_cross_entropy(x, weight, bias, target, reduction="none", backend=backend)
