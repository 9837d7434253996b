"""Negative log-likelihood in bits per dimension, as the paper's Table 3 reports it.

The model's eval-mode ``forward`` is the unconditional NLL in **nats per sub-pixel**: every pixel channel
is a 256-way categorical, and the loss averages ``-ln p(value)`` over the sub-pixels it scores (for MAR
levels: the patches masked in that pass, with a random order and a uniformly random number of masked
patches, exactly as the reference estimates it). Bits per dimension is that divided by ``ln 2``
(one "dimension" = one sub-pixel, 3·H·W per image; no dequantisation term because the model is discrete).
``num_orders`` repeats the pass with fresh random orders/masks and averages, the reference's
``--nll_forward_number``.

Guiding-pixel configs (the 256² models): the reference's eval loss adds the guiding-pixel heads' mean
losses to the pixel loss, so its "NLL" is not a proper bits/dim there (the paper reports NLL only for the
64² models, which have no guiding pixel). We return the reference's quantity and warn.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Optional

import torch

from fractal_models.sampling import _seeded, check_top_level, normalize_uint8

if TYPE_CHECKING:  # annotations only: fractalgen imports this module (FractalGen.nll), not the reverse
    from fractal_models.fractalgen import FractalGen


def nll_bits_per_dim(model: FractalGen, imgs: torch.Tensor, *, num_orders: int = 1, batch_size: int = 64,
                     seed: Optional[int] = None, autocast_dtype: Optional[torch.dtype] = None) -> float:
    """Unconditional NLL (bits/dim) of ``imgs`` (uint8 ``[N, 3, S, S]``, or already-normalised float)."""
    check_top_level(model)
    if imgs.dim() != 4 or imgs.shape[1] != 3 or imgs.shape[2] != model.img_size or imgs.shape[3] != model.img_size:
        raise ValueError(f"imgs: expected shape [N, 3, {model.img_size}, {model.img_size}] for this model, "
                         f"got {tuple(imgs.shape)}")
    if imgs.shape[0] == 0:
        raise ValueError("imgs: empty batch; the NLL of no images is undefined")
    if num_orders < 1:
        raise ValueError(f"num_orders: expected >= 1, got {num_orders}")
    if any(getattr(g, "guiding_pixel", False) for g in model.levels()[:-1]):
        warnings.warn("nll_bits_per_dim: this config has guiding pixels; the value includes their auxiliary "
                      "losses, as the reference computes it, and is not a proper bits/dim", stacklevel=2)
    device = model.class_emb.weight.device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with _seeded(seed, device), torch.no_grad():
            for start in range(0, imgs.shape[0], batch_size):
                batch = imgs[start:start + batch_size].to(device)
                x = normalize_uint8(batch) if batch.dtype == torch.uint8 else batch.float()
                labels = torch.zeros(x.shape[0], dtype=torch.long, device=device)  # ignored in eval mode
                nats = 0.0
                for _ in range(num_orders):
                    if autocast_dtype is not None:
                        with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                            nats += float(model(x, labels))
                    else:
                        nats += float(model(x, labels))
                total += nats / num_orders / math.log(2) * x.shape[0]
    finally:
        model.train(was_training)
    return total / imgs.shape[0]
