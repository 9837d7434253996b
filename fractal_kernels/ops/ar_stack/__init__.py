"""Fused AR block stack decode step: every block of one AR level's KV-cached sampling step, plus the level's
final LayerNorm, in ONE Triton launch (issue 16: launches per image).

The AR level (``fractal_models.ar``: LlamaGen blocks, RMSNorm, 2-D RoPE, SwiGLU) samples its patches one
position at a time; op by op that is ~13 launches per block per step. Every row (sequence) is independent, so
one Triton program runs the whole stack for a tile of ``BM = 16`` rows (padding rows masked).

Kernel design (:func:`.kernels._ar_stack_decode_kernel`, configuration :func:`.launch.ar_stack_config`):

* per program an fp32 scratch in global memory (``torch.empty`` workspace, L1/L2 resident): the residual
  stream ``[BM, D]``, the staged dot operand ``[BM, D]``, q/k/v ``[BM, 3D]``, the SwiGLU hidden ``[BM, M]``;
  stages separated by ``tl.debug_barrier()``: RMSNorm -> wqkv -> RoPE + cache write -> attention -> wo +
  residual -> RMSNorm -> w1/w3 + silu*mul -> w2 + residual, for every block, then the final LayerNorm;
* weights read in ``[KC, NC]`` tiles by ``tl.dot`` with fp32 accumulation (16-bit weights: the input rounded
  to the weight dtype first, as autocast; fp32 weights: "ieee" fp32 dots), so registers stay bounded whatever
  the width; blocks, chunks, heads and key chunks are runtime loops; the block count, ``pos``, the row count and
  the cache length are runtime arguments (one compile per width / heads / hidden / dtypes);
* attention of the one new query per head over keys ``0..pos``: an online softmax over ``KB``-key chunks of
  ``[BM, KB, HD]`` broadcast products (fp32);
* the cache ``[NB, 2, B, T, D]`` (:func:`~fractal_kernels.reference.ar_stack.ar_stack_cache`) holds rotated
  keys and values in its own dtype (fp32 by default, as the reference's).

Numerics: all fp32 except the 16-bit rounding of each linear's input (16-bit weights); agrees with the torch
backend (:func:`fractal_kernels.reference.ar_stack.ar_block_stack_decode_reference`) to summation order.

Schedules (``ar_block_stack_decode(schedule=...)``): that kernel is ``"tiles"``; ``"phases"`` / ``"persistent"``
run the same math as :mod:`.phased_kernels` (the step cut into phases split over the whole grid, a launch per
phase or one launch with grid barriers; :mod:`.phased`), chosen by ``policy.schedule_rule`` (op ``ar_step``).

Layers: :mod:`.kernels` / :mod:`.phased_kernels` (``@triton.jit``, only with triton) -> :mod:`.launch` /
:mod:`.phased` (configuration, launcher, input checks) -> :mod:`.api` (:func:`ar_block_stack_decode`, backend
choice ``dispatch.resolve``).
"""
from fractal_kernels.ops.ar_stack.kernels import HAS_TRITON  # noqa: F401
from fractal_kernels.ops.ar_stack.launch import BM, ArStackConfig, ar_stack_config, check, launch_triton  # noqa: F401
from fractal_kernels.ops.ar_stack.api import OP, ar_block_stack_decode  # noqa: F401
from fractal_kernels.reference.ar_stack import ArStackWeights, ar_stack_cache, pack_ar_stack  # noqa: F401
from fractal_kernels.ops.ar_stack import api, kernels, launch  # noqa: F401

__all__ = ["ArStackWeights", "ar_block_stack_decode", "ar_stack_cache", "pack_ar_stack"]
