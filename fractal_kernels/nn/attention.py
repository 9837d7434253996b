"""The MAR level's and the pixel head's attention as ``nn.Module`` drop-ins over :func:`tiny_attention_packed`.

Both keep the public reference's parameter names (``qkv``, ``proj``) and constructor arguments, so a
reference checkpoint loads unchanged. ``backend`` (see :mod:`fractal_kernels.nn.backend`): on ``"torch"`` the
reference math op for op; otherwise the packed kernel entry, which reads q, k, v straight from the qkv
projection's ``[B, L, 3C]`` output and returns ``[B, L, C]`` for the output projection (no copies).

* :class:`Attention` -- bidirectional, fp32 scores with autocast off and the explicit ``attn - max(attn)``
  (``models/mar.py``);
* :class:`CausalAttention` -- causal over the pixel head's 4 tokens, scores in the input dtype
  (``models/pixelloss.py``; the kernel computes them in fp32: identical in fp32).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fractal_kernels.nn.backend import attn_dropout, kernel_backend, use_kernel
from fractal_kernels.ops.tiny_attention import tiny_attention_packed
from fractal_kernels.reference.attention import attention_reference


class Attention(nn.Module):
    """Bidirectional multi-head self-attention of a MAR level, ``[B, L, C] -> [B, L, C]``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = "torch"  # "torch": the reference math; otherwise fractal_kernels.tiny_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.project(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Attention and output projection, without the final dropout (the fast path skips the no-op call)."""
        bsz, seq, c = x.shape
        if use_kernel(self.backend, x.device):
            # the kernel reads q, k, v straight from the projection's [B, L, 3C] output (fp32 scores)
            o = tiny_attention_packed(self.qkv(x), self.num_heads, scale=self.scale,
                                      dropout_p=attn_dropout(self.training, self.attn_drop.p),
                                      backend=kernel_backend(self.backend))
            return self.proj(o)
        q, k, v = self.qkv(x).reshape(bsz, seq, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # Reference numerics: fp32 scores (autocast off), explicit max subtraction, fp32 softmax. [B, H, L, Dh]
        o = attention_reference(q, k, v, causal=False, scale=self.scale, scores_fp32=True, subtract_max=True,
                                dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(bsz, seq, c))



class CausalAttention(nn.Module):
    """Causal multi-head self-attention of the pixel head, ``[B, L, C] -> [B, L, C]``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, c = x.shape
        if use_kernel(self.backend, x.device):
            # fp32 scores in the kernel (the reference uses the input dtype here: identical in fp32)
            o = tiny_attention_packed(self.qkv(x), self.num_heads, causal=True, scale=self.scale,
                                      dropout_p=attn_dropout(self.training, self.attn_drop.p),
                                      backend=kernel_backend(self.backend))
            return self.proj_drop(self.proj(o))
        qkv = self.qkv(x).reshape(bsz, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, 4, Dh]
        # Reference numerics: scores in the input dtype here (pixelloss.py does not upcast).
        o = attention_reference(q, k, v, causal=True, scale=self.scale, scores_fp32=False,
                                dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(bsz, seq, c)))
