"""The argument checks and call guards :func:`~fractal_kernels.ops.skinny_linear.skinny_linear` and
:func:`~fractal_kernels.ops.fused_linear.fused_linear` share (an ``x [M, K] @ weight [N, K]^T`` linear with a bias
and a residual); each op adds the checks of its own prologue / epilogue between :func:`check_core` and
:func:`check_output`."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

from fractal_kernels import dispatch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def shape_of(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_vector(name: str, t, size: int, what: str, role: str = "") -> None:
    """``t`` a contiguous float ``[size]`` tensor (``what``: the dimension's letter; ``role``: said after it)."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,) or not t.is_floating_point() or t.stride(0) != 1:
        raise ValueError(f"{name}: expected a contiguous float [{what}={size}] tensor{role}, got {shape_of(t)}")


def check_eps(norm_eps) -> None:
    if not isinstance(norm_eps, (int, float)) or isinstance(norm_eps, bool) or not 0 <= norm_eps < float("inf"):
        raise ValueError(f"norm_eps: expected a finite number >= 0, got {norm_eps!r}")


def check_core(x, weight, bias, others: Iterable[Tuple[str, Optional[torch.Tensor]]]) -> Tuple[int, int, int]:
    """``x``, ``weight`` (layout, dtypes, sizes), every tensor on ``x``'s device (``others``: the op's own too),
    ``bias``; returns ``(M, N, K)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a float [M, K] tensor, got {shape_of(x)}"
                         f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x: expected fp32 / bf16 / fp16, got {x.dtype}")
    m, k = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight: expected an [N, K={k}] tensor (nn.Linear layout), got {shape_of(weight)}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"weight: expected fp32 / bf16 / fp16, got {weight.dtype}")
    if k < 1 or weight.shape[0] < 1:
        raise ValueError(f"weight: expected in_features >= 1 and out_features >= 1, got {shape_of(weight)}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight: expected unit stride along K, got strides {weight.stride()}")
    n = weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias), *others):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x on {x.device}")
    if bias is not None:
        check_vector("bias", bias, n, "N")
    return m, n, k


def check_output(residual, m: int, n: int, weight: torch.Tensor, out_dtype) -> torch.dtype:
    """``residual`` ``[M, N]``; the output dtype (default: the residual's, else the weight's)."""
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (m, n) \
                or residual.dtype not in DTYPES or (m > 0 and residual.stride(1) != 1):
            raise ValueError(f"residual: expected a float [M={m}, N={n}] tensor with unit stride along N, got "
                             f"{shape_of(residual)}")
    if out_dtype is None:
        out_dtype = residual.dtype if residual is not None else weight.dtype
    if out_dtype not in DTYPES:
        raise TypeError(f"out_dtype: expected fp32 / bf16 / fp16 or None, got {out_dtype}")
    return out_dtype


def refuse_grad(op: str, tensors: Iterable[Optional[torch.Tensor]]) -> None:
    """The Triton kernels have no backward: inputs that require grad under grad mode are an error."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op}: the Triton kernel has no backward (an inference op: the sampling steps); run it "
                           f"under torch.no_grad() / inference_mode(), or use backend='torch' for gradients")


def resolve_backend(op: str, backend: Optional[str], x: torch.Tensor, weight: torch.Tensor,
                    tensors: Iterable[Optional[torch.Tensor]]) -> str:
    """The linear op's backend ("triton" or "torch": neither has a CUDA kernel) through ``dispatch.resolve``; on
    Triton, :func:`refuse_grad` of ``tensors``."""
    which = dispatch.resolve(op, backend, x.device, dtype=weight.dtype)
    if which not in ("triton", "torch"):
        raise dispatch.BackendUnavailable(f"{op}: no {which!r} kernel for this op; use 'triton', 'torch' or None")
    if which == "triton":
        refuse_grad(op, tensors)
    return which

