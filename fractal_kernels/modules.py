"""Kept for old imports: :func:`swap_attention` lives in :mod:`fractal_kernels.nn` (with the drop-ins)."""
from fractal_kernels.nn.backend import BACKENDS
from fractal_kernels.nn.swap import swap_attention

__all__ = ["BACKENDS", "swap_attention"]
