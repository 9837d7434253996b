"""When a drop-in module runs the kernels, and with which ``backend`` argument.

A module's ``backend`` attribute is one of :data:`BACKENDS`: ``"torch"`` keeps the module's own reference math
(op for op the public code's); the others route the call through the ``fractal_kernels`` ops, whose dispatch
(:mod:`fractal_kernels.dispatch`) then picks the kernel. These helpers are the modules' whole policy.
"""
from __future__ import annotations

from typing import Optional

import torch

#: the values a module's ``backend`` attribute takes
BACKENDS = ("torch", "auto", "triton", "cuda")


def use_kernel(backend: str, device: Optional[torch.device] = None) -> bool:
    """Whether a module runs the ``fractal_kernels`` ops instead of its reference math: any backend but
    "torch", except "auto" on a non-CUDA device, where the ops would pick their PyTorch reference anyway and
    the module's own reference math (fewer ops, reference-exact) is used instead. With attention dropout in
    training the kernels draw their own Philox mask (same distribution as the reference's ``torch.dropout``,
    another stream of random numbers)."""
    if backend == "torch":
        return False
    if backend == "auto" and device is not None and device.type != "cuda":
        return False
    return True


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` (torch >= 2.4 takes the device; older ones have per-device
    functions)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def attn_dropout(module_training: bool, p: float) -> float:
    """The dropout probability an attention call applies (0 in eval mode)."""
    return p if module_training else 0.0


def kernel_backend(backend: str):
    """Module backend name -> the ops' ``backend`` argument ("auto" lets the dispatcher choose)."""
    return None if backend == "auto" else backend
