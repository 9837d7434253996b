"""Skinny fused linear: a linear layer over few rows (M <= 16: AR decode steps, small batches) that fills the GPU,
with its neighbours fused (issue #28 item 4).

At M = 2 (batch 1 with CFG) a linear is a matrix-vector product: its time is the weight bytes over the
bandwidth of the SMs that stream them. A GEMM's tiles (>= 16 output columns each, often 64-256) put a 512- or
1536-column weight on 8-96 CTAs of 132; this op splits the columns so there is at least one program per SM
(:func:`.launch.skinny_linear_config`), and folds into the same launch what op by op is separate launches around
it: the RMSNorm before it (every program reduces its few rows itself), the bias, SwiGLU's gate (a second weight
streamed beside the first: ``silu(x W1^T) * (x W3^T)``) and the residual add. An AR block is then 6 launches
(norm+wqkv, cache write, attention, wo+residual, norm+w1/w3+SwiGLU, w2+residual) instead of 13.

Numerics: :mod:`fractal_kernels.reference.skinny_linear` (fp32 accumulation; a 16-bit weight rounds its input to
its dtype; one rounding at the output).

Layers: :mod:`.kernels` (``@triton.jit``, only with triton) -> :mod:`.launch` (configuration, launcher, input
checks) -> :mod:`.api` (:func:`skinny_linear`, backend choice ``dispatch.resolve``).
"""
from fractal_kernels.ops.skinny_linear.kernels import HAS_TRITON  # noqa: F401
from fractal_kernels.ops.skinny_linear.launch import (SkinnyLinearConfig, check, grid, launch_triton,  # noqa: F401
                                                      skinny_linear_config)
from fractal_kernels.ops.skinny_linear.api import OP, skinny_linear  # noqa: F401
from fractal_kernels.ops.skinny_linear import api, kernels, launch  # noqa: F401

__all__ = ["skinny_linear", "skinny_linear_config"]
