"""Skinny fused linear: the public entry point :func:`skinny_linear` (validation, backend choice through
:func:`fractal_kernels.dispatch.resolve`, the torch reference or the Triton launcher)."""
from __future__ import annotations

from typing import Optional

import torch

from fractal_kernels import dispatch
from fractal_kernels.ops._linear import refuse_grad
from fractal_kernels.ops.skinny_linear.launch import check, launch_triton
from fractal_kernels.reference.skinny_linear import skinny_linear_reference

OP = "skinny_linear"
dispatch.register_support(OP, "triton", dispatch._dtype_in(dispatch._KERNEL_DTYPES, "weight"))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5,
                  gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                  out_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``[residual +] epilogue(RMSNorm?(x) @ weight^T + bias)`` for few rows, in one launch that spreads the
    output columns over every SM (math: :mod:`fractal_kernels.reference.skinny_linear`).

    ``x`` ``[M, K]`` (rows any stride); ``weight`` ``[N, K]`` (nn.Linear layout, unit stride along K);
    ``bias`` ``[N]``; ``norm_weight`` ``[K]`` with ``norm_eps``: an RMSNorm of ``x`` first (fp32); ``gate``
    ``[N, K]`` in ``weight``'s dtype: SwiGLU, ``silu(x W^T) * (x gate^T)``; ``residual`` ``[M, N]``: added last
    (the residual stream: the output takes its dtype by default). ``out_dtype`` default: ``residual``'s dtype,
    else ``weight``'s (what autocast would return). ``backend``: None/"auto" (Triton on CUDA tensors, torch
    elsewhere), "triton" (CPU tensors need ``TRITON_INTERPRET=1``), "torch". ``M = 0`` returns ``[0, N]``
    without a launch.

    Meant for M up to 16 (AR decode steps, small batches): one program per ``BN`` columns, at least one per SM,
    each streaming its weight rows once; larger M re-reads the weights per 16 rows (a GEMM wins there;
    :func:`fractal_kernels.dispatch.choose_linear` decides).

    Shapes:
        x ``[M, K]``, weight / gate ``[N, K]``, bias ``[N]``, norm_weight ``[K]``, residual ``[M, N]`` ->
        ``[M, N]``. Dtypes: fp32 / bf16 / fp16 (a 16-bit weight rounds its input to its dtype); accumulation
        fp32. Backends: "triton" (no backward: inputs that require grad under grad mode are refused), "torch"
        (autograd through the reference); no CUDA kernel.
    """
    out_dtype = check(x, weight, bias, norm_weight, norm_eps, gate, residual, out_dtype)
    which = dispatch.resolve(OP, backend, x.device, dtype=weight.dtype)
    if which not in ("triton", "torch"):
        raise dispatch.BackendUnavailable(f"{OP}: no {which!r} kernel for this op; use 'triton', 'torch' or None")
    m, n = x.shape[0], weight.shape[0]
    if which == "triton":
        refuse_grad(OP, (x, weight, bias, norm_weight, gate, residual))
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=x.device)
    if which == "torch":
        return skinny_linear_reference(x, weight, bias, norm_weight=norm_weight, norm_eps=norm_eps, gate=gate,
                                       residual=residual, out_dtype=out_dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    launch_triton(x, weight, bias, norm_weight, norm_eps, gate, residual, out)
    return out
