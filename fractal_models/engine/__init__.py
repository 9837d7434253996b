"""The fast generation engine: what ``generate(fast=True)`` (the default) runs instead of the reference's loops.

``mar`` (host-planned MAR level loops, no host sync per step), ``ar`` (lean KV-cached AR steps, the decode kernel
on a kernel backend), ``pixel_head`` (the KV-cached or fused pixel heads and their caches) and ``compile``
(``generate(compile=True / cuda_graphs=True)``: compiled MAR transformer stacks). Same random draws in the same
order as the reference loops; on the torch backend in fp32, the same images bit for bit (tested).

Layering: this package imports ``fractal_kernels`` and :mod:`fractal_models.layers` only, never the paper's
modules (``mar``, ``ar``, ``pixelloss``, ``fractalgen``): its functions take a level module and read it through
its attributes, and those modules call into it when ``fast`` / ``use_cache`` is asked. ``tests/test_layering.py``
enforces this.
"""
from fractal_models.engine.compile import _bucket, _padded, compiled_levels  # noqa: F401

__all__ = ["compiled_levels"]
