"""When the ops validate argument *values* that live on the device.

Checking, say, that every ``seqlens`` entry lies in ``[0, L]`` needs the values on the host: on a CUDA tensor
that is a device-to-host copy and a stream synchronisation per call, which the sampling loops (thousands of
tiny calls) cannot afford. So such checks run on CPU tensors (nothing to synchronise; the error stays clear)
and on CUDA only when ``FRACTAL_KERNELS_DEBUG=1``. Without them the kernels stay memory-safe on bad values
and say so where they can (each op documents what a bad value does: clamped lengths, a NaN loss row).
"""
from __future__ import annotations

import os

import torch


def debug_checks() -> bool:
    """``FRACTAL_KERNELS_DEBUG=1``: run the value checks on every device (read per call, so tests and users
    can toggle it)."""
    return os.environ.get("FRACTAL_KERNELS_DEBUG") == "1"


#: device types whose value checks are skipped outside debug mode (each would be a host sync per call)
DEFERRED_CHECK_DEVICES = frozenset({"cuda"})


def host_checks(device: torch.device) -> bool:
    """Whether an op may read device values to validate them: always off CUDA, on CUDA only in debug mode."""
    return device.type not in DEFERRED_CHECK_DEVICES or debug_checks()
