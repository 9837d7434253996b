"""Reference math of :func:`fractal_kernels.ops.skinny_linear.skinny_linear`: a linear layer over few rows with
its neighbours fused (issue #28 item 4: level steps that fill the GPU at small N).

For ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (nn.Linear layout):

* ``norm_weight`` given: an RMSNorm prologue, ``n = x * rsqrt(mean(x^2) + norm_eps) * norm_weight``, else ``n = x``;
* a 16-bit ``weight`` takes its input rounded to its dtype (what autocast does before a 16-bit GEMM); fp32
  weights take it as is;
* ``y = n @ weight^T (+ bias)``, products accumulated in fp32 (the reference: in ``compute_dtype``);
* ``gate`` ``[N, K]`` given (SwiGLU's ``w3``; same dtype as ``weight``): ``y = silu(y) * (n @ gate^T)``;
* ``residual`` ``[M, N]`` given: ``y = residual + y``;
* the output rounded once to ``out_dtype``.

Everything between the input rounding and the output rounding is ``compute_dtype`` (fp32 in the kernel);
``compute_dtype=torch.float64`` gives the exact value a test compares the kernel with, whatever the CPU's
BLAS summation order. NaN or inf in a row of ``x`` (or of ``residual``) reaches that row's output only.
"""
from __future__ import annotations

from typing import Optional

import torch

_SIXTEEN = (torch.bfloat16, torch.float16)


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                            norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5,
                            gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                            out_dtype: Optional[torch.dtype] = None,
                            compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The op's math in ``compute_dtype`` with the kernel's two roundings (input to a 16-bit weight dtype,
    output to ``out_dtype``; default: ``residual``'s dtype, else ``weight``'s). ``x`` ``[M, K]`` -> ``[M, N]``."""
    if out_dtype is None:
        out_dtype = residual.dtype if residual is not None else weight.dtype
    n = x.to(compute_dtype)
    if norm_weight is not None:
        n = n * torch.rsqrt((n * n).mean(dim=-1, keepdim=True) + norm_eps) * norm_weight.to(compute_dtype)
    if weight.dtype in _SIXTEEN:
        n = n.to(weight.dtype).to(compute_dtype)
    y = n @ weight.to(compute_dtype).t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    if gate is not None:
        y = y * torch.sigmoid(y) * (n @ gate.to(compute_dtype).t())
    if residual is not None:
        y = residual.to(compute_dtype) + y
    return y.to(out_dtype)
