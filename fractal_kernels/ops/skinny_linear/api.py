"""Skinny fused linear: the public entry point :func:`skinny_linear` (validation, backend choice through
:func:`fractal_kernels.dispatch.resolve`, the torch reference or the Triton launcher)."""
from __future__ import annotations

from typing import Optional

import torch

from fractal_kernels import dispatch
from fractal_kernels.ops._linear import resolve_backend
from fractal_kernels.ops.skinny_linear.launch import check, launch_triton
from fractal_kernels.reference.skinny_linear import skinny_linear_reference

OP = "skinny_linear"
dispatch.register_support(OP, "triton", dispatch._dtype_in(dispatch._KERNEL_DTYPES, "weight"))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5,
                  gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                  out_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None,
                  kv_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[residual +] epilogue(RMSNorm?(x) @ weight^T + bias)`` for few rows, in one launch that spreads the
    output columns over every SM (math: :mod:`fractal_kernels.reference.skinny_linear`).

    ``x`` ``[M, K]`` (rows any stride); ``weight`` ``[N, K]`` (nn.Linear layout, unit stride along K);
    ``bias`` ``[N]``; ``norm_weight`` ``[K]`` with ``norm_eps``: an RMSNorm of ``x`` first (fp32); ``gate``
    ``[N, K]`` in ``weight``'s dtype: SwiGLU, ``silu(x W^T) * (x gate^T)``; ``residual`` ``[M, N]``: added last
    (the residual stream: the output takes its dtype by default). ``out_dtype`` default: ``residual``'s dtype,
    else ``weight``'s (what autocast would return). ``backend``: None/"auto" (Triton on CUDA tensors, torch
    elsewhere), "triton" (CPU tensors need ``TRITON_INTERPRET=1``), "torch". ``M = 0`` returns ``[0, N]``
    without a launch.

    ``kv_out`` ``[2, M, H, D]`` (any strides: one position of a KV cache, e.g. ``cache.kv[:, :, :, pos]``) with
    ``N = 3 H D`` (an attention projection ``[q | k | v]``, no residual, no gate): the key and value columns go
    straight into it (rounded to the output dtype first, then to ``kv_out``'s, as copying the output there
    would), the op returns the q columns ``[M, H D]`` only: the AR step's cache write without its own launch.

    Meant for M up to 16 (AR decode steps, small batches): one program per ``BN`` columns, at least one per SM,
    each streaming its weight rows once; larger M re-reads the weights per 16 rows (a GEMM wins there;
    :func:`fractal_kernels.dispatch.choose_linear` decides).

    Shapes:
        x ``[M, K]``, weight / gate ``[N, K]``, bias ``[N]``, norm_weight ``[K]``, residual ``[M, N]`` ->
        ``[M, N]``; with kv_out ``[2, M, H, D]`` (N = 3 H D): -> ``[M, H D]``. Dtypes: fp32 / bf16 / fp16 (a 16-bit
        weight rounds its input to its dtype); accumulation fp32. Backends: "triton" (no backward: inputs that require
        grad under grad mode are refused), "torch" (autograd through the reference); no CUDA kernel.
    """
    out_dtype = check(x, weight, bias, norm_weight, norm_eps, gate, residual, out_dtype, kv_out)
    which = resolve_backend(OP, backend, x, weight, (x, weight, bias, norm_weight, gate, residual))
    m, n = x.shape[0], weight.shape[0]
    nq = n if kv_out is None else n - 2 * kv_out.shape[2] * kv_out.shape[3]
    if m == 0:
        return torch.empty(0, nq, dtype=out_dtype, device=x.device)
    if which == "torch":
        y = skinny_linear_reference(x, weight, bias, norm_weight=norm_weight, norm_eps=norm_eps, gate=gate,
                                    residual=residual, out_dtype=out_dtype)
        if kv_out is None:
            return y
        with torch.no_grad():  # a cache write, as the unfused path's copy_
            kv_out.copy_(y[:, nq:].reshape(m, 2, kv_out.shape[2], kv_out.shape[3]).transpose(0, 1))
        return y[:, :nq]
    out = torch.empty(m, nq, dtype=out_dtype, device=x.device)
    launch_triton(x, weight, bias, norm_weight, norm_eps, gate, residual, out, kv_out=kv_out)
    return out
