"""The pixel head (``PixelLoss``): a 4-token causal transformer (condition, R, G, B) with 256-way logits.

Module tree and parameter names match ``models/pixelloss.py`` of the reference, so checkpoints map one to
one. Numerics kept on purpose (see comments at each spot): LayerNorm eps 1e-6, scores in the input dtype
(no fp32 upcast here, unlike the MAR/AR levels), logits in fp32 with autocast off, the ``1e-2`` rounding
noise on targets, the temperature that *multiplies* logits.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fractal_kernels.nn.attention import CausalAttention
from fractal_kernels.reference.pixel_sampling import CfgLike, pixel_probs_reference
from fractal_models.engine import pixel_head as _engine
from fractal_models.engine.pixel_head import _gemm_pad  # noqa: F401 (moved to the engine; old import path)
from fractal_models.layers import PixelDraw, multinomial_draw  # noqa: F401 (public here too)
from fractal_models.layers import Mlp, init_vit_weights, kernel_backend, use_kernel
from fractal_models.layers import is_one as _is_one  # noqa: F401 (also the old import path)

PIX_MEAN = (0.485, 0.456, 0.406)
PIX_STD = (0.229, 0.224, 0.225)

class CausalBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CausalAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MlmLayer(nn.Module):
    """Output bias of one channel; the channel's embedding table is reused as the output matrix."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, word_embeddings.transpose(0, 1)) + self.bias


