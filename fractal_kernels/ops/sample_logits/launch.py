"""Fused pixel sampler: the Triton launcher (block sizes per device) and the input checks of :func:`sample_logits`."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fractal_kernels.dispatch import triton_interpreting

from fractal_kernels.ops.sample_logits.kernels import HAS_TRITON, MAX_V

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.sample_logits.kernels import _sample_logits_kernel


class SampleLogitsConfig(NamedTuple):
    """Launch configuration of :func:`_sample_logits_kernel` for one vocabulary size and device."""
    block_n: int  # rows per program
    block_v: int  # the vocabulary padded to a power of two (one row in registers)


def sample_logits_config(v: int, device: torch.device, *, arch: Optional[int] = None,
                         interpret: Optional[bool] = None) -> SampleLogitsConfig:
    """The one place the sampler's launch configuration is chosen. GPU (any arch): 2048 elements a program (8
    rows of 256: one row per warp-ish, registers stay small). ``interpret`` (default: CPU tensors under the
    interpreter), which pays per program, not per element: 131072 elements a program. ``arch`` is accepted for
    the common config signature; sm_80 and sm_90 take the same blocks."""
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    block_v = max(16, triton.next_power_of_2(v))
    return SampleLogitsConfig(max(1, (131072 if interpret else 2048) // block_v), block_v)


def _launch_triton(cond, uncond, cfg_t, cfg_scalar, inv_temp, filter_threshold, top_p, top_k, uniforms, seed,
                   offset, greedy, ids, probs, config: Optional[SampleLogitsConfig] = None) -> None:
    """Run the kernel into ``ids`` (and ``probs``); ``config`` replaces :func:`sample_logits_config`'s choice."""
    n, v = cond.shape
    block_n, block_v = config or sample_logits_config(v, cond.device)
    grid = (triton.cdiv(n, block_n),)
    dummy = cond
    _sample_logits_kernel[grid](
        cond, uncond if uncond is not None else dummy, cfg_t if cfg_t is not None else dummy,
        uniforms if uniforms is not None else dummy, ids, probs if probs is not None else dummy,
        n, v, cond.stride(0), uncond.stride(0) if uncond is not None else 0, probs.stride(0) if probs is not None else 0,
        inv_temp, cfg_scalar, filter_threshold, top_p, float(top_k),
        seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset,
        HAS_UNCOND=uncond is not None, CFG_PER_ROW=cfg_t is not None, HAS_UNIFORMS=uniforms is not None,
        WRITE_PROBS=probs is not None, DO_TOP_K=0 < top_k < v, DO_TOP_P=top_p < 1.0, GREEDY=greedy,
        BLOCK_N=block_n, BLOCK_V=block_v,
    )


def _check(cond_logits, uncond_logits, cfg, temperature, filter_threshold, top_p, top_k, uniforms, out_probs):
    if not isinstance(cond_logits, torch.Tensor) or cond_logits.dim() != 2:
        raise ValueError(f"cond_logits: expected a [N, V] tensor, got "
                         f"{tuple(cond_logits.shape) if isinstance(cond_logits, torch.Tensor) else type(cond_logits).__name__}")
    if not cond_logits.is_floating_point():
        raise TypeError(f"cond_logits: expected a floating-point tensor, got {cond_logits.dtype}")
    n, v = cond_logits.shape
    if v < 1 or v > MAX_V:
        raise ValueError(f"cond_logits: vocabulary width V={v} outside the supported 1..{MAX_V}")
    if cond_logits.stride(1) != 1:
        raise ValueError("cond_logits: the last dimension must be contiguous (stride 1); rows may have any stride")
    if uncond_logits is not None:
        if not isinstance(uncond_logits, torch.Tensor) or tuple(uncond_logits.shape) != (n, v):
            raise ValueError(f"uncond_logits: expected shape {(n, v)} like cond_logits, got "
                             f"{tuple(uncond_logits.shape) if isinstance(uncond_logits, torch.Tensor) else uncond_logits}")
        if uncond_logits.dtype != cond_logits.dtype:
            raise TypeError(f"uncond_logits: dtype {uncond_logits.dtype} differs from cond_logits' {cond_logits.dtype}")
        if uncond_logits.device != cond_logits.device:
            raise ValueError(f"uncond_logits: on {uncond_logits.device}, cond_logits on {cond_logits.device}")
        if uncond_logits.stride(1) != 1:
            raise ValueError("uncond_logits: the last dimension must be contiguous (stride 1)")
    if isinstance(cfg, torch.Tensor):
        if cfg.numel() not in (1, n):
            raise ValueError(f"cfg: expected a scalar or {n} per-row values, got shape {tuple(cfg.shape)}")
        if cfg.device != cond_logits.device:
            raise ValueError(f"cfg: on {cfg.device}, logits on {cond_logits.device}")
    elif not math.isfinite(float(cfg)):
        raise ValueError(f"cfg: expected a finite number, got {cfg!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (0.0 <= filter_threshold <= 1.0):
        raise ValueError(f"filter_threshold: expected a probability in [0, 1], got {filter_threshold!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {top_k!r}")
    if uniforms is not None:
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (n,) or not uniforms.is_floating_point():
            raise ValueError(f"uniforms: expected a float tensor of shape ({n},), got "
                             f"{tuple(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__}")
        if uniforms.device != cond_logits.device:
            raise ValueError(f"uniforms: on {uniforms.device}, logits on {cond_logits.device}")
    if out_probs is not None:
        if (not isinstance(out_probs, torch.Tensor) or tuple(out_probs.shape) != (n, v) or out_probs.dtype != torch.float32
                or out_probs.stride(1) != 1 or out_probs.device != cond_logits.device):
            raise ValueError(f"out_probs: expected a float32 [{n}, {v}] tensor on {cond_logits.device} with a contiguous last dimension")
