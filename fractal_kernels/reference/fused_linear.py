"""Reference math of :func:`fractal_kernels.ops.fused_linear.fused_linear`: a linear layer over many rows with the
LayerNorm before it and the bias, GELU or residual add after it in the same launch (issue #28 item 5: op-by-op
GEMMs with fused epilogues at large N).

For ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (nn.Linear layout):

* ``norm_weight`` / ``norm_bias`` given: a LayerNorm prologue, ``n = (x - mean) / sqrt(var + norm_eps) * w + b``
  (biased variance, over K), else ``n = x``;
* a 16-bit ``weight`` takes its input rounded to its dtype (autocast's cast before a 16-bit GEMM); fp32 weights
  take it as is;
* ``y = n @ weight^T (+ bias)``, products accumulated in fp32 (the reference: in ``compute_dtype``);
* ``act="gelu"``: ``y = gelu(y)`` (exact erf form, ``nn.GELU()``'s);
* ``residual`` ``[M, N]`` given: ``y = residual + y``;
* the output rounded once to ``out_dtype``.

``compute_dtype=torch.float64`` gives the exact value a test compares the kernel with. NaN or inf in a row of
``x`` (or ``residual``) reaches that row's output only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

_SIXTEEN = (torch.bfloat16, torch.float16)
ACTS = ("none", "gelu")


def fused_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                           norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                           norm_eps: float = 1e-5, act: str = "none", residual: Optional[torch.Tensor] = None,
                           out_dtype: Optional[torch.dtype] = None,
                           compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The op's math in ``compute_dtype`` with the kernel's two roundings (input to a 16-bit weight dtype, output
    to ``out_dtype``; default: ``residual``'s dtype, else ``weight``'s). ``x`` ``[M, K]`` -> ``[M, N]``."""
    if out_dtype is None:
        out_dtype = residual.dtype if residual is not None else weight.dtype
    n = x.to(compute_dtype)
    if norm_weight is not None:
        mean = n.mean(dim=-1, keepdim=True)
        var = ((n - mean) ** 2).mean(dim=-1, keepdim=True)
        n = (n - mean) / torch.sqrt(var + norm_eps) * norm_weight.to(compute_dtype)
        if norm_bias is not None:
            n = n + norm_bias.to(compute_dtype)
    if weight.dtype in _SIXTEEN:
        n = n.to(weight.dtype).to(compute_dtype)
    y = n @ weight.to(compute_dtype).t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    if act == "gelu":
        y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    if residual is not None:
        y = residual.to(compute_dtype) + y
    return y.to(out_dtype)
