"""MAR level: a bidirectional ViT over the patches of an image, sampled in random order with masking.

Module tree and parameter names match ``models/mar.py`` of the reference. Numerics kept on purpose:
LayerNorm eps 1e-6, attention scores in fp32 with autocast off and the explicit ``attn - max(attn)``,
the cosine masking schedule and its ``mask_len`` clamps, random orders drawn from the *CPU* global RNG
(the reference draws ``torch.rand`` on the CPU and moves it; doing the same keeps one seed meaning the
same order on every device). The training/NLL masks are drawn as the reference draws them: the eval mask
count from numpy's global RNG (``np.random.randint(L) + 1``, positions ``orders[:, :count]``), the training
mask ratios from scipy's ``truncnorm`` on that same numpy RNG, scattered with ``index=argsort(orders)``; so
under ``torch.manual_seed(s); np.random.seed(s)`` (:func:`fractal_models.rng.manual_seed`) the losses are
the reference's (tested against its seeded losses).

Beyond the reference: device-agnostic, and per-row masking schedules so known (conditioning) patches can
be skipped during sampling.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fractal_kernels.nn.attention import Attention
from fractal_models.engine import mar as _engine
from fractal_models.engine.mar import _mar_schedule  # noqa: F401 (moved to the engine; old import path)
from fractal_models.layers import (Mlp, init_vit_weights, known_patches, mask_by_order, patchify,  # noqa: F401
                                   unpatchify)
from fractal_models.layers import is_one as _is_one
from fractal_models.pixelloss import PixelLoss


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


_MASK_RATIO = None  # scipy's frozen truncnorm, made on first use (importing scipy.stats takes ~0.3 s)


def truncnorm_mask_rates(bsz: int, random_state: Optional[np.random.RandomState] = None) -> np.ndarray:
    """Mask ratios ``[bsz]`` (float64) from N(1, 0.25²) truncated to [0, 1]: the reference's
    ``scipy.stats.truncnorm(-4, 0, loc=1.0, scale=0.25).rvs(bsz)``, drawn from numpy's global RNG (or
    ``random_state``) exactly as the reference draws them."""
    global _MASK_RATIO
    if _MASK_RATIO is None:
        from scipy import stats
        _MASK_RATIO = stats.truncnorm(-4, 0, loc=1.0, scale=0.25)
    return np.atleast_1d(_MASK_RATIO.rvs(bsz, random_state=random_state))


def neighbour_conditions(middle: torch.Tensor) -> List[torch.Tensor]:
    """``[B, h*w, C]`` -> [middle, top, right, bottom, left], zeros past the border (the 5 conditions)."""
    bsz, seq_len, c = middle.shape
    h = w = int(math.isqrt(seq_len))
    grid = middle.reshape(bsz, h, w, c)
    zrow = grid.new_zeros(bsz, 1, w, c)
    zcol = grid.new_zeros(bsz, h, 1, c)
    top = torch.cat([zrow, grid[:, :-1]], dim=1)
    right = torch.cat([grid[:, :, 1:], zcol], dim=2)
    bottom = torch.cat([grid[:, 1:], zrow], dim=1)
    left = torch.cat([zcol, grid[:, :, :-1]], dim=2)
    return [middle] + [t.reshape(bsz, seq_len, c) for t in (top, right, bottom, left)]


class MAR(nn.Module):
    """Masked autoregressive generator of one level (see module docstring).

    ``fused_stack`` (a plain attribute, absent by default, never in the state dict): the fast engine's choice of
    running each sampling step's blocks and final norm as one fused launch (:mod:`fractal_models.engine.mar`):
    None = by width (``fractal_kernels.dispatch.choose_block_stack``), True = always where the backend is
    Triton, False = never (the op-by-op blocks)."""

    def __init__(self, seq_len: int, patch_size: int, cond_embed_dim: int, embed_dim: int, num_blocks: int,
                 num_heads: int, attn_dropout: float, proj_dropout: float, num_conds: int = 1,
                 guiding_pixel: bool = False, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.patch_size = patch_size
        self.grid = int(math.isqrt(seq_len))
        self.num_conds = num_conds
        self.guiding_pixel = guiding_pixel
        self.grad_checkpointing = grad_checkpointing

        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_emb = nn.Linear(3 * patch_size ** 2, embed_dim, bias=True)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim, bias=True)
        if self.guiding_pixel:
            self.pix_proj = nn.Linear(3, embed_dim, bias=True)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + num_conds + int(guiding_pixel), embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=proj_dropout, attn_drop=attn_dropout)
            for _ in range(num_blocks)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.initialize_weights()
        if self.guiding_pixel:
            # Created after initialize_weights, as in the reference (it initialises itself).
            self.guiding_pixel_loss = PixelLoss(c_channels=cond_embed_dim, width=128, depth=3, num_heads=4, r_weight=5.0)

    def initialize_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_vit_weights)

    # reference helper names
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid)

    def sample_orders(self, bsz: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Random orders ``[B, L]``; uniforms drawn on the CPU global RNG as in the reference."""
        orders = torch.argsort(torch.rand(bsz, self.seq_len), dim=1).long()
        return orders.to(device) if device is not None else orders

    def random_masking_uniform(self, x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Eval masking for NLL: one count in [1, L] for the whole batch (numpy's global RNG, as the
        reference), the positions ``orders[:, :count]``."""
        bsz, seq_len, _ = x.shape
        num_masked = np.random.randint(seq_len) + 1  # a host int: no device read
        return mask_by_order(torch.full((bsz,), num_masked), orders, seq_len)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Train masking: ``ceil(L * r)`` masked positions per row, ``r`` ~ truncated normal (scipy on numpy's
        global RNG), scattered with ``index=argsort(orders)`` as the reference does (position ``q`` is
        masked iff ``orders[q] < ceil(L * r)``: the same distribution as masking ``orders[:, :n]``, and the
        reference's masks for a seed)."""
        bsz, seq_len, _ = x.shape
        num_masked = torch.from_numpy(np.ceil(seq_len * truncnorm_mask_rates(bsz))).to(torch.float32)
        return mask_by_order(num_masked, torch.argsort(orders, dim=-1), seq_len)

    def predict(self, x: torch.Tensor, mask: torch.Tensor, cond_list: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Patches ``[B, L, 3p²]``, mask ``[B, L]`` (1 = masked), conditions -> 5 conditions ``[B, L, C]``."""
        x = self.patch_emb(x)
        # Conditions are prepended one by one, so the token order is [pix?, cond_{n-1}, ..., cond_0, patches].
        for i in range(self.num_conds):
            x = torch.cat([self.cond_emb(cond_list[i]).unsqueeze(1), x], dim=1)
        if self.guiding_pixel:
            x = torch.cat([self.pix_proj(cond_list[-1]).unsqueeze(1), x], dim=1)
        n_prefix = self.num_conds + int(self.guiding_pixel)
        mask_with_cond = torch.cat([torch.zeros(x.size(0), n_prefix, device=x.device), mask.to(x.device)], dim=1).bool()
        x = torch.where(mask_with_cond.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed_learned
        x = self.patch_emb_ln(x)
        if self.grad_checkpointing and self.training:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            for block in self.blocks:
                x = block(x)
        x = self.norm(x)
        return neighbour_conditions(x[:, n_prefix:])

    def forward(self, imgs: torch.Tensor, cond_list: List[torch.Tensor]):
        """Training / NLL pass: returns (masked patches ``[M, 3, p, p]``, next conditions, guiding-pixel loss)."""
        patches = self.patchify(imgs)
        orders = self.sample_orders(patches.size(0), device=patches.device)
        mask = self.random_masking(patches, orders) if self.training else self.random_masking_uniform(patches, orders)
        mask = mask.to(patches.device)

        if self.guiding_pixel:
            guiding_pixels = imgs.mean(-1).mean(-1)
            guiding_pixel_loss = self.guiding_pixel_loss(guiding_pixels, cond_list)
            cond_list.append(guiding_pixels)
        else:
            guiding_pixel_loss = imgs.new_zeros(())

        cond_list_next = self.predict(patches, mask, cond_list)
        keep = mask.reshape(-1).bool()
        cond_list_next = [c.reshape(c.size(0) * c.size(1), -1)[keep] for c in cond_list_next]
        patches = patches.reshape(patches.size(0) * patches.size(1), -1)[keep]
        patches = patches.reshape(patches.size(0), 3, self.patch_size, self.patch_size)
        return patches, cond_list_next, guiding_pixel_loss

    def sample(self, cond_list: List[torch.Tensor], num_iter: int, cfg, cfg_schedule: str, temperature: float,
               filter_threshold: float, next_level_sample_function: Callable, visualize: bool = False, *,
               known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
               top_p: float = 1.0, draw=None, fast: bool = False) -> torch.Tensor:
        """Generate ``[B, 3, S, S]`` normalised images, reference-compatible.

        ``known`` ``[B, 3, S, S]`` (normalised) with ``known_mask`` (bool, same shape): fully known patches
        are taken as generated from the start, partly known ones are generated by the next level with
        their known sub-pixels passed down. Without them this is the reference's loop step for step.
        ``fast`` runs the fast engine's loop instead (:mod:`fractal_models.engine.mar`: the same samples, planned
        on the host, no host sync per step) and samples the guiding pixel with the pixel head's KV cache.
        """
        guided = not _is_one(cfg)
        bsz = cond_list[0].size(0) // 2 if guided else cond_list[0].size(0)
        device = cond_list[0].device
        if fast and known is None and not isinstance(cfg, torch.Tensor):
            return _engine.sample(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
                                  next_level_sample_function, visualize, top_p=top_p, draw=draw)
        if fast and known is not None:
            return _engine.sample_known(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
                                        next_level_sample_function, visualize, known=known, known_mask=known_mask,
                                        top_p=top_p, draw=draw)

        if self.guiding_pixel:
            cond_list.append(self._sample_guiding_pixel(cond_list, guided, temperature, cfg, filter_threshold,
                                                        top_p, draw, use_cache=fast))

        patches = torch.zeros(bsz, self.seq_len, 3 * self.patch_size ** 2, device=device)
        if known is not None:
            known_p, known_mask_p, full = known_patches(known, known_mask, self.patch_size, patches.dtype, device)
            patches = torch.where(full.unsqueeze(-1), known_p, patches)
            mask = (~full).float()
        else:
            full = None
            mask = torch.ones(bsz, self.seq_len, device=device)
        n_unknown = mask.sum(dim=-1, keepdim=True)  # [B, 1]
        n_unknown_rows = torch.cat([n_unknown, n_unknown], dim=0) if guided else n_unknown  # per predict row

        rand = torch.rand(bsz, self.seq_len)  # CPU RNG, as the reference
        if full is not None:
            rand = rand + 2.0 * full.cpu().float()  # known patches go last, so they are never masked
        orders = torch.argsort(rand, dim=1).long().to(device)
        num_iter = min(self.seq_len, num_iter)

        for step in range(num_iter):
            cur_patches = patches.clone()
            if guided:
                patches = torch.cat([patches, patches], dim=0)
                mask = torch.cat([mask, mask], dim=0)
            cond_list_next = self.predict(patches, mask, cond_list)

            # Cosine schedule of MAR; the reference scales seq_len, we scale the unknown count per row
            # (identical when nothing is known).
            mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
            if full is None:
                mask_len = torch.tensor([np.floor(self.seq_len * mask_ratio)], dtype=torch.float32, device=device)
            else:
                mask_len = torch.floor(n_unknown_rows.double() * mask_ratio).float()
            mask_len = torch.maximum(torch.ones((), device=device),
                                     torch.minimum(mask.sum(dim=-1, keepdim=True) - 1, mask_len))
            if full is not None:
                mask_len = torch.minimum(mask_len, n_unknown_rows)
            mask_next = mask_by_order(mask_len[:bsz, 0], orders, self.seq_len)
            if step >= num_iter - 1:
                mask_to_pred = mask[:bsz].bool()
            else:
                mask_to_pred = torch.logical_xor(mask[:bsz].bool(), mask_next.bool())
            mask = mask_next
            if guided:
                mask_to_pred = torch.cat([mask_to_pred, mask_to_pred], dim=0)

            sel = mask_to_pred.nonzero(as_tuple=True)
            cond_list_next = [c[sel] for c in cond_list_next]

            if cfg_schedule == "linear":
                if full is None:
                    cfg_iter = 1 + (cfg - 1) * (self.seq_len - mask_len[0]) / self.seq_len
                else:  # per row, progress over that row's unknown patches
                    progress = (n_unknown[:, 0] - mask_len[:bsz, 0]) / n_unknown[:, 0].clamp(min=1)
                    cfg_iter = 1 + (cfg - 1) * progress
            else:
                cfg_iter = cfg
            if isinstance(cfg_iter, torch.Tensor) and cfg_iter.numel() > 1:
                cfg_iter = cfg_iter.reshape(-1)[sel[0][: sel[0].numel() // (2 if guided else 1)]]

            pred_half = mask_to_pred[:bsz]
            n_pred = int(pred_half.sum())
            if n_pred > 0:
                kwargs = {}
                if known is not None:
                    hsel = pred_half.nonzero(as_tuple=True)
                    p = self.patch_size
                    kwargs = dict(known=known_p[hsel].reshape(-1, 3, p, p),
                                  known_mask=known_mask_p[hsel].reshape(-1, 3, p, p))
                sampled = next_level_sample_function(cond_list=cond_list_next, cfg=cfg_iter, temperature=temperature,
                                                     filter_threshold=filter_threshold, **kwargs)
                sampled = sampled.reshape(sampled.size(0), -1)
                cur_patches[pred_half.nonzero(as_tuple=True)] = sampled.to(cur_patches.dtype)
            patches = cur_patches.clone()
            if visualize:
                visualize(self.unpatchify(patches))

        return self.unpatchify(patches)

    def _sample_guiding_pixel(self, cond_list: List[torch.Tensor], guided: bool, temperature: float, cfg,
                              filter_threshold: float, top_p: float, draw, use_cache: bool) -> torch.Tensor:
        """The guiding pixel of every row ``[rows, 3]`` (doubled for the CFG halves), the extra condition of
        this level's tokens."""
        pixels = self.guiding_pixel_loss.sample(cond_list, temperature, cfg, filter_threshold, top_p=top_p,
                                                draw=draw, use_cache=use_cache)
        return torch.cat([pixels, pixels], dim=0) if guided else pixels

    def blocks_eval(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer blocks and the final norm in eval mode, ``[N, T, E] -> [N, T, E]``: the fast engine's
        stack (:func:`fractal_models.engine.mar.blocks_eval`), the part ``generate(compile=True)`` compiles."""
        return _engine.blocks_eval(self, x)
