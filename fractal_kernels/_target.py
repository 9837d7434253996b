"""Which GPU architecture a Triton launch is specialised for.

Launchers pick tile sizes, ``num_warps`` and ``num_stages`` per architecture (an sm_80 block has 163 KB of
shared memory, an sm_90 block 227 KB; wgmma exists only on sm_90). They ask :func:`device_arch` rather
than ``torch.cuda.get_device_capability`` so that the ahead-of-time compile gate (``benchmarks.aot``) can
replay a launcher for sm_80 and sm_90 on a machine without a GPU (:func:`target_arch`), and so that the
capability is read once per device, not per call.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch

#: the architecture assumed where no GPU says otherwise (the Triton interpreter, CPU tensors)
DEFAULT_ARCH = 90
_OVERRIDE: Optional[int] = None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, arch: int) -> int:
    """SMs a persistent grid is sized for: the CUDA device's own (cached), else those of ``arch``'s reference GPU
    (an H100 SXM for sm_90, an A100 for sm_80: the AOT replay). Only grid sizes depend on it, not the code."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _sm_count_cuda(torch.cuda.current_device() if device.index is None else device.index)
    return 132 if arch >= 90 else 108


def device_arch(device: Optional[torch.device] = None) -> int:
    """The compute capability a launch on ``device`` compiles for, as ``10 * major + minor`` (90, 80, ...).

    Inside :func:`target_arch` that architecture; on a CUDA device its capability (cached); otherwise
    :data:`DEFAULT_ARCH`."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index
        return _capability(torch.cuda.current_device() if index is None else index)
    return DEFAULT_ARCH


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Make every launcher specialise for ``arch`` (e.g. 80 or 90) inside the block, whatever the device."""
    global _OVERRIDE
    if not isinstance(arch, int) or arch < 70:
        raise ValueError(f"arch: expected a compute capability like 80 or 90, got {arch!r}")
    previous, _OVERRIDE = _OVERRIDE, arch
    try:
        yield
    finally:
        _OVERRIDE = previous
