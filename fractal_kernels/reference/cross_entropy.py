"""Reference math of the pixel head's output layer + loss: ``x @ weight^T + bias`` -> log-softmax -> NLL.

``x`` ``[N, C]``, ``weight`` ``[V, C]`` (the channel's codebook, reused as the output matrix), ``bias``
``[V]``, ``target`` ``[N]``. Computed in fp32 (the reference disables autocast for these logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_logits_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.to(acc) @ weight.to(acc).t() + bias.to(acc)


def pixel_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                                  reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of the fp32 logits (materialised ``[N, V]``: the memory cost the fused op avoids)."""
    return F.cross_entropy(pixel_logits_reference(x, weight, bias), target, reduction=reduction,
                           ignore_index=ignore_index)
