"""The AR level's (LlamaGen-style) attention with 2-D RoPE and a KV cache, as an ``nn.Module`` drop-in.

Parameter names (``wqkv``, ``wo``) and the constructor (``Attention(config)``, config with ``dim``, ``n_head``,
``attn_dropout_p``, ``resid_dropout_p``: LlamaGen's ``ModelArgs`` or :class:`AttentionArgs`) are the public
reference's (``models/ar.py``). ``backend`` (see :mod:`fractal_kernels.nn.backend`): on ``"torch"`` the
reference math (RoPE in fp32 cast back, fp32 scores with autocast off, causal); otherwise full passes run
:func:`tiny_attention` on the rotated q, k, and cached decode steps :func:`tiny_attention_decode` -- with RoPE
inside the kernel when the cache carries the level's table (``KVCache.freqs_cis``; the cache then holds
un-rotated keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from fractal_kernels.nn.backend import attn_dropout, kernel_backend, use_kernel
from fractal_kernels.ops.tiny_attention import tiny_attention, tiny_attention_decode
from fractal_kernels.reference.attention import attention_reference


@dataclass
class AttentionArgs:
    """The fields of LlamaGen's ``ModelArgs`` that :class:`Attention` reads (defaults are the reference's)."""

    dim: int = 4096
    n_head: int = 32
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of ``x`` ``[B, L, H, D]`` by ``freqs_cis`` ``[L, D/2, 2]``; fp32 math, cast back."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([
        xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
        xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1],
    ], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache:
    """Keys/values ``[B, H, max_len, D]`` filled one position at a time (not a module: no state_dict)."""

    def __init__(self, bsz: int, max_len: int, n_head: int, head_dim: int, device, dtype,
                 freqs_cis: Optional[torch.Tensor] = None) -> None:
        # one buffer, so the fast path writes a position's key and value with one copy
        self.kv = torch.zeros(2, bsz, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.k, self.v = self.kv[0], self.kv[1]
        self.slots = None  # the fast path's per-position views of kv
        self.length = 0
        # The level's whole RoPE table, for the decode kernel (which caches un-rotated keys and rotates on load).
        self.freqs_cis = freqs_cis

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        self.k[:, :, pos:pos + n] = k.to(self.k.dtype)
        self.v[:, :, pos:pos + n] = v.to(self.v.dtype)
        self.length = pos + n
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class Attention(nn.Module):
    """Causal multi-head self-attention of an AR level with 2-D RoPE and an optional :class:`KVCache`
    (``kv_cache``, set by the level's ``setup_caches``), ``[B, L, C] -> [B, L, C]``."""

    def __init__(self, config: AttentionArgs) -> None:
        super().__init__()
        self.dim = config.dim
        self.head_dim = config.dim // config.n_head
        self.n_head = config.n_head
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.backend = "torch"

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: Optional[int] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask`` is accepted for LlamaGen's call signature and unused: the mask there is always causal."""
        return self.resid_dropout(self.attend(x, freqs_cis, input_pos))

    def attend(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: Optional[int] = None) -> torch.Tensor:
        """Attention and output projection, without the residual dropout (the fast path skips the no-op call)."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wqkv(x).split([self.dim, self.dim, self.dim], dim=-1)
        xq = xq.view(bsz, seqlen, self.n_head, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_head, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_head, self.head_dim)
        cached = self.kv_cache is not None and input_pos is not None
        if use_kernel(self.backend, x.device):
            if cached and getattr(self.kv_cache, "freqs_cis", None) is not None:
                # decode kernel: the cache keeps un-rotated keys; RoPE (fp32) is applied on load, q cast to the
                # cache's dtype (fp32, the reference's cache) first
                xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # [B, H, L, Dh]
                self.kv_cache.update(input_pos, xk, xv)
                cache = self.kv_cache
                out = tiny_attention_decode(xq.to(cache.k.dtype), cache.k, cache.v, cache.length,
                                            freqs_cis=cache.freqs_cis, backend=kernel_backend(self.backend))
            else:
                xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
                xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # [B, H, L, Dh] views
                if cached:
                    keys, values = self.kv_cache.update(input_pos, xk, xv)
                    out = tiny_attention_decode(xq.to(keys.dtype), keys, values, keys.shape[2],
                                                backend=kernel_backend(self.backend))
                else:
                    out = tiny_attention(xq, xk, xv, causal=True,
                                         dropout_p=attn_dropout(self.training, self.attn_dropout_p),
                                         backend=kernel_backend(self.backend))
            return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, self.dim))
        xq = apply_rotary_emb(xq, freqs_cis)
        xk = apply_rotary_emb(xk, freqs_cis)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # [B, H, L, Dh]
        if cached:
            keys, values = self.kv_cache.update(input_pos, xk, xv)
        else:
            keys, values = xk, xv
        # Reference numerics: fp32 scores with autocast off; causal (queries aligned to the last keys).
        out = attention_reference(xq, keys, values, causal=True, scores_fp32=True,
                                  dropout_p=self.attn_dropout_p if self.training else 0.0)
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)
        return self.wo(out)
