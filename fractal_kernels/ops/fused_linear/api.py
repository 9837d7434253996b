"""Fused linear: the public entry point :func:`fused_linear` (validation, backend choice through
:func:`fractal_kernels.dispatch.resolve`, the torch reference or the Triton launcher)."""
from __future__ import annotations

from typing import Optional

import torch

from fractal_kernels import dispatch
from fractal_kernels.ops._linear import resolve_backend
from fractal_kernels.ops.fused_linear.launch import check, launch_triton
from fractal_kernels.reference.fused_linear import fused_linear_reference

OP = "fused_linear"
dispatch.register_support(OP, "triton", dispatch._dtype_in(dispatch._KERNEL_DTYPES, "weight"))


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                 norm_eps: float = 1e-5, act: str = "none", residual: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``[residual +] act(LayerNorm?(x) @ weight^T + bias)`` in one launch (math:
    :mod:`fractal_kernels.reference.fused_linear`): a GEMM over many rows (the MAR levels: N sequences x L tokens)
    that reads its input once and writes its output once, where op by op the LayerNorm, the GELU and the
    residual add each read and write the activations again.

    ``x`` ``[M, K]`` (rows any stride); ``weight`` ``[N, K]`` (nn.Linear layout, unit stride along K); ``bias``
    ``[N]``; ``norm_weight`` / ``norm_bias`` ``[K]`` with ``norm_eps``: a LayerNorm of ``x`` first (fp32);
    ``act``: "none" or "gelu" (exact erf); ``residual`` ``[M, N]``: added last (the output takes its dtype by
    default). ``out_dtype`` default: ``residual``'s dtype, else ``weight``'s (what autocast would return).
    ``backend``: None/"auto" (Triton on CUDA tensors, torch elsewhere), "triton" (CPU tensors need
    ``TRITON_INTERPRET=1``), "torch". ``M = 0`` returns ``[0, N]`` without a launch.

    Shapes:
        x ``[M, K]``, weight ``[N, K]``, bias ``[N]``, norm_weight / norm_bias ``[K]``, residual ``[M, N]`` ->
        ``[M, N]``. Dtypes: fp32 / bf16 / fp16 (a 16-bit weight rounds its input to its dtype; tensor cores);
        accumulation fp32. Backends: "triton" (no backward: inputs that require grad under grad mode are
        refused), "torch" (autograd through the reference); no CUDA kernel.
    """
    out_dtype = check(x, weight, bias, norm_weight, norm_bias, norm_eps, act, residual, out_dtype)
    which = resolve_backend(OP, backend, x, weight, (x, weight, bias, norm_weight, norm_bias, residual))
    m, n = x.shape[0], weight.shape[0]
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=x.device)
    if which == "torch":
        return fused_linear_reference(x, weight, bias, norm_weight=norm_weight, norm_bias=norm_bias,
                                      norm_eps=norm_eps, act=act, residual=residual, out_dtype=out_dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    launch_triton(x, weight, bias, norm_weight, norm_bias, norm_eps, act, residual, out)
    return out
