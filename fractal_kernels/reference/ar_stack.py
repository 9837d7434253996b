"""Reference math of :func:`fractal_kernels.ops.ar_stack.ar_block_stack_decode`: one KV-cached decode step of an
AR level's whole block stack (LlamaGen blocks, ``fractal_models.ar``) plus the level's final LayerNorm.

Per block, for the one new token ``h`` ``[B, D]`` of every row (each row its own sequence, its own cache):

* ``n = RMSNorm_attention(h)``; ``q, k, v = n @ wqkv^T`` (no bias); q and k rotated by the RoPE table row
  ``pos`` (interleaved pairs ``(2i, 2i+1)`` within each head, fp32); the new rotated key and its value are
  written into the cache at ``pos``; ``q`` attends keys ``0..pos`` with scale ``head_dim ** -0.5``, fp32
  scores and softmax; ``h = h + o @ wo^T``;
* ``n = RMSNorm_ffn(h)``; ``h = h + (silu(n @ w1^T) * (n @ w3^T)) @ w2^T``;

then ``LayerNorm(h)`` (the level's ``norm``). The residual stream and every intermediate are fp32. A linear
with 16-bit weights rounds its input to the weight dtype (what autocast does) and accumulates the exact
products in fp32; fp32 weights take an fp32 matmul. The cache stores *rotated* keys in its own dtype.
The output has ``x``'s dtype. NaN in a row's input propagates to that row's output (and its cache) only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ArStackWeights(NamedTuple):
    """An AR level's block stack, per-block parameters stacked on a leading ``[NB]`` dimension.

    ``D`` = width, ``M`` = SwiGLU hidden width. Linear weights in one dtype (fp32 / bf16 / fp16, nn.Linear
    layout ``[out, in]``); norm parameters fp32.
    """
    wqkv: torch.Tensor       # [NB, 3D, D]
    wo: torch.Tensor         # [NB, D, D]
    w1: torch.Tensor         # [NB, M, D]
    w3: torch.Tensor         # [NB, M, D]
    w2: torch.Tensor         # [NB, D, M]
    attn_norm: torch.Tensor  # [NB, D] RMSNorm weights before attention
    ffn_norm: torch.Tensor   # [NB, D] RMSNorm weights before the feed-forward
    rms_eps: torch.Tensor    # [NB, 2] fp32 eps of (attention_norm, ffn_norm)
    norm_w: torch.Tensor     # [D] final LayerNorm weight
    norm_b: torch.Tensor     # [D] final LayerNorm bias
    norm_eps: float          # final LayerNorm eps


def pack_ar_stack(blocks, norm, dtype: torch.dtype) -> ArStackWeights:
    """Stack ``blocks`` (modules with ``attention.wqkv/wo``, ``feed_forward.w1/w2/w3`` Linear layers without
    bias, ``attention_norm``/``ffn_norm`` RMSNorms with ``weight`` and ``eps``; duck-typed) and the final
    LayerNorm ``norm`` into contiguous tensors on the parameters' device, linear weights in ``dtype``."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks: expected at least one block")
    with torch.no_grad():
        def stack(get, dt):
            return torch.stack([get(b).detach().to(dt) for b in blocks]).contiguous()
        dev = norm.weight.device
        eps = torch.tensor([[float(b.attention_norm.eps), float(b.ffn_norm.eps)] for b in blocks],
                           dtype=torch.float32, device=dev)
        return ArStackWeights(
            wqkv=stack(lambda b: b.attention.wqkv.weight, dtype), wo=stack(lambda b: b.attention.wo.weight, dtype),
            w1=stack(lambda b: b.feed_forward.w1.weight, dtype), w3=stack(lambda b: b.feed_forward.w3.weight, dtype),
            w2=stack(lambda b: b.feed_forward.w2.weight, dtype),
            attn_norm=stack(lambda b: b.attention_norm.weight, torch.float32),
            ffn_norm=stack(lambda b: b.ffn_norm.weight, torch.float32), rms_eps=eps,
            norm_w=norm.weight.detach().float().contiguous(), norm_b=norm.bias.detach().float().contiguous(),
            norm_eps=float(norm.eps))


