"""Fused pixel cross-entropy: the row launcher (Triton kernel or CUDA extension), the chunked fp32 GEMM loop
around it and the input checks."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fractal_kernels.dispatch import triton_interpreting

from fractal_kernels.ops.pixel_cross_entropy.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.pixel_cross_entropy.kernels import _ce_rows_kernel

CHUNK_ROWS = 8192
REDUCTIONS = ("mean", "sum", "none")


class CeRowsConfig(NamedTuple):
    """Launch configuration of ``_ce_rows_kernel`` for one vocabulary size and device."""
    block_n: int  # rows per program
    block_v: int  # the vocabulary padded to a power of two


def ce_rows_config(v: int, device: torch.device, *, arch: Optional[int] = None,
                   interpret: Optional[bool] = None) -> CeRowsConfig:
    """The one place the row kernel's configuration is chosen: 2048 elements a program on a GPU (any arch),
    131072 in the interpreter (``interpret``, default: CPU tensors under it), which pays per program."""
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    block_v = max(16, triton.next_power_of_2(v))
    return CeRowsConfig(max(1, (131072 if interpret else 2048) // block_v), block_v)


def _rows(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, ignore_index: int, write_grad: bool,
          row_scale: Optional[torch.Tensor], backend: str) -> None:
    m, v = logits.shape
    if m == 0:
        return
    if backend == "triton":
        block_n, block_v = ce_rows_config(v, logits.device)
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
