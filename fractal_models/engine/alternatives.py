"""The opt-in alternatives of a level step's linears (the AR skinny-linear step, the MAR fused-linear step): one
decision for both, read by ``engine.ar.explain_skinny_step`` and ``engine.mar.explain_fused_linear_step``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fractal_kernels import dispatch, policy
from fractal_models.layers import autocast_on, kernel_backend, use_kernel


def explain_alternative(m, device: torch.device, backend, policy_only: bool, n: Optional[int], *, attention,
                        weight: torch.Tensor, width: int, op: str, kernel_op: str, attr: str,
                        what: str) -> Tuple[Optional[str], str]:
    """(backend of ``kernel_op`` or None, why) for level ``m``'s step with its linears as ``kernel_op`` launches:
    the kernel path (``attention``'s backend, or ``backend``) in eval mode, and the level's ``attr`` (True / False
    force; None: the crossover data of ``op`` at ``n`` on this GPU, ``policy.crossover_rule`` -- else off).
    ``policy_only``: the view "on a GPU" (``fractalgen info``): its arch and the default fp16 autocast."""
    if m.training:
        return None, "train mode: aten linears"
    if len(m.blocks) == 0:
        return None, "no blocks"
    kb = kernel_backend(backend or attention.backend)
    if not policy_only and not use_kernel(kb, device):
        return None, "torch backend: aten linears"
    dtype = torch.get_autocast_dtype(device.type) if autocast_on(device.type) else weight.dtype
    if policy_only and not autocast_on(device.type):
        dtype = torch.float16  # the view "on a GPU": precision="auto" samples under fp16 autocast there
    arch = None
    if (device.type == "cuda" and n is not None) or policy_only:
        from fractal_kernels._target import device_arch
        arch = device_arch(device)
    on, why = policy.crossover_rule(
        op, width, m.__dict__.get(attr), n=n, dtype=str(dtype).replace("torch.", ""), arch=arch, attr=attr,
        what=what, default=f"default: aten linears (no crossover data for this width, N and GPU says {what} "
                           f"wins; {attr}=True forces it)")
    if not on:
        return None, why
    if policy_only:
        return "triton", why
    which = dispatch.resolve(kernel_op, kb if kb in ("triton", "torch") else None, device, dtype=dtype)
    if which != "triton":
        return None, f"{why}, but {kernel_op} resolves to {which}: aten linears"
    return which, why
