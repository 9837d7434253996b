"""Reference math of the pixel head's sampling pipeline (see ``shared/WORKLOADS.md``).

Per channel, with logits ``[2B, V]`` (conditional rows first, unconditional rows last) when CFG is on,
or ``[B, V]`` when ``cfg == 1``:

1. ``logits = logits * temperature`` -- the reference *multiplies* by its ``temperature`` argument;
   ``fractal_models`` keeps that convention so its behaviour matches the published code.
2. Where the conditional softmax probability is below ``filter_threshold``, the unconditional logit is
   replaced by ``max(uncond, cond - max(cond) + max(uncond))``.
3. CFG: ``uncond + cfg * (cond - uncond)``; ``cfg`` is a float or a per-row tensor ``[B]``.
4. Optional nucleus (top-p) truncation -- not in the reference; ``top_p = 1`` skips it so the result
   is bit-identical to the reference.
5. softmax; the draw is ``torch.multinomial`` in the reference, or an explicit inverse-CDF draw.
"""
from __future__ import annotations

from typing import Union

import torch

CfgLike = Union[float, torch.Tensor]


def _cfg_column(cfg: CfgLike, rows: int, like: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(cfg, torch.Tensor) and cfg.numel() > 1:
        if cfg.numel() != rows:
            raise ValueError(f"cfg: expected a scalar or {rows} per-row values, got shape {tuple(cfg.shape)}")
        return cfg.reshape(rows, 1).to(like.device)
    return cfg


def cfg_filter_mix_reference(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor, cfg: CfgLike, filter_threshold: float
) -> torch.Tensor:
    """Steps 2-3 above on already temperature-scaled logits ``[B, V]``; returns mixed logits ``[B, V]``."""
    cond_probs = torch.softmax(cond_logits, dim=-1)
    low = cond_probs < filter_threshold
    replacement = torch.maximum(
        uncond_logits,
        cond_logits - cond_logits.max(dim=-1, keepdim=True)[0] + uncond_logits.max(dim=-1, keepdim=True)[0],
    )
    uncond_logits = torch.where(low, replacement, uncond_logits)
    cfg_col = _cfg_column(cfg, cond_logits.shape[0], cond_logits)
    return uncond_logits + cfg_col * (cond_logits - uncond_logits)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely entries whose mass reaches ``top_p``; renormalise. ``[B, V]``."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def pixel_probs_reference(
    logits: torch.Tensor,
    *,
    temperature: float,
    cfg: CfgLike,
    filter_threshold: float,
    top_p: float = 1.0,
    guided: bool,
) -> torch.Tensor:
    """The probabilities the reference samples one channel from. ``logits`` ``[2B or B, V]`` -> ``[B, V]``."""
    logits = logits * temperature
    if guided:
        bsz = logits.shape[0] // 2
        logits = cfg_filter_mix_reference(logits[:bsz], logits[bsz:], cfg, filter_threshold)
    probs = torch.softmax(logits, dim=-1)
    return top_p_filter(probs, top_p)


def inverse_cdf_draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first ``i`` with ``cumsum(probs)[i] / sum(probs) >= u`` (ties go to the lower index).

    ``probs`` ``[B, V]`` (any non-negative weights), ``uniforms`` ``[B]`` in [0, 1). Accumulates in fp64 so
    the draw does not depend on the summation order of a low-precision cumsum. Returns int64 ``[B]``.
    """
    cdf = probs.double().cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = uniforms.to(device=probs.device, dtype=torch.float64).reshape(-1, 1)
    idx = torch.searchsorted(cdf, u, right=False).reshape(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
