"""Tiny-sequence attention: the public entry points :func:`tiny_attention`, :func:`tiny_attention_packed` and
:func:`tiny_attention_decode` (validation, the backend choice of ``fractal_kernels.dispatch``, the torch /
SDPA paths, then the custom ops of :mod:`.register`). Arguments and numerics: :mod:`fractal_kernels.ops.tiny_attention`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from fractal_kernels._checks import host_checks
from fractal_kernels.dispatch import attention_without_cuda_dropout as _no_cuda_dropout
from fractal_kernels.dispatch import choose_attention as _choose
from fractal_kernels.dispatch import choose_attention_decode
from fractal_kernels.ops.tiny_attention.launch import (_check_dtype, _check_head_dim_scale, _check_lens, _check_qkv,
                                                       _check_strides, _dropout_seed, _shape, _uniform_lens)
from fractal_kernels.ops.tiny_attention.register import _decode_op, _fwd_op, _packed_fwd_op, _split_qkv
from fractal_kernels.reference.attention import (attention_decode_reference, attention_dropout_scale,
                                                 attention_reference, attention_varlen_reference)


def _sdpa(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _reference(q, k, v, lens, causal, scale, dropout_p, seed):
    if dropout_p > 0:
        n, h, length, _ = q.shape
        keep = attention_dropout_scale(seed, n, h, length, length, dropout_p, q.device)
        if lens is not None:
            raise ValueError("dropout_p: not supported together with seqlens on the torch backend")
        return attention_reference(q, k, v, causal=causal, scale=scale, dropout_scale=keep)
    if lens is not None:
        return attention_varlen_reference(q, k, v, lens, causal=causal, scale=scale)
    return attention_reference(q, k, v, causal=causal, scale=scale)


def tiny_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   scale: Optional[float] = None, seqlens: Optional[torch.Tensor] = None,
                   dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Softmax attention over many tiny sequences.

    q, k, v: ``[N, H, L, D]``, one dtype (fp32 / bf16 / fp16; fp64 on the torch backend), any strides with
    ``stride(-1) == 1``. ``causal`` masks key j > query i. ``scale`` defaults to ``D ** -0.5``. ``seqlens``
    (``[N]`` integers in [0, L]) gives each sequence its own length: keys past it are ignored, outputs past it
    are zero. Returns ``[N, H, L, D]`` in the input dtype (a view of an ``[N, L, H, D]`` buffer). Autograd
    flows to q, k, v. ``dropout_p`` drops attention probabilities (training) with a Philox mask keyed by
    ``dropout_seed`` (any int, taken mod 2**64; None: drawn from torch's CPU generator), regenerated in the backward pass and identical
    on the torch backend (:func:`fractal_kernels.reference.attention.attention_dropout_scale`).
    ``backend``: None/"auto" (dispatcher), "torch", "triton" or "cuda".

    Math:
        Per sequence n and head h, ``o[n, h, i] = sum_j softmax_j(scale * q[n, h, i] . k[n, h, j] + m[n, i, j])
        v[n, h, j]`` with ``m = -inf`` where ``causal`` and ``j > i`` or where ``j >= seqlens[n]`` (else 0);
        with dropout, ``softmax`` is multiplied by the Philox keep mask and divided by ``1 - dropout_p``. Scores
        and softmax in fp32 whatever the input dtype (the MAR/AR levels' numerics), the output rounded to the
        input dtype. A NaN/inf in a sequence makes the rows that see it NaN and never leaks into another sequence.

    Shapes:
        q, k, v ``[N, H, L, D]`` -> ``[N, H, L, D]``; ``seqlens`` ``[N]``. Dtypes: fp32 / bf16 / fp16, all three
        alike (fp64 on the torch backend only). Backends: "torch" (any L and D; not dropout together with
        ``seqlens``), "triton" (L <= 512, D <= 128, tuned for 16/32/64/80/128; dropout and ``seqlens``), "cuda"
        (D in {16, 32, 64, 80, 128}, no dropout; picked by auto only once listed in ``cuda_verified.json``);
        auto hands L > 512, or L past the measured (else, on a GPU, the MODEL's) crossover, to PyTorch SDPA.
    """
    _check_qkv(q, k, v, scale)
    N, H, L, D = q.shape
    lens = _check_lens(seqlens, N, L, q.device)
    scale = float(scale) if scale is not None else D ** -0.5
    seed = _dropout_seed(dropout_p, dropout_seed)
    which = _no_cuda_dropout(_choose("tiny_attention", backend, q.dtype, q.device, q.shape[-1], L,
                                     dropout=dropout_p > 0, varlen=lens is not None), backend, dropout_p)
    if which == "torch" or (which == "sdpa" and (lens is not None or dropout_p > 0)):
        return _reference(q, k, v, lens, causal, scale, dropout_p, seed)
    if which == "sdpa":
        return _sdpa(q, k, v, causal, scale)
    _check_strides(which, q=q, k=k, v=v)
    o, _ = _fwd_op(q, k, v, lens, causal, scale, which, float(dropout_p), seed)
    return o


