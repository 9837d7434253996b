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

from typing import Optional, Tuple, Union

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


def _mass_at_or_above(probs: torch.Tensor) -> torch.Tensor:
    """``S_i = sum_j p_j [p_j >= p_i]`` per entry (ties counted together), via one sort. ``[B, V]``."""
    asc, _ = probs.sort(dim=-1)
    cum = asc.cumsum(dim=-1)
    total = cum[:, -1:]
    # entries strictly below p_i: the first position of p_i in the ascending order
    below = torch.searchsorted(asc.contiguous(), probs.contiguous(), right=False)
    mass_below = torch.where(below > 0, cum.gather(-1, (below - 1).clamp(min=0)), torch.zeros_like(probs))
    return total - mass_below


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation with ties kept together; renormalises. ``[B, V]``.

    Keeps entry i iff the mass strictly above it is < ``top_p``; equivalently every entry ``>= tau*``,
    where ``tau*`` is the largest value whose at-or-above mass reaches ``top_p``. The argmax is always kept.
    """
    if top_p >= 1.0:
        return probs
    s_at = _mass_at_or_above(probs)
    tau = torch.where(s_at >= top_p, probs, torch.zeros_like(probs)).amax(dim=-1, keepdim=True)
    kept = torch.where(probs >= tau, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep every entry at least as large as the k-th largest (ties kept together); renormalises."""
    if top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    kth = probs.topk(top_k, dim=-1).values[:, -1:]
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
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
    if temperature != 1.0:  # x * 1.0 == x exactly: skipping it saves an op per channel on the hot path
        logits = logits * temperature
    if guided:
        bsz = logits.shape[0] // 2
        logits = cfg_filter_mix_reference(logits[:bsz], logits[bsz:], cfg, filter_threshold)
    probs = torch.softmax(logits, dim=-1)
    return top_p_filter(probs, top_p)


def inverse_cdf_draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first ``i`` with ``cumsum(probs)[i] / sum(probs) >= u`` (the fixtures' rule).

    ``probs`` ``[B, V]`` (any non-negative weights), ``uniforms`` ``[B]`` in [0, 1). Accumulates in fp64 so
    the draw does not depend on the summation order of a low-precision cumsum. A zero-probability entry is
    never returned (at ``u = 0`` the first entry with positive mass is). Returns int64 ``[B]``.
    """
    cdf = probs.double().cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = uniforms.to(device=probs.device, dtype=torch.float64).reshape(-1, 1)
    u = u.clamp(min=torch.finfo(torch.float64).tiny)
    idx = torch.searchsorted(cdf, u, right=False).reshape(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


FLT_MAX = torch.finfo(torch.float32).max


def _sanitize(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never sampled), +inf -> the largest float (ties with other +inf entries)."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=FLT_MAX, neginf=float("-inf"))


def sample_logits_reference(
    cond_logits: torch.Tensor,
    uncond_logits: Optional[torch.Tensor],
    *,
    cfg: CfgLike,
    inv_temperature: float,
    filter_threshold: float,
    top_p: float,
    top_k: int,
    uniforms: Optional[torch.Tensor],
    greedy: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The math of :func:`fractal_kernels.sample_logits` (the ``torch`` backend); returns (ids, probs).

    fp32 throughout: ``logits * inv_temperature`` (greedy: no scaling), sanitise, the reference's filter
    and CFG mix when ``uncond_logits`` is given, sanitise, softmax, top-k then top-p (each renormalising),
    then the inverse-CDF draw from ``uniforms`` (or the argmax when ``greedy``). Rows without a finite
    logit return id -1 and zero probabilities.
    """
    x = cond_logits.float()
    scale = 1.0 if greedy else inv_temperature
    x = _sanitize(x * scale)
    if uncond_logits is not None:
        u = _sanitize(uncond_logits.float() * scale)
        x = _sanitize(cfg_filter_mix_reference(x, u, cfg, filter_threshold))
    valid = torch.isfinite(x.amax(dim=-1))
    probs = torch.softmax(x, dim=-1)
    probs = top_k_filter(probs, top_k)
    probs = top_p_filter(probs, top_p)
    probs = torch.where(valid[:, None], probs, torch.zeros_like(probs))
    if greedy:
        ids = x.argmax(dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, ids[:, None], 1.0)
    else:
        ids = inverse_cdf_draw(torch.where(valid[:, None], probs, torch.ones_like(probs)), uniforms)
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    probs = torch.where(valid[:, None], probs, torch.zeros_like(probs))
    return ids, probs