class PixelLoss(nn.Module):
    """Pixel head: ``predict`` gives R/G/B logits, ``forward`` the loss, ``sample`` normalised pixels."""

    vocab_size = 256

    def __init__(self, c_channels: int, width: int, depth: int, num_heads: int, r_weight: float = 1.0) -> None:
        super().__init__()
        # Plain attributes, not buffers: the reference's state_dict has no pixel mean/std entries.
        self.pix_mean = torch.tensor(PIX_MEAN)
        self.pix_std = torch.tensor(PIX_STD)
        self.cond_proj = nn.Linear(c_channels, width)
        self.r_codebook = nn.Embedding(256, width)
        self.g_codebook = nn.Embedding(256, width)
        self.b_codebook = nn.Embedding(256, width)
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList([
            CausalBlock(width, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=0, attn_drop=0)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.r_weight = r_weight
        self.r_mlm = MlmLayer(256)
        self.g_mlm = MlmLayer(256)
        self.b_mlm = MlmLayer(256)
        self.criterion = nn.CrossEntropyLoss(reduction="none")
        # Kernel backend: "torch" is the reference path; "auto"/"triton"/"cuda" use the fused ops.
        self.backend = "torch"
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.normal_(self.r_codebook.weight, std=0.02)
        nn.init.normal_(self.g_codebook.weight, std=0.02)
        nn.init.normal_(self.b_codebook.weight, std=0.02)
        self.apply(init_vit_weights)

    def _stats(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.pix_mean.to(device), self.pix_std.to(device)

    def target_ids(self, target: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3]`` -> int64 ids in [0, 255], as the reference rounds them.

        The reference adds ``1e-2 * randn`` before rounding (to break banker's-rounding ties of averaged
        guiding pixels); kept, including its use of the global RNG.
        """
        target = target.reshape(target.size(0), target.size(1))
        mean, std = self._stats(target.device)
        target = target * std.unsqueeze(0) + mean.unsqueeze(0)
        return (target * 255 + 1e-2 * torch.randn_like(target)).round().long()

    def hidden_from_ids(self, ids: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states ``[B, 4, W]`` (condition, R, G, B tokens), teacher-forced."""
        x = torch.cat([
            self.cond_proj(cond).unsqueeze(1),
            self.r_codebook(ids[:, 0:1]),
            self.g_codebook(ids[:, 1:2]),
            self.b_codebook(ids[:, 2:3]),
        ], dim=1)
        x = self.ln(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def logits_from_ids(self, ids: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, 3, 256]`` for pixel ids ``[B, 3]`` and condition ``[B, C]``."""
        x = self.hidden_from_ids(ids, cond)
        # Reference numerics: logits with autocast disabled, i.e. in fp32 for fp32 weights.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            r_logits = self.r_mlm(x[:, 0], self.r_codebook.weight.float())
            g_logits = self.g_mlm(x[:, 1], self.g_codebook.weight.float())
            b_logits = self.b_mlm(x[:, 2], self.b_codebook.weight.float())
        return torch.stack([r_logits, g_logits, b_logits], dim=1)

    def predict(self, target: torch.Tensor, cond_list: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reference API: normalised target ``[B, 3(,1,1)]`` -> (logits ``[B, 3, 256]``, ids ``[B, 3]``)."""
        ids = self.target_ids(target)
        # Only the middle condition is used by the pixel head.
        return self.logits_from_ids(ids, cond_list[0]), ids

    def _codebooks(self):
        return ((self.r_codebook, self.r_mlm), (self.g_codebook, self.g_mlm), (self.b_codebook, self.b_mlm))

    def _op_backend(self) -> Optional[str]:
        return kernel_backend(self.backend)

    def forward(self, target: torch.Tensor, cond_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Training loss (R weighted by ``r_weight``) in train mode; mean CE over R, G, B in eval mode."""
        if use_kernel(self.backend, target.device):
            return self._forward_fused(target, cond_list)
        logits, target = self.predict(target, cond_list)
        loss_r = self.criterion(logits[:, 0], target[:, 0])
        loss_g = self.criterion(logits[:, 1], target[:, 1])
        loss_b = self.criterion(logits[:, 2], target[:, 2])
        if self.training:
            loss = (self.r_weight * loss_r + loss_g + loss_b) / (self.r_weight + 2)
        else:
            loss = (loss_r + loss_g + loss_b) / 3  # NLL in nats per sub-pixel
        return loss.mean()

    def _forward_fused(self, target: torch.Tensor, cond_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Same loss through :func:`fractal_kernels.pixel_cross_entropy` (no ``[B, 256]`` logits kept)."""
        from fractal_kernels.ops.pixel_cross_entropy import pixel_cross_entropy
        ids = self.target_ids(target)
        h = self.hidden_from_ids(ids, cond_list[0])
        with torch.autocast(device_type=h.device.type, enabled=False):
            losses = [pixel_cross_entropy(h[:, c], cb.weight, mlm.bias, ids[:, c], backend=self._op_backend())
                      for c, (cb, mlm) in enumerate(self._codebooks())]
        if self.training:
            return (self.r_weight * losses[0] + losses[1] + losses[2]) / (self.r_weight + 2)
        return (losses[0] + losses[1] + losses[2]) / 3

    def sample(
        self,
        cond_list: Sequence[torch.Tensor],
        temperature: float,
        cfg: CfgLike,
        filter_threshold: float = 0,
        *,
        top_p: float = 1.0,
        draw: Optional[PixelDraw] = None,
        known: Optional[torch.Tensor] = None,
        known_mask: Optional[torch.Tensor] = None,
        return_probs: bool = False,
        use_cache: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Sample R, G, B in turn; returns normalised pixel values ``[B, 3]`` (as the reference does).

        ``cond_list`` rows are ``[cond; uncond]`` when ``cfg != 1``. ``draw`` replaces the multinomial
        draw (e.g. :func:`fractal_kernels.reference.inverse_cdf_draw` with given uniforms). ``known``
        ``[B, 3]`` normalised values and ``known_mask`` ``[B, 3]`` bool: known channels keep their value
        (used as context for the later channels) instead of the drawn one. ``return_probs`` also returns
        the probabilities of each channel ``[3, B, 256]``.

        ``use_cache=True`` is the fast engine's path (:meth:`sample_cached`): one new token per channel against
        cached keys/values instead of re-running all four tokens; same pixels bit for bit in fp32 with the
        torch backend. The default is the reference's loop.
        """
        if use_cache:
            return self.sample_cached(cond_list, temperature, cfg, filter_threshold, top_p=top_p, draw=draw,
                                      known=known, known_mask=known_mask, return_probs=return_probs)
        guided = not _is_one(cfg)
        rows = cond_list[0].size(0)
        bsz = rows // 2 if guided else rows
        device = cond_list[0].device
        draw = draw or multinomial_draw
        mean, std = self._stats(device)
        pixel_values = torch.zeros(bsz, 3, device=device)
        if known is not None:
            known = known.reshape(bsz, 3).to(device=device, dtype=pixel_values.dtype)
            known_mask = known_mask.reshape(bsz, 3).to(device=device, dtype=torch.bool)
        fused = use_kernel(self.backend, device) and (draw is multinomial_draw or hasattr(draw, "uniforms"))
        all_probs = []
        for i in range(3):
            inp = pixel_values if not guided else torch.cat([pixel_values, pixel_values], dim=0)
            logits, _ = self.predict(inp, cond_list)
            sampled_ids, probs = self._draw_channel(logits[:, i], i, bsz, guided, fused, temperature, cfg,
                                                    filter_threshold, top_p, draw, return_probs)
            value = (sampled_ids.float() / 255 - mean[i]) / std[i]
            if known is not None:
                value = torch.where(known_mask[:, i], known[:, i], value)
            pixel_values[:, i] = value
            all_probs.append(probs)
        if return_probs:
            return pixel_values, torch.stack(all_probs)
        return pixel_values

    def _draw_channel(self, logits, channel, bsz, guided, fused, temperature, cfg, filter_threshold, top_p, draw,
                      want_probs):
        """(ids ``[B]``, probs ``[B, 256]`` or None) of one channel from its logits ``[rows, 256]``."""
        if fused:
            return self._draw_fused(logits, bsz, guided, temperature, cfg, filter_threshold, top_p, draw, channel,
                                    want_probs)
        probs = pixel_probs_reference(logits, temperature=temperature, cfg=cfg, filter_threshold=filter_threshold,
                                      top_p=top_p, guided=guided)
        return draw(probs, channel), probs

    # ------------------------------------------------------------------ fast path: the engine's pixel head
    def sample_cached(
        self,
        cond_list: Sequence[torch.Tensor],
        temperature: float,
        cfg: CfgLike,
        filter_threshold: float = 0,
        *,
        top_p: float = 1.0,
        draw: Optional[PixelDraw] = None,
        known: Optional[torch.Tensor] = None,
        known_mask: Optional[torch.Tensor] = None,
        return_probs: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`sample` with a KV cache (the fast engine's, :func:`fractal_models.engine.pixel_head.sample_cached`):
        channel ``c`` runs only token ``c`` through the blocks; the same pixels and RNG stream as :meth:`sample`."""
        return _engine.sample_cached(self, cond_list, temperature, cfg, filter_threshold, top_p=top_p, draw=draw,
                                     known=known, known_mask=known_mask, return_probs=return_probs)

    # The engine calls these through the module, so they can be replaced per instance or class.
    def _fused_head_backend(self, device: torch.device) -> Optional[str]:
        return _engine.fused_head_backend(self, device)

    def _sample_fused_head(self, *args, **kwargs) -> torch.Tensor:
        return _engine.sample_fused_head(self, *args, **kwargs)

    def _ids_to_values(self, ids: torch.Tensor) -> torch.Tensor:
        return _engine.ids_to_values(self, ids)

    def _packed_weights(self):
        return _engine.packed_weights(self)

    def _token_step(self, *args, **kwargs) -> torch.Tensor:
        return _engine.token_step(self, *args, **kwargs)

    def _draw_fused(self, logits, bsz, guided, temperature, cfg, filter_threshold, top_p, draw, channel, want_probs):
        """One channel through :func:`fractal_kernels.sample_logits`. The reference multiplies logits by
        ``temperature``; the op divides, so it gets ``1 / temperature``."""
        from fractal_kernels.ops.sample_logits import sample_logits
        n = bsz
        cfg_arg = cfg
        if isinstance(cfg, torch.Tensor):
            cfg_arg = cfg.reshape(-1).to(logits.device) if cfg.numel() > 1 else float(cfg)
        uniforms = draw.uniforms(n, channel) if hasattr(draw, "uniforms") else None
        if uniforms is not None:
            uniforms = uniforms.to(logits.device)
        probs = torch.empty(n, logits.shape[-1], device=logits.device) if want_probs else None
        ids = sample_logits(logits[:bsz], logits[bsz:] if guided else None, cfg=cfg_arg if guided else 1.0,
                            temperature=1.0 / temperature, filter_threshold=filter_threshold, top_p=top_p,
                            uniforms=uniforms, out_probs=probs, backend=self._op_backend())
        return ids, probs
