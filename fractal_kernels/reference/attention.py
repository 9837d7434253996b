"""Reference attention math of the FractalGen levels.

Shapes: q ``[N, H, Lq, D]``, k/v ``[N, H, Lk, D]``, output ``[N, H, Lq, D]``.

Numerics follow the public reference code on purpose:

* ``scores_fp32=True`` (MAR and AR levels): q and k are upcast and the score matmul runs in fp32 with
  autocast disabled, as ``models/mar.py`` / ``models/ar.py`` do.
* ``scores_fp32=False`` (the pixel head, ``models/pixelloss.py``): the score matmul runs in the input
  dtype with autocast disabled (the reference does not upcast there; under bf16 autocast its scores are
  bf16).
* softmax then always runs in fp32 (the scores are fp32 or autocast promotes softmax), and the
  probabilities are cast to ``v``'s dtype for the value matmul, which is what autocast does in the
  reference.
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    key_mask: Optional[torch.Tensor] = None,
    scores_fp32: bool = True,
    subtract_max: bool = False,
    dropout_p: float = 0.0,
    dropout_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention exactly as the reference computes it.

    ``causal`` masks key j > query i (queries aligned to the *end* of the keys, so a single decode query
    sees every cached key). ``key_mask`` (bool, broadcastable to ``[N, H, Lq, Lk]``) keeps True entries.
    ``subtract_max`` reproduces the MAR level's explicit ``attn - max(attn)`` (a no-op in exact math,
    kept so the op sequence matches). ``dropout_p`` applies dropout to the probabilities with torch's RNG
    (the reference); ``dropout_scale`` (``[N, H, Lq, Lk]``, 0 or ``1/(1-p)``, see
    :func:`attention_dropout_scale`) applies a given mask instead (the kernels' dropout).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention_reference: q, k, v must be [N, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = d ** -0.5
    # "fp32" means at least fp32: fp64 inputs (gradient references) stay fp64.
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        if scores_fp32:
            scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
        else:
            scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    if subtract_max:
        scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = torch.softmax(scores.to(acc), dim=-1)
    if dropout_scale is not None:
        probs = probs * dropout_scale.to(probs.dtype)
    elif dropout_p > 0.0:
        probs = torch.dropout(probs, dropout_p, train=True)
    return probs.to(v.dtype) @ v


def rope_reference(x: torch.Tensor, freqs_cis: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The AR level's rotary embedding on ``x`` ``[N, H, L, D]``: interleaved pairs ``(x[2i], x[2i+1])`` are
    rotated by ``freqs_cis[pos, i] = (cos, sin)``; ``positions`` is ``[L]`` or ``[N, L]``. fp32 math, cast back
    to ``x``'s dtype (the reference's ``apply_rotary_emb``)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.float()[positions.long()]  # [L, D/2, 2] or [N, L, D/2, 2]
    f = f[:, None] if f.dim() == 4 else f[None, None]
    cos, sin = f[..., 0], f[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, *,
                               causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Self-attention where sequence n only has its first ``seqlens[n]`` tokens (``[N]`` integers): keys past
    the length are masked out and the outputs of queries past it are zero. fp32 scores."""
    n, _, length, _ = q.shape
    pos = torch.arange(length, device=q.device)
    valid = pos[None, :] < seqlens.to(q.device).long()[:, None]  # [N, L]
    key_mask = valid[:, None, None, :]
    # an empty sequence has no key at all: give its (discarded) rows one key so softmax stays finite
    key_mask = key_mask | ~valid.any(-1)[:, None, None, None]
    o = attention_reference(q, k, v, causal=causal, scale=scale, key_mask=key_mask)
    return o * valid[:, None, :, None].to(o.dtype)


def attention_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               kv_lens: torch.Tensor, *, scale: Optional[float] = None,
                               freqs_cis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal decode: ``q`` ``[N, H, Lq, D]`` holds the last ``Lq`` positions of sequences whose first
    ``kv_lens[n]`` keys/values are in ``k_cache``/``v_cache`` ``[N, H, Lmax, D]``; query i sits at position
    ``kv_lens[n] - Lq + i`` and sees keys ``j <= that``. With ``freqs_cis`` ``[P, D/2, 2]`` the cache holds
    un-rotated keys and q and k are rotated by their positions first (the AR level's RoPE). fp32 scores."""
    n, _, lq, _ = q.shape
    lmax = k_cache.shape[2]
    kv_lens = kv_lens.to(q.device).long()
    qpos = kv_lens[:, None] - lq + torch.arange(lq, device=q.device)[None, :]  # [N, Lq]
    kpos = torch.arange(lmax, device=q.device)
    if freqs_cis is not None:
        q = rope_reference(q, freqs_cis, qpos.clamp(min=0))
        k_cache = rope_reference(k_cache, freqs_cis, kpos.clamp(max=freqs_cis.shape[0] - 1))
    keep = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < kv_lens[:, None, None])
    return attention_reference(q, k_cache, v_cache, causal=False, scale=scale, key_mask=keep[:, None])


def attention_dropout_scale(seed: int, n: int, h: int, lq: int, lk: int, p: float, device=None) -> torch.Tensor:
    """The tiny-attention kernels' dropout mask as a scale ``[N, H, Lq, Lk]``: element (pair, i, j) is kept
    (scale ``1/(1-p)``, else 0) when the Philox uniform of ``(seed, counter (pair*Lq + i)*Lk + j)`` is ``>= p``,
    the same generator as the pixel sampler's (``fractal_kernels.reference.philox``)."""
    from fractal_kernels.reference.philox import philox_uniform
    u = philox_uniform(seed, 0, n * h * lq * lk, device=device).view(n, h, lq, lk)
    return torch.where(u >= p, 1.0 / (1.0 - p), 0.0)