def tiny_attention_packed(qkv: torch.Tensor, num_heads: int, *, causal: bool = False,
                          scale: Optional[float] = None, seqlens: Optional[torch.Tensor] = None,
                          dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
                          backend: Optional[str] = None) -> torch.Tensor:
    """Attention straight from the qkv projection ``[N, L, 3*H*D]`` (q, k, v of each head in the reference's
    ``reshape(N, L, 3, H, D)`` order) to ``[N, L, H*D]``; the kernels read and write through strides.
    Other arguments as :func:`tiny_attention`.

    Math:
        :func:`tiny_attention` on ``q, k, v = qkv.view(N, L, 3, H, D).unbind(2)`` (each ``[N, L, H, D]``, read
        through strides, no copies), the output written as ``o.transpose(1, 2).reshape(N, L, H * D)``: the same
        fp32 scores and softmax, output in the input dtype.

    Shapes:
        qkv ``[N, L, 3*H*D]`` -> ``[N, L, H*D]`` with ``H = num_heads``; ``seqlens`` ``[N]``. Dtypes: fp32 / bf16 /
        fp16. Backends: as :func:`tiny_attention` ("torch", "triton" for L <= 512 and D <= 128, "cuda" for
        D in {16, 32, 64, 80, 128} without dropout once verified, SDPA under auto past the crossover).
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"qkv: expected a [N, L, 3*H*D] tensor, got {_shape(qkv)}")
    if not isinstance(num_heads, int) or num_heads < 1 or qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(f"num_heads: expected a positive int dividing qkv's last dim / 3 "
                         f"({qkv.shape[-1]} / 3), got {num_heads!r}")
    N, L, three_hd = qkv.shape
    D = three_hd // (3 * num_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    # validated on qkv itself: the q/k/v views are made only where needed (each is an op on the hot path)
    _check_dtype("qkv", qkv.dtype)
    _check_head_dim_scale("qkv", D, scale)
    lens = _check_lens(seqlens, N, L, qkv.device)
    scale = float(scale) if scale is not None else D ** -0.5
    seed = _dropout_seed(dropout_p, dropout_seed)
    which = _no_cuda_dropout(_choose("tiny_attention", backend, qkv.dtype, qkv.device, D, L,
                                     dropout=dropout_p > 0, varlen=lens is not None), backend, dropout_p)
    if which in ("torch", "sdpa"):
        q, k, v = _split_qkv(qkv, num_heads)
        o = tiny_attention(q, k, v, causal=causal, scale=scale, seqlens=lens, dropout_p=dropout_p, dropout_seed=seed,
                           backend="torch" if which == "torch" else None)
        return o.transpose(1, 2).reshape(N, L, num_heads * D)
    o, _ = _packed_fwd_op(qkv, num_heads, lens, causal, scale, which, float(dropout_p), seed)
    return o


def tiny_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          kv_lens: Union[int, torch.Tensor], *, freqs_cis: Optional[torch.Tensor] = None,
                          scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Causal attention of the last ``Lq`` positions against a KV cache (the AR levels' sampling step).

    q ``[N, H, Lq, D]``; k_cache, v_cache ``[N, H, Lmax, D]`` whose first ``kv_lens`` positions are filled
    (an int, or ``[N]`` integers, each >= Lq); query i sits at position ``kv_lens - Lq + i`` and sees keys
    ``j <= that``. ``freqs_cis`` ``[P, D/2, 2]`` (cos, sin; P >= Lmax) turns on the AR level's rotary
    embedding inside the kernel: the cache then holds *un-rotated* keys and q and k are rotated by their
    positions on load (fp32 math rounded to the input dtype, as the reference rotates before caching).
    Forward only. Returns ``[N, H, Lq, D]``.

    Math:
        ``o[n, h, i] = sum_j softmax_j(scale * rope(q)[n, h, i] . rope(k)[n, h, j]) v[n, h, j]`` over
        ``j <= kv_lens[n] - Lq + i``; ``rope`` rotates interleaved pairs ``(2t, 2t+1)`` by the table row of the
        token's position (identity without ``freqs_cis``). Scores and softmax in fp32, output in the input dtype.

    Shapes:
        q ``[N, H, Lq, D]``; k_cache, v_cache ``[N, H, Lmax, D]``; ``kv_lens`` an int or ``[N]``;
        ``freqs_cis`` ``[P, D/2, 2]`` fp32 -> ``[N, H, Lq, D]``. Dtypes: fp32 / bf16 / fp16 (fp64 runs on the
        torch backend). Backends: "torch" and "triton" (D <= 128); there is no CUDA decode kernel
        (forcing "cuda" raises ``BackendUnavailable``).
    """
    _check_qkv(q, k_cache, v_cache, scale, same_length=False)
    N, H, LQ, D = q.shape
    lmax = k_cache.shape[2]
    if isinstance(kv_lens, int):
        if not LQ <= kv_lens <= lmax:
            raise ValueError(f"kv_lens: expected Lq={LQ} <= kv_lens <= Lmax={lmax}, got {kv_lens}")
        lens = _uniform_lens(N, kv_lens, q.device)
    else:
        lens = _check_lens(kv_lens, N, lmax, q.device, "kv_lens")
        if lens.numel() and host_checks(q.device) and int(lens.min()) < LQ:
            raise ValueError(f"kv_lens: every length must be >= Lq={LQ}, got min {int(lens.min())}")
    if freqs_cis is not None:
        if freqs_cis.dim() != 3 or freqs_cis.shape[1:] != (D // 2, 2) or freqs_cis.shape[0] < lmax or D % 2:
            raise ValueError(f"freqs_cis: expected [P >= {lmax}, D/2={D // 2}, 2] for an even D, got "
                             f"{_shape(freqs_cis)}")
        if freqs_cis.device != q.device or freqs_cis.dtype != torch.float32 or not freqs_cis.is_contiguous():
            freqs_cis = freqs_cis.to(device=q.device, dtype=torch.float32).contiguous()  # (an op per call otherwise)
    scale = float(scale) if scale is not None else D ** -0.5
    which = choose_attention_decode(backend, q.dtype, q.device)
    if which == "torch":
        return attention_decode_reference(q, k_cache, v_cache, lens, scale=scale, freqs_cis=freqs_cis)
    _check_strides(which, q=q, k_cache=k_cache, v_cache=v_cache)
    return _decode_op(q, k_cache, v_cache, lens, freqs_cis, scale)
