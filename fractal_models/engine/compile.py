"""``generate(compile=True / cuda_graphs=True)``: compiled pieces of the fast generation engine.

What is compiled: every MAR level's transformer stack (``MAR.blocks_eval``, the bulk of each step's
operators). The random draws, the schedule and the gathers stay eager, so a compiled run consumes the RNG
exactly like an eager one. With ``cuda_graphs`` the stacks are compiled with ``mode="reduce-overhead"``
(CUDA graphs) and their batch rows padded to the next power of two, so a handful of graphs serve every
step's varying number of rows instead of one capture per size (dynamo recompiles once per bucket; past
its ``cache_size_limit`` it runs that shape eagerly, with a warning). AR levels stay eager: their KV-cache
updates are in-place writes into Python-held tensors, which graphs would freeze (their opt-in per-position graphs,
with static caches, are ``step_graphs``: :mod:`fractal_models.engine.graphs`). The pixel heads need no
graph on a GPU: on a kernel backend each call is one fused launch already.

Status: ``compile=True`` is tested on a CPU (inductor); the ``cuda_graphs`` path has not run on a GPU yet.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _padded(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run ``fn`` on rows padded to a power of two (rows are independent), return the real rows."""
    def run(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = _bucket(n)
        if b != n:
            x = torch.cat([x, x.new_zeros(b - n, *x.shape[1:])])
        # reduce-overhead replays write into graph-owned outputs: clone before the next replay reuses them
        return fn(x)[:n].clone()
    return run


@contextlib.contextmanager
def compiled_levels(model: torch.nn.Module, *, cuda_graphs: bool = False) -> Iterator[None]:
    """Install compiled transformer stacks on every MAR level of ``model`` for the duration of the block.

    The MAR levels are the modules with a ``blocks_eval`` stack (found by that method: this package never imports
    the paper's modules, which call into it). The compiled functions are cached on the modules
    (``_compiled_cache``), so later calls reuse them; :func:`fractal_models.engine.mar.sample` runs the installed one."""
    installed = []
    try:
        for m in model.modules():
            if callable(getattr(m, "blocks_eval", None)):
                cache = m.__dict__.setdefault("_compiled_cache", {})
                if cuda_graphs not in cache:
                    if cuda_graphs:
                        cache[True] = _padded(torch.compile(m.blocks_eval, mode="reduce-overhead", dynamic=False))
                    else:
                        cache[False] = torch.compile(m.blocks_eval, dynamic=True)
                m.__dict__["_compiled_blocks"] = cache[cuda_graphs]
                installed.append(m)
        yield
    finally:
        for m in installed:
            m.__dict__.pop("_compiled_blocks", None)
