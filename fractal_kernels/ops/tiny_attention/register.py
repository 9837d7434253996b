"""Tiny-sequence attention: the ``torch.library`` custom ops (``fractal_kernels::tiny_attention_fwd`` / ``_bwd``,
``_packed_fwd`` / ``_packed_bwd``, ``tiny_attention_decode``), their fake kernels and autograd formulas. Each
op's implementation calls a launcher of :mod:`.launch`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fractal_kernels.ops.tiny_attention.launch import _bwd_into, _fwd_into, _out_like_heads_last, _triton_fwd


# ---- custom ops: [N, H, L, D] entry -------------------------------------------------------------------

@torch.library.custom_op("fractal_kernels::tiny_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: Optional[torch.Tensor], causal: bool,
            scale: float, backend: str, dropout_p: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    N, H, L, D = q.shape
    o = _out_like_heads_last(q, L)
    lse = torch.empty(N, H, L, dtype=torch.float32, device=q.device)
    _fwd_into(q, k, v, o, lse, seqlens, causal, scale, backend, dropout_p, seed)
    return o, lse


@_fwd_op.register_fake
def _(q, k, v, seqlens, causal, scale, backend, dropout_p, seed):
    N, H, L, D = q.shape
    return _out_like_heads_last(q, L), q.new_empty(N, H, L, dtype=torch.float32)


@torch.library.custom_op("fractal_kernels::tiny_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, seqlens: Optional[torch.Tensor], causal: bool, scale: float,
            backend: str, dropout_p: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _bwd_into(do, q, k, v, o, lse, seqlens, causal, scale, backend, dq, dk, dv, dropout_p, seed)
    return dq, dk, dv


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, seqlens, causal, scale, backend, dropout_p, seed):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _fwd_setup(ctx, inputs, output):
    q, k, v, seqlens, causal, scale, backend, dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seqlens)
    ctx.causal, ctx.scale, ctx.backend, ctx.dropout_p, ctx.seed = causal, scale, backend, dropout_p, seed
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, do, dlse):
    q, k, v, o, lse, seqlens = ctx.saved_tensors
    do = do if do.stride(-1) == 1 else do.contiguous()  # autograd may hand in expanded (stride 0) grads
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, seqlens, ctx.causal, ctx.scale, ctx.backend, ctx.dropout_p, ctx.seed)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ---- custom ops: packed qkv entry ---------------------------------------------------------------------

def _split_qkv(qkv: torch.Tensor, num_heads: int):
    N, L, three_hd = qkv.shape
    D = three_hd // (3 * num_heads)
    return qkv.view(N, L, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [N, H, L, D] views


@torch.library.custom_op("fractal_kernels::tiny_attention_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, num_heads: int, seqlens: Optional[torch.Tensor], causal: bool,
                   scale: float, backend: str, dropout_p: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    N, L, three_hd = qkv.shape
    D = three_hd // (3 * num_heads)
    q, k, v = _split_qkv(qkv, num_heads)
    o = torch.empty(N, L, num_heads * D, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(N, num_heads, L, dtype=torch.float32, device=qkv.device)
    _fwd_into(q, k, v, o.view(N, L, num_heads, D).transpose(1, 2), lse, seqlens, causal, scale, backend,
              dropout_p, seed)
    return o, lse


@_packed_fwd_op.register_fake
def _(qkv, num_heads, seqlens, causal, scale, backend, dropout_p, seed):
    N, L, three_hd = qkv.shape
    return qkv.new_empty(N, L, three_hd // 3), qkv.new_empty(N, num_heads, L, dtype=torch.float32)


@torch.library.custom_op("fractal_kernels::tiny_attention_packed_bwd", mutates_args=())
def _packed_bwd_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                   seqlens: Optional[torch.Tensor], causal: bool, scale: float, backend: str, dropout_p: float,
                   seed: int) -> torch.Tensor:
    N, L, hd = o.shape
    D = hd // num_heads
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    q, k, v = _split_qkv(qkv, num_heads)
    dq, dk, dv = _split_qkv(dqkv, num_heads)
    heads = (lambda t: t.view(N, L, num_heads, D).transpose(1, 2))
    _bwd_into(heads(do), q, k, v, heads(o), lse, seqlens, causal, scale, backend, dq, dk, dv, dropout_p, seed)
    return dqkv


@_packed_bwd_op.register_fake
def _(do, qkv, o, lse, num_heads, seqlens, causal, scale, backend, dropout_p, seed):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _packed_setup(ctx, inputs, output):
    qkv, num_heads, seqlens, causal, scale, backend, dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, seqlens)
    ctx.num_heads, ctx.causal, ctx.scale, ctx.backend = num_heads, causal, scale, backend
    ctx.dropout_p, ctx.seed = dropout_p, seed
    ctx.mark_non_differentiable(lse)


def _packed_backward(ctx, do, dlse):
    qkv, o, lse, seqlens = ctx.saved_tensors
    do = do if do.stride(-1) == 1 else do.contiguous()
    dqkv = _packed_bwd_op(do, qkv, o, lse, ctx.num_heads, seqlens, ctx.causal, ctx.scale, ctx.backend,
                          ctx.dropout_p, ctx.seed)
    return dqkv, None, None, None, None, None, None, None


_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup)


# ---- custom op: decode against a KV cache (inference) ---------------------------------------------------

@torch.library.custom_op("fractal_kernels::tiny_attention_decode", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
               freqs_cis: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    N, H, LQ, D = q.shape
    o = _out_like_heads_last(q, LQ)
    if N * H * LQ == 0:
        return o
    lse = torch.empty(N, H, LQ, dtype=torch.float32, device=q.device)
    _triton_fwd(q, k_cache, v_cache, o, lse, kv_lens, True, scale, decode=True, freqs=freqs_cis)
    return o


@_decode_op.register_fake
def _(q, k_cache, v_cache, kv_lens, freqs_cis, scale):
    return _out_like_heads_last(q, q.shape[2])

