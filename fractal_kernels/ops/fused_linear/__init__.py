"""Fused linear: a GEMM over many rows with the LayerNorm before it and the bias, GELU or residual add after it in
the same launch (issue #28 item 5: op-by-op GEMMs with fused epilogues at large N).

At batch 64-256 a MAR level's step is bound by HBM traffic of its activations, not by its GEMMs: op by op a block
writes and re-reads ``[N*L, D]`` activations around every LayerNorm, GELU and residual add. Here each linear reads
its input once (the LayerNorm statistics are a prologue over the program's rows, from L2) and writes its output
once (bias, GELU, residual in the epilogue), so a MAR block is 5 launches (LN1+qkv, attention, proj+residual,
LN2+fc1+GELU, fc2+residual) instead of 10. The output tile is the largest (128 x 128 / 64 x 128 / 64 x 64) whose
grid still has a program per SM (:func:`.launch.fused_linear_config`), so the MAR levels' big weights at batch 1
are streamed by the whole chip too. 16-bit weights: tensor-core dots with fp32 accumulation (wgmma where Triton
picks it on sm_90), 3 pipeline stages.

Numerics: :mod:`fractal_kernels.reference.fused_linear`. Layers: :mod:`.kernels` -> :mod:`.launch` -> :mod:`.api`.
"""
from fractal_kernels.ops.fused_linear.kernels import HAS_TRITON  # noqa: F401
from fractal_kernels.ops.fused_linear.launch import (FusedLinearConfig, check, fused_linear_config,  # noqa: F401
                                                     grid, launch_triton)
from fractal_kernels.ops.fused_linear.api import OP, fused_linear  # noqa: F401
from fractal_kernels.ops.fused_linear import api, kernels, launch  # noqa: F401

__all__ = ["fused_linear", "fused_linear_config"]
