"""Fused MAR block stack: every transformer block of a MAR level's sampling step and its final LayerNorm in ONE
Triton launch (instead of ~10 launches per block op by op).

Kernel design (the pixel head's, :mod:`fractal_kernels.ops.pixel_head`, scaled to a sequence):

* a persistent grid (at most 2 programs per SM): each program runs whole sequences, one after another, in an fp32
  scratch of its own in global memory (L1/L2 resident): the residual stream, a staged dot operand, the qkv
  projection and the MLP hidden, ``LP * (5 D + M)`` floats (``LP`` = L padded to a power of two >= 16);
* stages separated by ``tl.debug_barrier()``: LN1 -> qkv GEMM -> per-head attention -> proj + residual -> LN2 ->
  fc1 + GELU -> fc2 + residual, per block; blocks are a runtime loop (``depth`` is an argument), then the final
  LayerNorm writes the output;
* every GEMM reads [K-chunk, N-chunk] weight tiles straight from the nn.Linear layout with ``tl.dot`` (fp32
  accumulation), output columns and K in runtime chunk loops: registers and code size do not grow with the width
  or the depth; D, M and the head dim need not be powers of two (masked chunks);
* one compiled variant per (D, heads, M, LP, weight dtype); N, L and depth are runtime ints.

Numerics (:mod:`fractal_kernels.reference.mar_stack`): fp32 math; fp32 weights take fp32 "ieee" dots, 16-bit
weights round each linear's input to their dtype and take tensor-core dots (what autocast does, but with fp32
outputs). Attention in fp32. A NaN in a sequence spreads to all of it, as in the model.

Limits: L <= ``fractal_kernels.dispatch.MAR_STACK_MAX_L`` (64) on the Triton backend (the small levels; longer
raises ValueError). Layers: :mod:`.kernels` (``@triton.jit``), :mod:`.launch` (configuration, launcher, checks),
:mod:`.api` (:func:`mar_block_stack`).
"""
from fractal_kernels.ops.mar_stack.api import OP, mar_block_stack  # noqa: F401
from fractal_kernels.ops.mar_stack.kernels import HAS_TRITON  # noqa: F401
from fractal_kernels.ops.mar_stack.launch import MarStackConfig, mar_stack_config  # noqa: F401
from fractal_kernels.reference.mar_stack import MarStackWeights, mar_block_stack_reference, pack_mar_stack  # noqa: F401
from fractal_kernels.ops.mar_stack import api, kernels, launch  # noqa: F401

if HAS_TRITON:
    from fractal_kernels.ops.mar_stack.kernels import _mar_stack_kernel  # noqa: F401
