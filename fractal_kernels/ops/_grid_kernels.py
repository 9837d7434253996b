"""The grid-wide barrier of the persistent schedules (``BARRIER=True``: one launch, every program resident), inlined
into the phased kernels (:mod:`fractal_kernels.ops.pixel_head.phased_kernels`,
:mod:`fractal_kernels.ops.ar_stack.phased_kernels`); the counters are :func:`fractal_kernels.ops._grid.barrier`'s.
GPU only: the interpreter runs programs one after another, so a barrier there would wait forever (the bodies sit
under ``if BARRIER:``, which the mutation tool reads as GPU-only). Defined only when triton is installed."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _grid_sync(bar_ptr, target, BARRIER: tl.constexpr):
        # every program adds 1 to the arrival counter, then waits until it holds ``target`` arrivals (all programs'
        # arrivals so far in this launch)
        if BARRIER:
            tl.debug_barrier()
            tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
            while seen < target:
                seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()

    @triton.jit
    def _grid_exit(bar_ptr, nprog, BARRIER: tl.constexpr):
        # the last program out resets both counters for the next launch (every program has left its last wait
        # once it adds to the exit count), so a replayed CUDA graph starts from zero too
        if BARRIER:
            tl.debug_barrier()
            gone = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
            if gone == nprog - 1:
                tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
