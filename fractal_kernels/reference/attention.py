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
) -> torch.Tensor:
    """Softmax attention exactly as the reference computes it.

    ``causal`` masks key j > query i (queries aligned to the *end* of the keys, so a single decode query
    sees every cached key). ``key_mask`` (bool, broadcastable to ``[N, H, Lq, Lk]``) keeps True entries.
    ``subtract_max`` reproduces the MAR level's explicit ``attn - max(attn)`` (a no-op in exact math,
    kept so the op sequence matches). ``dropout_p`` applies dropout to the probabilities.
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
    if dropout_p > 0.0:
        probs = torch.dropout(probs, dropout_p, train=True)
    return probs.to(v.dtype) @ v
