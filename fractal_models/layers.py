"""Small building blocks shared by the levels and the fast engine (ViT MLP, weight init, patch helpers, the
masking-order and CFG-off tests): the bottom layer of ``fractal_models``, importing only ``fractal_kernels``."""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn as nn

# the drop-ins' backend helpers live with the drop-ins; re-exported for the levels and old imports
from fractal_kernels.nn.backend import attn_dropout, autocast_on, kernel_backend, use_kernel  # noqa: F401


class Mlp(nn.Module):
    """Two-layer GELU MLP with the parameter names of ``timm``'s ``Mlp`` (``fc1``, ``fc2``).

    The reference imports this from timm; we keep the same structure (fc1 -> GELU -> dropout -> fc2 ->
    dropout, exact erf GELU) without depending on timm.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def init_vit_weights(m: nn.Module) -> None:
    """The reference's init: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
        if m.weight is not None:
            nn.init.constant_(m.weight, 1.0)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, (H/p)(W/p), 3 p p]`` in the reference's (c, p, q) order."""
    bsz, c, h, w = x.shape
    x = x.reshape(bsz, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(bsz, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square ``grid x grid`` of patches."""
    bsz = x.shape[0]
    x = x.reshape(bsz, grid, grid, 3, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)
    return x.reshape(bsz, 3, grid * p, grid * p)


def known_patches(known: torch.Tensor, known_mask: torch.Tensor, p: int, dtype: torch.dtype, device) -> tuple:
    """Known pixels ``[B, 3, H, W]`` (normalised) and their bool mask -> (patches ``[B, L, 3 p p]``, mask
    patches ``[B, L, 3 p p]`` bool, fully known patches ``[B, L]`` bool) for a level with patch size ``p``."""
    known_p = patchify(known.to(device=device, dtype=dtype), p)
    known_mask_p = patchify(known_mask.to(device=device, dtype=torch.float32), p).bool()
    return known_p, known_mask_p, known_mask_p.all(dim=-1)


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` without a host sync: a blocking H2D copy waits for the device queue to
    drain, so in a level loop it would stall the host once per call. On CUDA the data is staged in pinned memory
    (PyTorch's caching host allocator keeps that block alive until the queued copy has run, so ``t`` may be
    dropped at once); the values are the same as a blocking copy's."""
    device = torch.device(device)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def mask_by_order(mask_len: torch.Tensor, order: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mask (1.0) the first ``mask_len[b]`` positions of ``order[b]``. ``mask_len`` ``[B]`` or ``[B, 1]``."""
    ranks = torch.arange(seq_len, device=order.device).expand(order.shape[0], seq_len)
    first = (ranks < mask_len.reshape(-1, 1).to(order.device)).float()
    return torch.zeros_like(first).scatter(-1, order, first)


def is_one(cfg: Union[float, torch.Tensor]) -> bool:
    """The reference's ``cfg == 1.0`` test, also for per-row tensors (guidance off only if all are 1)."""
    if isinstance(cfg, torch.Tensor):
        return bool((cfg == 1.0).all())
    return cfg == 1.0


# A pixel draw: (probs [B, 256], channel 0/1/2) -> int64 ids [B].
PixelDraw = Callable[[torch.Tensor, int], torch.Tensor]


def multinomial_draw(probs: torch.Tensor, channel: int) -> torch.Tensor:
    """The reference's draw: ``torch.multinomial`` on the global RNG."""
    return torch.multinomial(probs, num_samples=1).reshape(-1)
