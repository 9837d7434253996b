"""Fused AR block stack decode step: the public entry point :func:`ar_block_stack_decode` (validation, backend
choice through :func:`fractal_kernels.dispatch.resolve`, the torch reference or the Triton launcher)."""
from __future__ import annotations

from typing import Optional

import torch

from fractal_kernels import dispatch
from fractal_kernels.ops.ar_stack.launch import check, launch_triton
from fractal_kernels.ops.ar_stack.phased import launch_phased
from fractal_kernels.reference.ar_stack import ArStackWeights, ar_block_stack_decode_reference

OP = "ar_block_stack_decode"
dispatch.register_support(OP, "triton", dispatch._dtype_in(dispatch._KERNEL_DTYPES, "weights"))


def ar_block_stack_decode(x: torch.Tensor, weights: ArStackWeights, cache: torch.Tensor, pos: int,
                          freqs_cis: torch.Tensor, num_heads: int, *, backend: Optional[str] = None,
                          schedule: Optional[str] = None) -> torch.Tensor:
    """One KV-cached decode step of an AR level's whole block stack and its final LayerNorm; returns ``[B, D]``
    in ``x``'s dtype and writes position ``pos`` of ``cache`` (math: :mod:`fractal_kernels.reference.ar_stack`).

    ``x`` ``[B, D]``: the new token of every row (after the level's ``patch_emb_ln``), each row its own sequence;
    ``weights`` from :func:`~fractal_kernels.reference.ar_stack.pack_ar_stack`; ``cache`` ``[NB, 2, B, T, D]``
    from :func:`~fractal_kernels.reference.ar_stack.ar_stack_cache` (rotated keys); ``pos`` in ``[0, T)`` (a
    runtime kernel argument: one compile serves every step); ``freqs_cis`` the level's fp32 RoPE table
    ``[>pos, HD/2, 2]``. ``backend``: None/"auto" (Triton on CUDA tensors, torch elsewhere), "triton" (CPU
    tensors need ``TRITON_INTERPRET=1``), "torch". An empty batch returns ``[0, D]`` without a launch.

    ``schedule`` (the Triton backend's work split; None/"auto": :func:`fractal_kernels.dispatch.choose_schedule`):
    "tiles" (one program runs a 16-row tile's whole stack: one CTA at batch 1), "phases" (the step cut into
    ``2 + 5 NB`` phases, each split over the grid by output columns / (row, head), a launch per phase;
    :mod:`.phased`), "persistent" (those phases in one launch with grid barriers: CUDA only, never the default
    until a GPU run has measured it). The same math; another summation order.

    Math:
        Per block, for the new token ``h`` of every row: ``n = RMSNorm(h)``, ``q, k, v = n @ wqkv^T``, q and k
        rotated by RoPE row ``pos``, the rotated key and the value written to ``cache[..., pos, :]``, ``q`` attends
        keys ``0..pos`` (scale ``head_dim ** -0.5``, fp32 scores and softmax), ``h = h + o @ wo^T``; then
        ``n = RMSNorm(h)``, ``h = h + (silu(n @ w1^T) * (n @ w3^T)) @ w2^T``; finally ``LayerNorm(h)``. Residual
        stream fp32; 16-bit weights take their input rounded to their dtype, products accumulated in fp32.

    Shapes:
        x ``[B, D]`` -> ``[B, D]`` in x's dtype; ``cache`` ``[NB, 2, B, T, D]`` (keys, values); ``freqs_cis``
        ``[>pos, HD/2, 2]`` fp32 with ``HD = D / num_heads``. Dtypes: x, cache and weight matrices fp32 / bf16 /
        fp16; norms fp32. Backends: "triton" (one launch per step, 16 rows per program), "torch"; no CUDA kernel.
    """
    w = check(x, weights, cache, pos, freqs_cis, num_heads)
    which = dispatch.resolve(OP, backend, x.device, dtype=w.wqkv.dtype)
    if schedule not in (None, "auto", "tiles") and which != "triton":
        raise ValueError(f"schedule: {schedule!r} is a split of the Triton kernel; backend {which!r} runs the "
                         f"reference (use schedule=None, or backend='triton')")
    if which not in ("triton", "torch"):
        raise dispatch.BackendUnavailable(f"{OP}: no {which!r} kernel for this op; use 'triton', 'torch' or None")
    bsz, dim = x.shape
    if bsz == 0:
        return torch.empty(0, dim, dtype=x.dtype, device=x.device)
    if which == "torch":
        return ar_block_stack_decode_reference(x, w, cache, pos, freqs_cis, num_heads)
    out = torch.empty(bsz, dim, dtype=x.dtype, device=x.device)
    sched, _ = dispatch.choose_schedule("ar_step", schedule, x.device, dim, bsz, w.wqkv.dtype)
    if sched == "tiles":
        launch_triton(x, w, cache, pos, freqs_cis, num_heads, out)
    else:
        launch_phased(x, w, cache, pos, freqs_cis, num_heads, out, schedule=sched)
    return out

