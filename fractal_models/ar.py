"""AR level: a LLaMA-style causal transformer over the patches in raster order (from LlamaGen).

Module tree and parameter names match ``models/ar.py`` of the reference. Numerics and quirks kept on
purpose (see ``shared/WORKLOADS.md``):

* RMSNorm (eps 1e-5) computed in fp32 and cast back; SwiGLU hidden size ``find_multiple(int(8d/3), 256)``.
* 2-D RoPE applied in fp32 and cast back; the condition token's row of the table is all zeros, so its
  rotated q and k are zero vectors.
* fp32 attention scores with autocast off.
* The blocks use LlamaGen's defaults, not the model's dropout arguments: residual and FFN dropout 0.1
  whenever the module is in train mode (``attn_dropout``/``proj_dropout`` are ignored).
* Patch i is predicted from the output at position i (condition first; the last output is dropped).

The KV cache is a plain tensor pair per block that grows one position per step (the reference pads to a
multiple of 8 and masks; the attended keys and values are the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fractal_kernels.nn.rope_attention import Attention, KVCache, apply_rotary_emb  # noqa: F401 (public here too)
from fractal_models.engine import ar as _engine
from fractal_models.engine import graphs as _graphs
from fractal_models.layers import init_vit_weights, known_patches, patchify, unpatchify
from fractal_models.layers import is_one as _is_one


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    """The subset of LlamaGen's ``ModelArgs`` the AR level uses (defaults are the reference's)."""

    dim: int = 4096
    n_head: int = 32
    multiple_of: int = 256
    rope_base: float = 10000
    norm_eps: float = 1e-5
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        hidden_dim = find_multiple(int(2 * (4 * config.dim) / 3), config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(config.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.ffn(x))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU without the dropout (the fast path skips the no-op call)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def precompute_freqs_cis_2d(grid_size: int, n_elem: int, base: float = 10000, cls_token_num: int = 1) -> torch.Tensor:
    """2-D RoPE table ``[cls + grid², n_elem/2, 2]`` (cos, sin); half the pairs rotate with the row index,
    half with the column index; the ``cls_token_num`` condition rows are zeros (reference quirk)."""
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    t = torch.arange(grid_size, device=freqs.device)
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.cat([
        freqs[:, None, :].expand(-1, grid_size, -1),
        freqs[None, :, :].expand(grid_size, -1, -1),
    ], dim=-1)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: Optional[int] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class AR(nn.Module):
    """Raster-order autoregressive generator of one level (see module docstring).

    ``fused_stack`` (plain attribute, not in the state dict): whether the fast engine's sampling runs each
    step's blocks and final norm as one fused launch (``fractal_kernels.ops.ar_stack``) on a kernel backend:
    None = ``fractal_kernels.dispatch.choose_block_stack``'s width rule, True / False = force on / off.

    ``step_graphs`` (plain attribute, default False; GPU only, unmeasured): whether the fast engine's op-by-op step
    is replayed from per-position CUDA graphs kept on the level across ``sample()`` calls
    (:mod:`fractal_models.engine.graphs`); :meth:`release_step_graphs` frees them.
    """

    def __init__(self, seq_len: int, patch_size: int, cond_embed_dim: int, embed_dim: int, num_blocks: int,
                 num_heads: int, grad_checkpointing: bool = False, **kwargs) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.patch_size = patch_size
        self.grad_checkpointing = grad_checkpointing
        self.num_conds = 1  # only the middle condition is used, whatever num_conds the model was built with
        self.grid = int(math.isqrt(seq_len))
        if self.grid * self.grid != seq_len:
            raise ValueError(f"AR level needs a square number of patches, got seq_len={seq_len}")

        self.patch_emb = nn.Linear(3 * patch_size ** 2, embed_dim, bias=True)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + 1, embed_dim))
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim, bias=True)
        self.config = ModelArgs(dim=embed_dim, n_head=num_heads)
        self.blocks = nn.ModuleList([TransformerBlock(self.config) for _ in range(num_blocks)])
        # Plain attribute (not a buffer), as in the reference: not part of the state_dict.
        self.freqs_cis = precompute_freqs_cis_2d(self.grid, embed_dim // num_heads, self.config.rope_base, 1)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fused_stack: Optional[bool] = None
        self.step_graphs: bool = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_vit_weights)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid)

    def setup_caches(self, max_batch_size: int, max_seq_length: int, device=None, dtype=torch.float32,
                     freqs_cis: Optional[torch.Tensor] = None) -> None:
        """Attach an empty KV cache to every block (the reference keeps fp32 caches); ``freqs_cis``: the RoPE
        table already on ``device`` (default: a copy of the host table, shared by every block's cache)."""
        head_dim = self.config.dim // self.config.n_head
        if freqs_cis is None:
            freqs_cis = self.freqs_cis.to(device)
        for b in self.blocks:
            b.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_head, head_dim, device, dtype,
                                           freqs_cis=freqs_cis)

    def freqs_cis_on(self, device) -> torch.Tensor:
        """The RoPE table on ``device``, copied once per device and kept: the host table is a plain attribute
        (as in the reference), so copying it per call would be a blocking H2D copy -- a host sync -- in every
        call of the fast loop, i.e. once per step of the level above."""
        cache = self.__dict__.setdefault("_freqs_cis_on", {})
        device = torch.device(device)
        hit = cache.get(device)
        if hit is None or hit[0] is not self.freqs_cis:  # rebuilt if the host table was replaced
            hit = cache[device] = (self.freqs_cis, self.freqs_cis.to(device))
        return hit[1]

    def clear_caches(self) -> None:
        for b in self.blocks:
            b.attention.kv_cache = None

    def release_step_graphs(self) -> bool:
        """Free the step graphs, their static KV caches and buffers (``step_graphs``); True if there were any."""
        return _graphs.release(self)

    def _embed(self, x: torch.Tensor, cond_list: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.patch_emb(x)
        x = torch.cat([self.cond_emb(cond_list[0]).unsqueeze(1), x], dim=1)
        x = x + self.pos_embed_learned[:, : x.shape[1]]
        return self.patch_emb_ln(x)

    def predict(self, x: torch.Tensor, cond_list: Sequence[torch.Tensor], input_pos: Optional[int] = None) -> List[torch.Tensor]:
        """Full causal pass (``input_pos=None``): ``[B, L, C]`` outputs predicting patches 0..L-1.
        Cached step (``input_pos=i``, caches set up): processes position i only, returns ``[B, C]``."""
        if isinstance(input_pos, torch.Tensor):
            input_pos = int(input_pos.reshape(-1)[0])
        freqs = self.freqs_cis.to(x.device)
        if input_pos is not None:
            # Only token i is needed; embedding just it gives the same values as embedding all and slicing.
            if input_pos == 0:
                h = self.cond_emb(cond_list[0]).unsqueeze(1)
            else:
                h = self.patch_emb(x[:, input_pos - 1: input_pos])
            h = self.patch_emb_ln(h + self.pos_embed_learned[:, input_pos: input_pos + 1])
            freqs_cis = freqs[input_pos: input_pos + 1]
        else:
            h = self._embed(x, cond_list)
            freqs_cis = freqs[: h.shape[1]]
        if self.grad_checkpointing and self.training and input_pos is None:
            for block in self.blocks:
                h = checkpoint(block, h, freqs_cis, None, use_reentrant=False)
        else:
            for block in self.blocks:
                h = block(h, freqs_cis, input_pos)
        h = self.norm(h)
        return [h[:, 0]] if input_pos is not None else [h[:, :-1]]

    def forward(self, imgs: torch.Tensor, cond_list: List[torch.Tensor]):
        """Teacher-forced pass: returns (all patches ``[B*L, 3, p, p]``, next conditions, 0)."""
        patches = self.patchify(imgs)
        cond_list_next = [c.reshape(c.size(0) * c.size(1), -1) for c in self.predict(patches, cond_list)]
        patches = patches.reshape(patches.size(0) * patches.size(1), 3, self.patch_size, self.patch_size)
        return patches, cond_list_next, 0

    def sample(self, cond_list: List[torch.Tensor], num_iter: int, cfg, cfg_schedule: str, temperature: float,
               filter_threshold: float, next_level_sample_function: Callable, visualize=False, *,
               known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
               top_p: float = 1.0, draw=None, use_cache: bool = True, fast: bool = False) -> torch.Tensor:
        """Generate ``[B, 3, S, S]`` normalised images patch by patch (KV-cached unless ``use_cache=False``).

        Fully known patches (``known_mask``) are copied instead of generated; partly known ones are
        generated by the next level with their known sub-pixels passed down. ``fast`` (without known
        pixels): the fast engine's loop (:func:`fractal_models.engine.ar.sample`), the same samples with fewer
        operators.
        """
        guided = not _is_one(cfg)
        rows = cond_list[0].size(0)
        bsz = rows // 2 if guided else rows
        device = cond_list[0].device
        if fast and known is None and use_cache:
            return _engine.sample(self, cond_list, cfg, cfg_schedule, temperature, filter_threshold,
                                  next_level_sample_function, visualize)
        patches = torch.zeros(bsz, self.seq_len, 3 * self.patch_size ** 2, device=device)
        if known is not None:
            known_p, known_mask_p, full = known_patches(known, known_mask, self.patch_size, patches.dtype, device)
            if fast:  # plan on the host: one device read per call instead of a sync per step
                todo_cpu = [(~full_cpu_col).nonzero()[:, 0] for full_cpu_col in full.cpu().unbind(1)]
                todo_sizes = [int(t.numel()) for t in todo_cpu]
                todo_dev = torch.cat(todo_cpu).to(device).split(todo_sizes)  # rows to generate, per step
        if use_cache:
            self.setup_caches(rows, self.seq_len, device=device)
        try:
            for step in range(self.seq_len):
                cur_patches = patches.clone()
                inp = torch.cat([patches, patches], dim=0) if guided else patches
                if use_cache:
                    cond_next = self.predict(inp, cond_list, input_pos=step)
                else:
                    cond_next = [self.predict(inp, cond_list)[0][:, step]]
                if cfg_schedule == "linear":
                    cfg_iter = 1 + (cfg - 1) * (step + 1) / self.seq_len
                else:
                    cfg_iter = cfg
                if known is None:
                    sampled = next_level_sample_function(cond_list=cond_next, cfg=cfg_iter, temperature=temperature,
                                                         filter_threshold=filter_threshold)
                    cur_patches[:, step] = sampled.reshape(sampled.size(0), -1).to(cur_patches.dtype)
                else:
                    # rows whose patch still needs generating: host-planned indices (fast) or a bool mask
                    todo = todo_dev[step] if fast else ~full[:, step]
                    cur_patches[:, step] = torch.where(full[:, step, None], known_p[:, step], cur_patches[:, step])
                    if (todo_sizes[step] > 0) if fast else bool(todo.any()):
                        rows_sel = (torch.cat([todo, todo + bsz]) if fast else todo.repeat(2)) if guided else todo
                        if isinstance(cfg_iter, torch.Tensor) and cfg_iter.numel() > 1:
                            cfg_iter = cfg_iter.reshape(-1)[todo]
                        p = self.patch_size
                        sampled = next_level_sample_function(
                            cond_list=[c[rows_sel] for c in cond_next], cfg=cfg_iter, temperature=temperature,
                            filter_threshold=filter_threshold,
                            known=known_p[todo, step].reshape(-1, 3, p, p),
                            known_mask=known_mask_p[todo, step].reshape(-1, 3, p, p))
                        cur_patches[todo, step] = sampled.reshape(sampled.size(0), -1).to(cur_patches.dtype)
                patches = cur_patches.clone()
                if visualize:
                    visualize(self.unpatchify(patches))
        finally:
            self.clear_caches()
        return self.unpatchify(patches)