def ar_stack_cache(weights: ArStackWeights, rows: int, max_len: int, device, dtype=torch.float32) -> torch.Tensor:
    """The op's KV cache ``[NB, 2, rows, max_len, D]`` (block, key/value, row, position, channel; head ``h``
    is channels ``h*HD .. (h+1)*HD``, so the layout does not depend on the head count). Keys are stored
    *rotated*. Uninitialised (``torch.empty``): the step at ``pos = p`` writes position ``p`` before any step
    reads it."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows: expected an int >= 0, got {rows!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
    nb, dim = weights.wo.shape[0], weights.wo.shape[1]
    return torch.empty(nb, 2, rows, max_len, dim, device=device, dtype=dtype)


def _linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # [B, K] @ [N, K]^T -> [B, N] in a's dtype (fp32; fp64 for the tests' rounding-faithful reference); 16-bit
    # weights: the input rounded to w's dtype, exact products
    if w.dtype in (torch.bfloat16, torch.float16):
        a = a.to(w.dtype).to(a.dtype)
    return a @ w.to(a.dtype).t()


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps.to(x.dtype)) * w.to(x.dtype)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # t [B, H, HD], cos/sin [HD/2]: pairs (2i, 2i+1) rotated by angle i
    x0, x1 = t.reshape(*t.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)


def ar_block_stack_decode_reference(x: torch.Tensor, weights: ArStackWeights, cache: torch.Tensor, pos: int,
                                    freqs_cis: torch.Tensor, num_heads: int, *,
                                    compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One decode step (module docstring): ``x`` ``[B, D]`` the new tokens, ``cache`` ``[NB, 2, B, T, D]``
    (written at ``pos``), ``freqs_cis`` ``[>pos, HD/2, 2]`` (cos, sin); returns the final-normed ``[B, D]``.

    ``compute_dtype`` float64 gives the tests a reference that rounds only where the kernel rounds (linear inputs
    to the weight dtype, cache writes to the cache dtype, the output to x's dtype) and is otherwise exact, so a
    check against it does not depend on the CPU's fp32 summation order. The RoPE table is read in fp32 (the
    kernel's), then widened."""
    w = weights
    bsz, dim = x.shape
    hd = dim // num_heads
    cd = compute_dtype
    h = x.to(cd)
    cos, sin = freqs_cis[pos].float().to(cd).unbind(-1)  # [HD/2] each
    for d in range(w.wqkv.shape[0]):
        n = _rms_norm(h, w.attn_norm[d], w.rms_eps[d, 0])
        q, k, v = _linear(n, w.wqkv[d]).split(dim, dim=-1)
        q = _rope(q.reshape(bsz, num_heads, hd), cos, sin)
        k = _rope(k.reshape(bsz, num_heads, hd), cos, sin)
        cache[d, 0, :, pos] = k.reshape(bsz, dim).to(cache.dtype)
        cache[d, 1, :, pos] = v.to(cache.dtype)
        # [B, H, pos+1, HD]
        keys = cache[d, 0, :, :pos + 1].to(cd).reshape(bsz, pos + 1, num_heads, hd).transpose(1, 2)
        values = cache[d, 1, :, :pos + 1].to(cd).reshape(bsz, pos + 1, num_heads, hd).transpose(1, 2)
        scores = (q.unsqueeze(2) @ keys.transpose(-2, -1)) * hd ** -0.5  # [B, H, 1, pos+1]
        o = (torch.softmax(scores, dim=-1) @ values).reshape(bsz, dim)
        h = h + _linear(o, w.wo[d])
        n = _rms_norm(h, w.ffn_norm[d], w.rms_eps[d, 1])
        h = h + _linear(F.silu(_linear(n, w.w1[d])) * _linear(n, w.w3[d]), w.w2[d])
    return F.layer_norm(h, (dim,), w.norm_w.to(cd), w.norm_b.to(cd), w.norm_eps).to(x.dtype)
