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
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fractal_kernels.nn.attention import Attention
from fractal_models.layers import (Mlp, autocast_on, init_vit_weights, known_patches, patchify, to_device_async,
                                   unpatchify, use_kernel)
from fractal_models.pixelloss import PixelLoss, _is_one


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


def mask_by_order(mask_len: torch.Tensor, order: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mask (1.0) the first ``mask_len[b]`` positions of ``order[b]``. ``mask_len`` ``[B]`` or ``[B, 1]``."""
    ranks = torch.arange(seq_len, device=order.device).expand(order.shape[0], seq_len)
    first = (ranks < mask_len.reshape(-1, 1).to(order.device)).float()
    return torch.zeros_like(first).scatter(-1, order, first)


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
    """Masked autoregressive generator of one level (see module docstring)."""

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
        ``fast`` samples the guiding pixel with the pixel head's KV cache (same values).
        """
        guided = not _is_one(cfg)
        bsz = cond_list[0].size(0) // 2 if guided else cond_list[0].size(0)
        device = cond_list[0].device
        if fast and known is None and not isinstance(cfg, torch.Tensor):
            return self._sample_fast(cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
                                     next_level_sample_function, visualize, top_p=top_p, draw=draw)
        if fast and known is not None:
            return self._sample_fast_known(cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
                                           next_level_sample_function, visualize, known=known,
                                           known_mask=known_mask, top_p=top_p, draw=draw)

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

    # ------------------------------------------------------------------ fast path
    def _sample_guiding_pixel(self, cond_list: List[torch.Tensor], guided: bool, temperature: float, cfg,
                              filter_threshold: float, top_p: float, draw, use_cache: bool) -> torch.Tensor:
        """The guiding pixel of every row ``[rows, 3]`` (doubled for the CFG halves), the extra condition of
        this level's tokens."""
        pixels = self.guiding_pixel_loss.sample(cond_list, temperature, cfg, filter_threshold, top_p=top_p,
                                                draw=draw, use_cache=use_cache)
        return torch.cat([pixels, pixels], dim=0) if guided else pixels

    def _sample_fast(self, cond_list: List[torch.Tensor], num_iter: int, cfg: float, cfg_schedule: str,
                     temperature: float, filter_threshold: float, next_level_sample_function: Callable,
                     visualize=False, *, top_p: float = 1.0, draw=None) -> torch.Tensor:
        """:meth:`sample` without host syncs and with far fewer operators; the same samples.

        Without known patches every row masks the same number of patches at every step, so the whole
        schedule (how many patches each step predicts, the linear CFG value) is known on the host up front:
        no ``nonzero``/``.item()`` in the loop. Every step's predicted positions come from one stable sort made
        before the loop (ascending within a step: the reference's row order), the five neighbour conditions of
        exactly those positions are gathered in one indexing op, the condition tokens are embedded once per
        call instead of once per step, and the results are scattered back in place. Same RNG draws in the same
        order (the guiding pixel, then the CPU orders), same math op for op on every value the reference keeps;
        the tests check the images are equal in fp32.
        """
        guided = not _is_one(cfg)
        rows = cond_list[0].size(0)
        bsz = rows // 2 if guided else rows
        device = cond_list[0].device
        seq_len = self.seq_len
        if self.guiding_pixel:
            cond_list = list(cond_list) + [self._sample_guiding_pixel(cond_list, guided, temperature, cfg,
                                                                      filter_threshold, top_p, draw, use_cache=True)]

        dim = 3 * self.patch_size ** 2
        patches = torch.zeros(bsz, seq_len, dim, device=device)
        orders = torch.argsort(torch.rand(bsz, seq_len), dim=1)  # CPU RNG, as the reference
        if orders.device != device:  # queued, not waited for: no host sync in the level loops
            orders = to_device_async(orders, device)
        num_iter = min(seq_len, num_iter)
        schedule = _mar_schedule(seq_len, num_iter, float(cfg), cfg_schedule)
        step_of_rank, neighbour_table = self._fast_tables(num_iter, schedule, device)

        # Prefix tokens [pix?, cond_{n-1}, ..., cond_0] (the order predict builds), embedded once.
        prefix = [self.cond_emb(cond_list[i]) for i in reversed(range(self.num_conds))]
        if self.guiding_pixel:
            prefix.insert(0, self.pix_proj(cond_list[-1]))
        prefix = torch.stack(prefix, dim=1)  # [rows, n_prefix, E]
        n_prefix = prefix.shape[1]
        rank = orders.argsort(dim=1)  # [B, L]: rank of each position in the masking order
        # Every step's predicted positions, ascending within the step (the reference's nonzero order): a stable
        # sort of the positions by the step that predicts them (which follows from their rank).
        pos = torch.sort(step_of_rank[rank], dim=1, stable=True).indices  # [B, L]: step 0's positions first
        # prefix tokens rank past every patch (never masked)
        ranks = F.pad(rank, (n_prefix, 0), value=seq_len)
        if guided:
            ranks = torch.cat([ranks, ranks], dim=0)
            pos_rows = torch.cat([pos, pos], dim=0)
        else:
            pos_rows = pos
        ranks = ranks.unsqueeze(-1)  # [rows, n_prefix + L, 1]
        mask_token = self.mask_token
        # fractal_models.engine.compiled_levels may install a compiled version for the call
        run_blocks = self.__dict__.get("_compiled_blocks") or self.blocks_eval
        # token indices of the 5 neighbour conditions of those positions; n_prefix + L is a zero token
        sizes = [n_pred for n_pred, _, _ in schedule]
        # per step, as views made once (slicing in the loop would be an op per step)
        neighbour_tokens = neighbour_table[pos_rows].split(sizes, dim=1)  # [rows, k_step, 5] each
        scatter_index = pos.unsqueeze(-1).expand(bsz, seq_len, dim).split(sizes, dim=1)  # [B, k_step, dim] each
        row_index = torch.arange(rows, device=device).view(rows, 1, 1)
        zero_token = None

        masked = seq_len  # patches still masked (the same count in every row)
        for step, (n_pred, n_next, cfg_iter) in enumerate(schedule):
            x = self.patch_emb(torch.cat([patches, patches], dim=0) if guided else patches)
            x = torch.cat([prefix, x], dim=1)
            if mask_token.dtype != x.dtype:
                mask_token = mask_token.to(x.dtype)
            x = torch.where(ranks < masked, mask_token, x)
            x = self.patch_emb_ln(x + self.pos_embed_learned)
            x = run_blocks(x)
            if n_pred > 0:
                if zero_token is None or zero_token.dtype != x.dtype:
                    zero_token = x.new_zeros(rows, 1, x.shape[-1])
                # [rows, k, 5, E]: middle, top, right, bottom, left conditions (zeros past the border)
                cond = torch.cat([x, zero_token], dim=1)[row_index, neighbour_tokens[step]]
                sampled = next_level_sample_function(cond_list=list(cond.reshape(rows * n_pred, 5, -1).unbind(1)),
                                                     cfg=cfg_iter, temperature=temperature,
                                                     filter_threshold=filter_threshold)
                sampled = sampled.reshape(bsz, n_pred, dim)
                patches.scatter_(1, scatter_index[step],
                                 sampled if sampled.dtype == patches.dtype else sampled.to(patches.dtype))
            masked = n_next
            if visualize:
                visualize(self.unpatchify(patches))
        return self.unpatchify(patches)

    def _sample_fast_known(self, cond_list: List[torch.Tensor], num_iter: int, cfg, cfg_schedule: str,
                           temperature: float, filter_threshold: float, next_level_sample_function: Callable,
                           visualize=False, *, known: torch.Tensor, known_mask: torch.Tensor, top_p: float = 1.0,
                           draw=None) -> torch.Tensor:
        """:meth:`sample` with known pixels, planned on the host: one device-to-host copy per call (which
        patches are fully known, needed for the CPU-drawn orders anyway) instead of several syncs per step.

        Every row has its own schedule here, so the plan (each step's mask, the predicted (row, patch) pairs
        in the reference's ``nonzero`` order, the per-row CFG values) is computed on CPU tensors with the
        reference's arithmetic, moved to the device once, and the loop only indexes. Same samples as the
        reference loop (the tests check equal images in fp32)."""
        guided = not _is_one(cfg)
        rows = cond_list[0].size(0)
        bsz = rows // 2 if guided else rows
        device = cond_list[0].device
        seq_len, p = self.seq_len, self.patch_size
        if self.guiding_pixel:
            cond_list = list(cond_list) + [self._sample_guiding_pixel(cond_list, guided, temperature, cfg,
                                                                      filter_threshold, top_p, draw, use_cache=True)]

        patches = torch.zeros(bsz, seq_len, 3 * p ** 2, device=device)
        known_p, known_mask_p, full = known_patches(known, known_mask, p, patches.dtype, device)
        # contiguous: results are written through a flat [B*L, D] view of it
        patches = torch.where(full.unsqueeze(-1), known_p, patches).contiguous()
        full_cpu = full.cpu()  # the one sync of the call
        rand = torch.rand(bsz, seq_len) + 2.0 * full_cpu.float()  # CPU RNG; known patches go last
        orders = torch.argsort(rand, dim=1)
        num_iter = min(seq_len, num_iter)

        # The plan, on CPU tensors, with the reference loop's arithmetic.
        mask = (~full_cpu).float()
        n_unknown = mask.sum(dim=-1, keepdim=True)  # [B, 1]
        n_unknown_rows = torch.cat([n_unknown, n_unknown], dim=0) if guided else n_unknown
        masks, picks, cfgs = [], [], []
        for step in range(num_iter):
            mask_rows = torch.cat([mask, mask], dim=0) if guided else mask
            masks.append(mask_rows)
            mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
            mask_len = torch.floor(n_unknown_rows.double() * mask_ratio).float()
            mask_len = torch.maximum(torch.ones(()), torch.minimum(mask_rows.sum(dim=-1, keepdim=True) - 1, mask_len))
            mask_len = torch.minimum(mask_len, n_unknown_rows)
            mask_next = mask_by_order(mask_len[:bsz, 0], orders, seq_len)
            pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), mask_next.bool())
            picks.append(pred.reshape(-1).nonzero()[:, 0])  # flat b * L + pos, the reference's nonzero order
            if cfg_schedule == "linear":
                progress = (n_unknown[:, 0] - mask_len[:bsz, 0]) / n_unknown[:, 0].clamp(min=1)
                cfgs.append(progress)
            mask = mask_next
        masks = torch.stack(masks).to(device)  # [S, rows, L]
        sizes = [int(t.numel()) for t in picks]
        picks_dev = torch.cat(picks).to(device).split(sizes)
        progress_dev = torch.stack(cfgs).to(device) if cfgs else None  # [S, B]
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  [B, L, X] -> [B*L, X]
        cfg_dev = cfg.reshape(-1).to(device) if isinstance(cfg, torch.Tensor) else cfg  # per row, or a float

        for step in range(num_iter):
            patch_rows = torch.cat([patches, patches], dim=0) if guided else patches
            conds = self.predict(patch_rows, masks[step], cond_list)
            n_pred = sizes[step]
            if n_pred > 0:
                pick = picks_dev[step]
                sel = torch.cat([pick, pick + bsz * seq_len]) if guided else pick
                cond_list_next = [flat(c)[sel] for c in conds]
                row_of_pick = pick // seq_len
                # per row as in the reference loop, then the rows of this step's picks
                cfg_iter = cfg
                if progress_dev is not None:
                    cfg_iter = 1 + (cfg_dev - 1) * progress_dev[step]
                if isinstance(cfg_iter, torch.Tensor) and cfg_iter.numel() > 1:
                    cfg_iter = cfg_iter.reshape(-1).to(device)[row_of_pick]
                sampled = next_level_sample_function(
                    cond_list=cond_list_next, cfg=cfg_iter, temperature=temperature, filter_threshold=filter_threshold,
                    known=flat(known_p)[pick].reshape(-1, 3, p, p), known_mask=flat(known_mask_p)[pick].reshape(-1, 3, p, p))
                patches.view(-1, patches.shape[-1])[pick] = sampled.reshape(n_pred, -1).to(patches.dtype)
            if visualize:
                visualize(self.unpatchify(patches))
        return self.unpatchify(patches)

    def _fast_tables(self, num_iter: int, schedule, device) -> tuple:
        """Per (iterations, device), made once: which step predicts the patch of each rank ``[L]`` and the
        ``[L, 5]`` token index of every patch's five neighbour conditions (``n_prefix + L`` = the zero token
        past the border)."""
        cache = self.__dict__.setdefault("_fast_tables_cache", {})
        key = (num_iter, device)
        if key not in cache:
            seq_len = self.seq_len
            step_of_rank, hi = [0] * seq_len, seq_len
            for step, (n_pred, _, _) in enumerate(schedule):
                step_of_rank[hi - n_pred:hi] = [step] * n_pred
                hi -= n_pred
            n_prefix = self.num_conds + int(self.guiding_pixel)
            cache[key] = (torch.tensor(step_of_rank, device=device), _neighbour_table(self.grid, device) + n_prefix)
        return cache[key]

    def blocks_eval(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer blocks and the final norm in eval mode, ``[N, T, E] -> [N, T, E]`` (no-op dropout
        calls skipped): the part of :meth:`predict` that ``generate(compile=True)`` compiles."""
        for block in self.blocks:
            x = _block_fast(block, x)
        return self.norm(x)


def _mar_schedule(seq_len: int, num_iter: int, cfg: float, cfg_schedule: str):
    """Per step (patches predicted, patches still masked after it, CFG value) of :meth:`MAR.sample` when no
    patch is known: the reference's tensor arithmetic replayed on the host, with float32 rounding where the
    reference computes in float32 (``mask_len``, ``cfg_iter``)."""
    masked = seq_len
    out = []
    for step in range(num_iter):
        mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = np.float32(np.floor(seq_len * mask_ratio))
        mask_len = max(1.0, min(float(masked - 1), float(mask_len)))
        n_next = int(mask_len)
        n_pred = masked if step >= num_iter - 1 else max(0, masked - n_next)
        if cfg_schedule == "linear":
            # reference: 1 + (cfg - 1) * (seq_len - mask_len[0]) / seq_len on a float32 0-d tensor
            t = np.float32(np.float32(cfg - 1) * np.float32(seq_len - mask_len))
            cfg_iter = float(np.float32(np.float32(1) + np.float32(t / np.float32(seq_len))))
        else:
            cfg_iter = cfg
        out.append((n_pred, n_next, cfg_iter))
        masked = n_next
    return out


def _neighbour_table(grid: int, device) -> torch.Tensor:
    """``[L, 5]`` indices of each patch's middle, top, right, bottom, left neighbour (``L`` = past the border),
    for gathering :func:`neighbour_conditions` of selected positions."""
    p = torch.arange(grid * grid, device=device)
    r, c = p // grid, p % grid
    zero = grid * grid
    return torch.stack([p, torch.where(r > 0, p - grid, zero), torch.where(c < grid - 1, p + 1, zero),
                        torch.where(r < grid - 1, p + grid, zero), torch.where(c > 0, p - 1, zero)], dim=1)


def _block_fast(block: Block, x: torch.Tensor) -> torch.Tensor:
    """:class:`Block` in eval mode without the no-op dropout calls (same math, op for op)."""
    attn = block.attn
    if (x.dtype == torch.float32 and not autocast_on(x.device.type)
            and not use_kernel(attn.backend, x.device)):
        return _block_fp32(block, x)
    x = x + attn.project(block.norm1(x))
    mlp = block.mlp
    return x + mlp.fc2(mlp.act(mlp.fc1(block.norm2(x))))


def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _block_fp32(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode block on fp32 without autocast, on the reference math with fewer dispatches: functional
    calls instead of module calls, and no no-op casts, autocast context or explicit ``scores - max(scores)``.
    Bit-identical to the reference: in fp32 the casts are no-ops, and softmax subtracts the row maximum itself
    (``(s - m) - 0`` rounds exactly like ``s - m``), so the exponentials see the same fp32 values (the fast-engine
    tests compare images bit for bit)."""
    attn, mlp = block.attn, block.mlp
    bsz, seq, c = x.shape
    qkv = F.linear(_ln(block.norm1, x), attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.reshape(bsz, seq, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    probs = torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(bsz, seq, c)
    x = x + F.linear(o, attn.proj.weight, attn.proj.bias)
    h = F.gelu(F.linear(_ln(block.norm2, x), mlp.fc1.weight, mlp.fc1.bias))
    return x + F.linear(h, mlp.fc2.weight, mlp.fc2.bias)
