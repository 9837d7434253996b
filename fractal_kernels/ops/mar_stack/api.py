"""Fused MAR block stack: the public entry point :func:`mar_block_stack` (validation, backend choice through
:func:`fractal_kernels.dispatch.resolve`, the torch reference or the Triton launch)."""
from __future__ import annotations

from typing import Optional

import torch

from fractal_kernels.dispatch import resolve
from fractal_kernels.ops.mar_stack.launch import _launch_triton, check, check_triton
from fractal_kernels.reference.mar_stack import MarStackWeights, mar_block_stack_reference

OP = "mar_block_stack"


def mar_block_stack(x: torch.Tensor, weights: MarStackWeights, num_heads: int, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """A MAR level's blocks and final LayerNorm on ``x`` ``[N, L, D]``; returns ``[N, L, D]`` in x's dtype.

    ``weights`` from :func:`fractal_kernels.reference.mar_stack.pack_mar_stack` (matrices fp32 / bf16 / fp16);
    ``num_heads`` divides D. Math: :mod:`fractal_kernels.reference.mar_stack` (fp32, each linear's input rounded to
    the weight dtype). ``backend``: None/"auto" (Triton on CUDA tensors, PyTorch on CPU ones), "triton" (on CPU
    tensors only under ``TRITON_INTERPRET=1``; takes L <= ``dispatch.MAR_STACK_MAX_L`` = 64, longer raises
    ValueError) or "torch". The Triton kernel is one launch for the whole stack.

    Math:
        Per block: ``x = x + proj(attn(LN1(x)))``, ``x = x + fc2(gelu(fc1(LN2(x))))`` (bidirectional attention,
        scores ``q k^T * head_dim ** -0.5`` and softmax in fp32, exact GELU); then the final ``LN(x)``. All math
        fp32; each linear's input rounded to the weight dtype first (as autocast does), products accumulated in
        fp32. Close to, not bit-equal with, the op-by-op path (fp32 <= 2e-5; 16-bit <= 3e-2 max, 5e-4 mean).

    Shapes:
        x ``[N, L, D]`` -> ``[N, L, D]`` in x's dtype; weights ``[depth, ...]`` (``D`` the width, ``M`` the MLP
        width), ``num_heads`` divides D. Dtypes: x fp32 / bf16 / fp16; weight matrices fp32 / bf16 / fp16, norms
        and biases fp32. Backends: "triton" (L <= 64, one launch for the whole stack), "torch" (any L); no CUDA
        kernel.
    """
    w = check(x, weights, num_heads)
    which = resolve(OP, backend, x.device, dtype=x.dtype)
    if which == "torch":
        return mar_block_stack_reference(x, w, num_heads)
    check_triton(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or x.shape[1] == 0:
        return out
    _launch_triton(x if x.is_contiguous() else x.contiguous(), w, num_heads, out)
    return out
