"""Scratch workspaces of the Triton kernels (pixel head, block stacks): one allocator, so that a test can fill
every workspace with NaN before a launch (:func:`poisoned`). ``torch.empty`` memory is usually zeros or an
earlier launch's values, so a kernel that reads a workspace element before writing it can pass every test;
with NaN there the read reaches the output (issue #27)."""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch

_POISON: List[bool] = [False]


def workspace(numel: int, device: torch.device) -> torch.Tensor:
    """An fp32 scratch buffer of ``numel`` elements on ``device``: uninitialised, or all NaN inside
    :func:`poisoned`."""
    if _POISON[-1]:
        return torch.full((numel,), float("nan"), dtype=torch.float32, device=device)
    return torch.empty(numel, dtype=torch.float32, device=device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Inside the block every :func:`workspace` starts as NaN (tests: a read before write shows up)."""
    _POISON.append(True)
    try:
        yield
    finally:
        _POISON.pop()
