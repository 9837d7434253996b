"""Philox4x32-10 (Salmon et al., SC'11) in plain PyTorch: the counter-based RNG every backend shares.

A draw for row ``i`` of a call with ``(seed, offset)`` uses counter ``(offset + i) mod 2^64`` split into
(lo, hi, 0, 0) and key ``(seed lo, seed hi)``; the uniform is ``(first output word >> 8) * 2^-24``, a float
in [0, 1) that fp32 represents exactly. The Triton and CUDA kernels implement the same function, so a
(seed, offset) gives the same uniforms, hence the same samples, on every backend and launch configuration.
All arithmetic is int64 on values < 2^48 (32-bit words multiplied via 16-bit halves), so it runs anywhere.
"""
from __future__ import annotations

from typing import Tuple

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and uint32 words ``b`` (int64)."""
    p_lo = (a & 0xFFFF) * b  # < 2^48
    p_hi = (a >> 16) * b  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int,
               rounds: int = 10) -> Tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 words; returns the four output words."""
    k0 = torch.as_tensor(k0 & MASK32, dtype=torch.int64, device=c0.device)
    k1 = torch.as_tensor(k1 & MASK32, dtype=torch.int64, device=c0.device)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


def philox_uniform(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """fp32 uniforms ``[n]`` in [0, 1) for rows ``offset .. offset + n - 1`` of stream ``seed``."""
    seed &= (1 << 64) - 1
    idx = torch.arange(n, dtype=torch.int64, device=device)
    lo = (idx + (offset & MASK32))
    carry = lo >> 32
    lo = lo & MASK32
    hi = (carry + ((offset >> 32) & MASK32)) & MASK32
    zero = torch.zeros_like(lo)
    x, _, _, _ = philox4x32(lo, hi, zero, zero, seed & MASK32, seed >> 32)
    return (x >> 8).to(torch.float32) * (1.0 / 16777216.0)
