"""FractalGen: generators nested level by level, down to the pixel head.

Module tree, constructor arguments, parameter names and the methods ``forward``, ``sample``,
``generator``/``next_fractal`` match ``models/fractalgen.py`` of the public reference (LTH14/fractalgen),
so its checkpoints load with ``strict=True``. Device-agnostic: no ``.cuda()``; the label-drop uniforms
are drawn on the CPU RNG like the reference.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from fractal_models import likelihood, sampling
from fractal_models.ar import AR
from fractal_models.mar import MAR
from fractal_models.pixelloss import PIX_MEAN, PIX_STD, PixelLoss


class FractalGen(nn.Module):
    """Fractal generative model (one level; ``next_fractal`` holds the rest)."""

    def __init__(self, img_size_list: Sequence[int], embed_dim_list: Sequence[int], num_blocks_list: Sequence[int],
                 num_heads_list: Sequence[int], generator_type_list: Sequence[str], label_drop_prob: float = 0.1,
                 class_num: int = 1000, attn_dropout: float = 0.1, proj_dropout: float = 0.1,
                 guiding_pixel: bool = False, num_conds: int = 1, r_weight: float = 1.0,
                 grad_checkpointing: bool = False, fractal_level: int = 0, backend: str = "torch") -> None:
        super().__init__()
        n = len(img_size_list)
        for name, lst in (("embed_dim_list", embed_dim_list), ("num_blocks_list", num_blocks_list),
                          ("num_heads_list", num_heads_list), ("generator_type_list", generator_type_list)):
            if len(lst) != n:
                raise ValueError(f"{name} has {len(lst)} entries; expected {n} (one per entry of img_size_list)")
        if n < 2:
            raise ValueError(f"img_size_list needs at least 2 levels, got {list(img_size_list)}")
        for a, b in zip(img_size_list[:-1], img_size_list[1:]):
            if a % b != 0:
                raise ValueError(f"img_size_list must divide evenly level to level; {a} is not a multiple of {b}")
        if img_size_list[-1] != 1:
            raise ValueError(f"img_size_list must end at 1 (pixels), got {list(img_size_list)}")
        self.fractal_level = fractal_level
        self._backend = "torch"
        self.num_fractal_levels = n
        self.img_size = img_size_list[fractal_level]

        if fractal_level == 0:
            self.num_classes = class_num
            self.class_emb = nn.Embedding(class_num, embed_dim_list[0])
            self.label_drop_prob = label_drop_prob
            self.fake_latent = nn.Parameter(torch.zeros(1, embed_dim_list[0]))
            nn.init.normal_(self.class_emb.weight, std=0.02)
            nn.init.normal_(self.fake_latent, std=0.02)

        kind = generator_type_list[fractal_level]
        if kind == "ar":
            generator = AR
        elif kind == "mar":
            generator = MAR
        else:
            raise ValueError(f"generator_type_list[{fractal_level}] = {kind!r}; expected 'ar' or 'mar'")
        self.generator = generator(
            seq_len=(img_size_list[fractal_level] // img_size_list[fractal_level + 1]) ** 2,
            patch_size=img_size_list[fractal_level + 1],
            cond_embed_dim=embed_dim_list[fractal_level - 1] if fractal_level > 0 else embed_dim_list[0],
            embed_dim=embed_dim_list[fractal_level],
            num_blocks=num_blocks_list[fractal_level],
            num_heads=num_heads_list[fractal_level],
            attn_dropout=attn_dropout,
            proj_dropout=proj_dropout,
            guiding_pixel=guiding_pixel if fractal_level > 0 else False,
            num_conds=num_conds,
            grad_checkpointing=grad_checkpointing,
        )
        if fractal_level < n - 2:
            self.next_fractal = FractalGen(
                img_size_list=img_size_list, embed_dim_list=embed_dim_list, num_blocks_list=num_blocks_list,
                num_heads_list=num_heads_list, generator_type_list=generator_type_list,
                label_drop_prob=label_drop_prob, class_num=class_num, attn_dropout=attn_dropout,
                proj_dropout=proj_dropout, guiding_pixel=guiding_pixel, num_conds=num_conds, r_weight=r_weight,
                grad_checkpointing=grad_checkpointing, fractal_level=fractal_level + 1)
        else:
            # The last level's pixel head (the last generator type is unused, as in the reference).
            self.next_fractal = PixelLoss(c_channels=embed_dim_list[fractal_level], depth=num_blocks_list[fractal_level + 1],
                                          width=embed_dim_list[fractal_level + 1], num_heads=num_heads_list[fractal_level + 1],
                                          r_weight=r_weight)
        if fractal_level == 0:
            self.set_backend(backend)

    # ------------------------------------------------------------------ reference API
    def forward(self, imgs: torch.Tensor, cond_list: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        """Loss of normalised images ``[B, 3, S, S]``; at level 0 ``cond_list`` is the labels ``[B]``.

        Train mode: the training loss (labels dropped with ``label_drop_prob`` for CFG). Eval mode: the
        unconditional NLL in nats per sub-pixel (every label replaced by the fake latent, as the reference
        does for Table 3).
        """
        if self.fractal_level == 0:
            labels = cond_list
            self._check_inputs(imgs, labels)
            class_embedding = self.class_emb(labels)
            if self.training:
                drop = (torch.rand(labels.size(0)) < self.label_drop_prob).unsqueeze(-1)
            else:
                drop = torch.ones(labels.size(0), 1)
            drop = drop.to(device=class_embedding.device, dtype=class_embedding.dtype)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
            cond_list = [class_embedding for _ in range(5)]
        imgs, cond_list, guiding_pixel_loss = self.generator(imgs, cond_list)
        loss = self.next_fractal(imgs, cond_list)
        return loss + guiding_pixel_loss

    def _check_inputs(self, imgs: torch.Tensor, labels: torch.Tensor) -> None:
        s = self.img_size
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or tuple(imgs.shape[1:]) != (3, s, s):
            raise ValueError(f"imgs: expected normalised images [B, 3, {s}, {s}] for this model, got "
                             f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs: expected a floating-point tensor (ImageNet-normalised), got {imgs.dtype}; "
                            "convert uint8 images with fractal_models.sampling.normalize_uint8")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != imgs.shape[0]:
            raise ValueError(f"labels: expected an integer tensor [{imgs.shape[0]}] (one per image), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
        if imgs.numel():
            # One host sync per call: values outside [0, 255] after de-normalising would index past the
            # pixel head's 256-entry tables deep inside the model; say so here instead.
            mean = torch.tensor(PIX_MEAN, device=imgs.device)
            std = torch.tensor(PIX_STD, device=imgs.device)
            lo = (imgs.detach().amin(dim=(0, 2, 3)).float() * std + mean) * 255
            hi = (imgs.detach().amax(dim=(0, 2, 3)).float() * std + mean) * 255
            if bool((lo < -0.5).any() | (hi > 255.5).any() | ~torch.isfinite(lo).all() | ~torch.isfinite(hi).all()):
                raise ValueError(f"imgs: values must be ImageNet-normalised pixels in [0, 255]; de-normalised range "
                                 f"per channel is min {[round(v, 1) for v in lo.tolist()]}, max "
                                 f"{[round(v, 1) for v in hi.tolist()]}")

    def sample(self, cond_list: List[torch.Tensor], num_iter_list: Sequence[int], cfg, cfg_schedule: str,
               temperature: float, filter_threshold: float, fractal_level: int, visualize=False, **extra: Any) -> torch.Tensor:
        """Reference sampling entry: normalised images ``[B, 3, S, S]`` from conditions (``[cond; uncond]``
        rows when ``cfg != 1``). ``extra`` (``top_p``, ``draw``, ``known``, ``known_mask``, ``fast``) are this
        library's additions; ``known``/``known_mask`` apply to this level only, the rest to every level.
        ``fast=True`` runs the fast engine at every level (host-sync-free MAR loops, lean KV-cached AR steps,
        KV-cached or fused pixel heads; see :func:`fractal_models.sampling.generate`): on the torch backend the
        same pixels as the reference loop in fp32."""
        fast = bool(extra.pop("fast", False))
        passdown = {k: v for k, v in extra.items() if k in ("top_p", "draw")}
        if fractal_level < self.num_fractal_levels - 2:
            if fast:
                passdown["fast"] = True
            next_fn = partial(self.next_fractal.sample, num_iter_list=num_iter_list, cfg_schedule="constant",
                              fractal_level=fractal_level + 1, **passdown)
        else:
            if fast:
                passdown["use_cache"] = True
            next_fn = partial(self.next_fractal.sample, **passdown)
        if fast:
            extra["fast"] = True
        return self.generator.sample(cond_list, num_iter_list[fractal_level], cfg, cfg_schedule, temperature,
                                     filter_threshold, next_fn, visualize, **extra)

    # ------------------------------------------------------------------ library API
    @property
    def backend(self) -> str:
        """Kernel backend of the fused ops: "torch" (the faithful reference path), "auto", "triton", "cuda"."""
        return self._backend

    def set_backend(self, backend: str) -> "FractalGen":
        """Switch every level's kernels to ``backend``; parameters and checkpoints are unaffected."""
        if backend not in ("torch", "auto", "triton", "cuda"):
            raise ValueError(f"backend: expected 'torch', 'auto', 'triton' or 'cuda', got {backend!r}")
        self._backend = backend
        for m in self.modules():
            if m is not self and hasattr(m, "backend") and not isinstance(m, FractalGen):
                m.backend = backend  # pixel heads and every attention module
        return self

    def levels(self) -> List[nn.Module]:
        """The generator of every level, top first, then the pixel head."""
        out, node = [], self
        while isinstance(node, FractalGen):
            out.append(node.generator)
            node = node.next_fractal
        out.append(node)
        return out

    def generate(self, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Class-conditional images as uint8 ``[B, 3, S, S]``; see :func:`fractal_models.sampling.generate`."""
        return sampling.generate(self, labels, **kwargs)

    def nll(self, imgs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Unconditional NLL in bits/dim; see :func:`fractal_models.likelihood.nll_bits_per_dim`."""
        return likelihood.nll_bits_per_dim(self, imgs, **kwargs)
