"""The pixel head (``PixelLoss``): a 4-token causal transformer (condition, R, G, B) with 256-way logits.

Module tree and parameter names match ``models/pixelloss.py`` of the reference, so checkpoints map one to
one. Numerics kept on purpose (see comments at each spot): LayerNorm eps 1e-6, scores in the input dtype
(no fp32 upcast here, unlike the MAR/AR levels), logits in fp32 with autocast off, the ``1e-2`` rounding
noise on targets, the temperature that *multiplies* logits.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fractal_kernels.nn.attention import CausalAttention
from fractal_kernels.reference.pixel_head import VOCAB
from fractal_kernels.reference.pixel_sampling import CfgLike, pixel_probs_reference
from fractal_models.layers import Mlp, autocast_on, init_vit_weights, kernel_backend, use_kernel

PIX_MEAN = (0.485, 0.456, 0.406)
PIX_STD = (0.229, 0.224, 0.225)

# A pixel draw: (probs [B, 256], channel 0/1/2) -> int64 ids [B].
PixelDraw = Callable[[torch.Tensor, int], torch.Tensor]


def multinomial_draw(probs: torch.Tensor, channel: int) -> torch.Tensor:
    """The reference's draw: ``torch.multinomial`` on the global RNG."""
    return torch.multinomial(probs, num_samples=1).reshape(-1)


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

        ``use_cache=True`` is the fast path (:meth:`sample_cached`): one new token per channel against
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

    # ------------------------------------------------------------------ fast path: KV-cached sampling
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
        """:meth:`sample` with a KV cache: channel ``c`` runs only token ``c`` (condition, R, G) through the
        blocks, its query attending to the cached keys/values of the earlier tokens.

        Equal to :meth:`sample` because the pixel head is causal: channel c's logits come from token c,
        which sees tokens 0..c only, and those are the same at every step (the condition, then the ids
        already drawn). The global RNG is consumed exactly as the reference does (one ``randn`` of
        ``[rows, 3]`` per channel for the target-rounding noise, then the draw), so seeded runs match
        too. Inference only (no dropout); plain fp32 PyTorch math in the reference's op order, whatever
        the backend (the draw still uses the fused sampler on a kernel backend, as :meth:`sample` does).
        """
        guided = not _is_one(cfg)
        cond = cond_list[0]
        rows = cond.size(0)
        bsz = rows // 2 if guided else rows
        device = cond.device
        draw = draw or multinomial_draw
        head_backend = self._fused_head_backend(device)
        if (head_backend is not None and known is None and not return_probs
                and (draw is multinomial_draw or hasattr(draw, "uniforms"))
                and not self.__dict__.get("_fused_head_failed")):
            try:
                return self._sample_fused_head(cond, bsz, guided, temperature, cfg, filter_threshold, top_p, draw,
                                               head_backend)
            except Exception as e:  # noqa: BLE001 - auto dispatch degrades, a forced backend does not
                if self.backend != "auto":
                    raise
                warnings.warn(f"fractal_kernels: the fused pixel head failed on {device} ({type(e).__name__}: "
                              f"{str(e)[:200]}); backend 'auto' falls back to the KV-cached PyTorch path for this "
                              f"head", RuntimeWarning)
                self.__dict__["_fused_head_failed"] = True
        mean, std = self._channel_stats(device)
        if known is not None:
            known = known.reshape(bsz, 3).to(device=device, dtype=torch.float32)
            known_mask = known_mask.reshape(bsz, 3).to(device=device, dtype=torch.bool)
        fused = use_kernel(self.backend, device) and (draw is multinomial_draw or hasattr(draw, "uniforms"))
        pad = _gemm_pad(rows)
        width = self.ln.normalized_shape[0]
        # per call, not per channel and block: the zero qkv rows past the token and the causal mask
        zeros = torch.zeros(rows + pad, 2, 3 * width, device=device, dtype=self.blocks[0].attn.qkv.weight.dtype)
        masked = ~torch.ones(4, 4, dtype=torch.bool, device=device).tril()
        caches: List[List[torch.Tensor]] = [[] for _ in self.blocks]
        codebooks = self._codebooks()
        values, all_probs = [], []
        ids = None  # ids of the previous channel, one per row [rows]
        for i in range(3):
            # The reference's rounding noise (target_ids on the [rows, 3] input): drawn for the RNG stream.
            noise = torch.randn(rows, 3, device=device, dtype=torch.float32)
            if i == 0:
                x = self.cond_proj(cond)
                # the reference concatenates this token with codebook embeddings: under autocast the bf16
                # projection is promoted to the tables' dtype before the LayerNorm; do the same
                token_dtype = torch.promote_types(x.dtype, codebooks[0][0].weight.dtype)
                if x.dtype != token_dtype:
                    x = x.to(token_dtype)
            else:
                if known is not None:  # the reference's rounding of the previous channel, row by row
                    col = torch.cat([values[-1], values[-1]]) if guided else values[-1]
                    ids = ((col * std[i - 1] + mean[i - 1]) * 255 + 1e-2 * noise[:, i - 1]).round().long()
                # else ids are the drawn ones: (id / 255 - m) / s maps back to id within 1e-4, the noise adds
                # |1e-2 * randn| < 0.1, so the reference's rounding returns the drawn id exactly
                x = codebooks[i - 1][0](ids)
            if pad:
                x = torch.cat([x, x[-1:].expand(pad, -1)])
            h = self._token_step(x.unsqueeze(1), i, caches, pad, zeros, masked)
            with torch.autocast(device_type=h.device.type, enabled=False):
                cb, mlm = codebooks[i]
                h = h[:rows, 0] if pad else h[:, 0]
                w = cb.weight
                logits = mlm(h if h.dtype == torch.float32 else h.float(),
                             w if w.dtype == torch.float32 else w.float())
            sampled_ids, probs = self._draw_channel(logits, i, bsz, guided, fused, temperature, cfg, filter_threshold,
                                                    top_p, draw, return_probs)
            if known is not None:
                value = (sampled_ids.float() / 255 - mean[i]) / std[i]
                values.append(torch.where(known_mask[:, i], known[:, i], value))
            else:
                values.append(sampled_ids)  # mapped to pixel values below, all channels in one go
                if i < 2:
                    ids = torch.cat([sampled_ids, sampled_ids]) if guided else sampled_ids
            all_probs.append(probs)
        if known is not None:
            pixel_values = torch.stack(values, dim=1)
        else:
            pixel_values = self._ids_to_values(torch.stack(values, dim=1))
        if return_probs:
            return pixel_values, torch.stack(all_probs)
        return pixel_values

    def _fused_head_backend(self, device: torch.device) -> Optional[str]:
        """The ``pixel_head_sample`` backend :meth:`sample_cached` runs the whole pixel with, or None for the
        KV-cached PyTorch path: the model's kernel backend on a GPU; on a CPU with ``backend="auto"``, the
        compiled C++ kernel when it builds here (fp32 weights, no autocast: it computes in fp32 only, so a bf16
        run keeps the PyTorch path whose rounding matches the reference's)."""
        if use_kernel(self.backend, device):
            return "triton" if self.backend == "cuda" else self.backend  # no CUDA-extension version of this op
        if (self.backend == "auto" and device.type == "cpu" and not autocast_on("cpu")
                and self.cond_proj.weight.dtype == torch.float32):
            from fractal_kernels import cpu
            if cpu.library() is not None:
                return "cpu"
        return None

    def _sample_fused_head(self, cond: torch.Tensor, bsz: int, guided: bool, temperature: float, cfg: CfgLike,
                           filter_threshold: float, top_p: float, draw: PixelDraw, backend: str) -> torch.Tensor:
        """The whole pixel (3 channels, both CFG halves, the sampler) in one :func:`fractal_kernels.pixel_head_sample`
        call: one launch on a GPU (one C++ call on a CPU) instead of ~100 ops; ``backend`` from
        :meth:`_fused_head_backend`.

        Draws: with ``draw.uniforms`` (the equivalence mode) those uniforms; on the CPU kernel with the reference's
        ``torch.multinomial`` draw, the Exp(1) noise ``torch.multinomial`` would draw, made here in the reference's
        order, so the op picks the reference's ids (up to near-ties of the logits' last bits); else Philox from
        one seed per call. In the first two modes the reference's rounding-noise draws are made too, so the
        global RNG stream (and the random orders of the levels above) stays the reference's."""
        from fractal_kernels.ops.pixel_head import pixel_head_sample
        device = cond.device
        uniforms = exponentials = None
        if hasattr(draw, "uniforms"):
            uniforms = torch.stack([draw.uniforms(bsz, c).to(device) for c in range(3)])
            for _ in range(3):
                torch.randn(cond.size(0), 3, device=device)
        elif backend == "cpu":
            # per channel the reference draws randn(rows, 3) (rounding noise), then multinomial's Exp(1) noise
            exponentials = torch.empty(3, bsz, VOCAB, device=device)
            for c in range(3):
                torch.randn(cond.size(0), 3, device=device)
                exponentials[c].exponential_()
        cfg_arg = cfg
        if not guided:  # e.g. per-row cfg values that are all 1 (known pixels at cfg 1): unguided rows only
            cfg_arg = 1.0
        elif isinstance(cfg, torch.Tensor):
            cfg_arg = cfg.reshape(-1).to(device) if cfg.numel() > 1 else float(cfg)
        ids = pixel_head_sample(cond, self._packed_weights(), self.blocks[0].attn.num_heads if self.blocks else 1,
                                guided=guided, cfg=cfg_arg, temperature=1.0 / temperature,
                                filter_threshold=filter_threshold, top_p=top_p, uniforms=uniforms,
                                exponentials=exponentials,
                                backend=backend)
        return self._ids_to_values(ids)

    def _ids_to_values(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixel ids ``[B, 3]`` -> normalised values ``[B, 3]`` by table lookup: one op instead of four, the
        table holding exactly ``(id / 255 - mean) / std`` in float32 (the reference's math). Id -1 (a row
        without a finite logit, see :func:`fractal_kernels.pixel_head_sample`) maps to NaN."""
        cache = self.__dict__.setdefault("_value_table_cache", {})
        if ids.device not in cache:
            mean, std = self._stats(ids.device)
            table = (torch.arange(256, device=ids.device, dtype=torch.float32) / 255 - mean[:, None]) / std[:, None]
            table = torch.cat([table, table.new_full((3, 1), float("nan"))], dim=1)  # [3, 257]; column -1 = NaN
            cache[ids.device] = (table, torch.arange(3, device=ids.device).view(1, 3))
        table, channel = cache[ids.device]
        return table[channel, ids]

    def _packed_weights(self):
        """This head's weights packed for :func:`pixel_head_sample`, re-packed only when a parameter changed
        (in place or replaced: keyed on storage pointers and version counters)."""
        from fractal_kernels.reference.pixel_head import pack_pixel_head_weights
        # the submodules are listed once (walking the module tree each call costs more than the fused CPU head);
        # their parameter dicts are read every call, so a replaced parameter is seen
        modules = self.__dict__.get("_module_list")
        if modules is None:
            modules = self.__dict__["_module_list"] = list(self.modules())
        # a dtype or device change makes new storage, so the pointer and version counter cover it
        key = tuple((p.data_ptr(), p._version) for m in modules for p in m._parameters.values() if p is not None)
        cached = self.__dict__.get("_packed_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, pack_pixel_head_weights(self))
            self.__dict__["_packed_cache"] = cached
        return cached[1]

    def _channel_stats(self, device: torch.device) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per-channel 0-d mean/std tensors on ``device`` (the values of :meth:`_stats`), made once per device."""
        cache = self.__dict__.setdefault("_channel_stats_cache", {})
        if device not in cache:
            mean, std = self._stats(device)
            cache[device] = (list(mean.unbind(0)), list(std.unbind(0)))
        return cache[device]

    def _token_step(self, x: torch.Tensor, pos: int, caches: List[List[torch.Tensor]], pad: int,
                    zeros: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden state ``[N, 1, W]`` of token ``pos`` (embedded ``x`` ``[N, 1, W]``), given the
        cached qkv rows of tokens ``0..pos-1`` (one list per block); appends this token's. Mirrors
        :class:`CausalBlock` / :class:`CausalAttention` (torch path) for that token's row.

        LayerNorms, Linear layers and the MLP run on this token only. The attention itself (a few hundred
        FLOPs per row) runs on the reference's exact shapes and layout, the 4-token qkv ``[N, 4, 3W]`` with
        zeros past ``pos`` (``zeros`` ``[N, 2, 3W]``), and keeps output row ``pos``: the GEMMs then round
        exactly like the reference's (a ``[1, D] @ [D, pos + 1]`` product may take another BLAS kernel). The
        zero rows never matter: the causal mask (``masked``: True above the diagonal) gives them probability 0
        and ``0 * v`` adds an exact zero. Same ops as :func:`attention_reference` with ``scores_fp32=False``,
        minus the no-op casts. The last ``pad`` rows of ``x`` are dummies (see :func:`_gemm_pad`); the
        attention runs without them, on the reference's batch."""
        x = self.ln(x)
        n, _, c = x.shape
        m = n - pad
        for block, cache in zip(self.blocks, caches):
            attn = block.attn
            qkv_t = attn.qkv(block.norm1(x))  # [N, 1, 3W]
            cache.append(qkv_t)
            if pos == 0:
                # one visible key: softmax is exactly 1, and 1 * v0 + exact zeros is v0 in the reference too
                o = qkv_t[:, :, 2 * c:]
            else:
                if zeros.dtype != qkv_t.dtype:  # under autocast
                    zeros = zeros.to(qkv_t.dtype)
                qkv = torch.cat(cache + [zeros if pos == 1 else zeros[:, :1]], dim=1)
                if pad:
                    qkv = qkv[:m]
                qkv = qkv.reshape(m, 4, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)  # [N, H, 4, Dh]
                with torch.autocast(device_type=x.device.type, enabled=False):
                    scores = (q @ k.transpose(-2, -1)) * attn.scale  # input dtype, as the reference
                scores = scores.masked_fill(masked, float("-inf"))
                acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # promote_types(q, fp32)
                probs = torch.softmax(scores if scores.dtype == acc else scores.to(acc), dim=-1)
                o = (probs if probs.dtype == v.dtype else probs.to(v.dtype)) @ v
                o = o.transpose(1, 2)[:, pos:pos + 1].reshape(m, 1, c)
                if pad:
                    o = torch.cat([o, o[-1:].expand(pad, -1, -1)])
            x = x + attn.proj(o)
            mlp = block.mlp
            x = x + mlp.fc2(mlp.act(mlp.fc1(block.norm2(x))))
        return self.norm(x)

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


def _gemm_pad(rows: int) -> int:
    """Dummy rows to add to the cached pixel head's token batch so its matmuls round like the reference's.

    The reference runs the blocks' Linear layers on ``4 * rows`` token rows; a GEMM's rounding of a row can
    depend on the number of rows M: CPU BLAS takes other kernels, summing in another order, for small M, and
    which M depends on the CPU (MKL on AVX2 for M < 12 not a multiple of 4; on AVX-512 for some M up to 15,
    depending on K and N). Below 16 rows the one-token batch is padded to the reference's own ``4 * rows``
    rows (the same kernel; a negligible cost at that size); from 16 rows on both sides are past every
    small-M kernel seen, and no padding is needed."""
    return 3 * rows if 0 < rows < 16 else 0


def _is_one(cfg: CfgLike) -> bool:
    """The reference's ``cfg == 1.0`` test, also for per-row tensors (guidance off only if all are 1)."""
    if isinstance(cfg, torch.Tensor):
        return bool((cfg == 1.0).all())
    return cfg == 1.0
