"""Tiny-sequence attention: Triton kernels (forward, backward, KV-cache decode with fused RoPE), their
launchers, the ``torch.library`` custom ops and the public entry points.

Entry points (q, k, v ``[N, H, L, D]``; any strides with a contiguous head dim, i.e. ``stride(-1) == 1``):

* :func:`tiny_attention` -- bidirectional or causal self-attention, optional per-sequence lengths, autograd.
* :func:`tiny_attention_packed` -- reads the qkv projection's output ``[N, L, 3*H*D]`` through strided views
  and returns ``[N, L, H*D]`` for the output projection; its backward writes ``d(qkv)`` in place, so no
  permute/contiguous copy surrounds the kernels either way.
* :func:`tiny_attention_decode` -- causal decode of the last ``Lq`` positions against a KV cache, with the
  AR level's 2-D rotary embedding applied inside the kernel when ``freqs_cis`` is given (forward only).

Numerics: scores ``q k^T * scale`` and the softmax in fp32 whatever the input dtype (the MAR/AR levels'
numerics; the pixel head's reference computes scores in the input dtype, identical in fp32), output in the
input dtype. The log-sum-exp is kept for the backward pass, which accumulates dq, dk, dv in fp32.

Kernel design (memory-bound workload: L ~ 4..64 tokens, ~10 FLOP/byte): for L <= 64 one program takes the
*whole* sequence of ``G = TILE // Lp`` (sequence, head) pairs at once (``Lp`` = L rounded up to a power of
two) as one ``[G*Lp, D]`` tile with a block-diagonal mask, so a tile is never mostly padding (L=4: 16 pairs
per program) and one pass needs no online-softmax loop; the backward does dq, dk, dv in one kernel from
the same tile. Longer sequences stream keys in blocks with an online softmax (backward: one kernel for
dk/dv, one for dq). Tiles, warps and pipelining depth come from :func:`_attn_config` per GPU arch. Under
``TRITON_INTERPRET=1`` (CPU tests) dots run on fp32 operands because the interpreter's bf16 ``tl.dot`` is
wrong, but the production rounding points stay: P is rounded to the 16-bit input dtype before P.V and RoPE
rounds to the input dtype, as on a GPU (the backward's TF32 operand rounding is not emulated).

Dispatch (``fractal_kernels.dispatch``): "torch" runs ``fractal_kernels.reference.attention``; "triton" these
kernels; "cuda" the ``csrc/tiny_attention`` kernels (forward/backward; decode has no CUDA version). ``auto``
on a GPU uses SDPA instead for lengths past the crossover measured by the benchmark
(``attention_crossover.json``, see ``fractal_kernels.policy``), and always past ``MAX_L``.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from fractal_kernels import dispatch, policy
from fractal_kernels._checks import host_checks
from fractal_kernels._target import device_arch
from fractal_kernels.dispatch import BackendUnavailable, _cuda_ext, record, resolve, triton_interpreting
from fractal_kernels.reference.attention import (attention_decode_reference, attention_dropout_scale,
                                                 attention_reference, attention_varlen_reference)

try:
    import triton
    import triton.language as tl
    from fractal_kernels.ops.sample_logits import _philox_uniform  # the one Philox of every op
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

MAX_L = 512
SUPPORTED_D = (16, 32, 64, 80, 128)
MAX_D = 128
PACK_MAX_L = 64   # sequences up to this length are processed whole, several per program
TILE = 64         # rows of a packed tile; 64 x 64 fp32 scores stay in registers
STREAM_BLOCK = 64

if HAS_TRITON:

    # The interpreter's fp32 -> bf16 cast truncates; a GPU's rounds to nearest even. Kernels cast to 16-bit
    # through _cast so interpreter runs keep the GPU's rounding points (fixed when the module is imported,
    # like triton.jit's choice of the interpreter itself; on a GPU _cast is a plain cast).
    _INTERP = tl.constexpr(triton_interpreting())

    @triton.jit
    def _cast(x, dtype: tl.constexpr):
        if _INTERP and dtype == tl.bfloat16:
            b = x.to(tl.float32).to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000  # round to nearest even at 8 mantissa bits
            x = b.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _row_layout(pid, mb, NH, H, GROUPS: tl.constexpr, LP: tl.constexpr, BLOCK: tl.constexpr):
        # Row r of a tile -> (pair index bh, position). Packed: G pairs of LP rows; streaming: one pair.
        r = tl.arange(0, BLOCK)
        if GROUPS > 1:
            grp = r // LP
            pos = r % LP
        else:
            grp = r * 0
            pos = mb * BLOCK + r
        bh = pid * GROUPS + grp
        ok = bh < NH
        bh = tl.where(ok, bh, 0)
        # int64 sequence index: n * stride overflows int32 past 2^31 elements (e.g. packed qkv of 10^6 pixels)
        return grp, pos, bh, (bh // H).to(tl.int64), bh % H, ok

    @triton.jit
    def _row_off(n, h, pos, sn, sh, sl):
        # int64 element offsets of rows (n, h, pos): h * sh or pos * sl pass 2^31 in head-major or
        # sequence-major views of big tensors (n is int64 already)
        return n * sn + h.to(tl.int64) * sh + pos.to(tl.int64) * sl

    @triton.jit
    def _load_rows(ptr, n, h, pos, rmask, sn, sh, sl, offs_d, dmask, DOT_F32: tl.constexpr):
        # [rows, BLOCK_D] tile of a [N, H, L, D] tensor with arbitrary (n, h, l) strides
        t = tl.load(ptr + _row_off(n, h, pos, sn, sh, sl)[:, None] + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _load_rope_rows(ptr, n, h, pos, rmask, sn, sh, sl, offs_d, dmask, freqs_ptr, fpos, D,
                        DOT_F32: tl.constexpr):
        # _load_rows with the AR level's RoPE applied on load at table rows ``fpos``, rounded to the input
        # dtype like the reference's ``type_as``
        m = rmask[:, None] & dmask[None, :]
        base = _row_off(n, h, pos, sn, sh, sl)[:, None]
        x = tl.load(ptr + base + offs_d[None, :], mask=m, other=0.0)
        partner = tl.load(ptr + base + (offs_d ^ 1)[None, :], mask=m, other=0.0).to(tl.float32)
        t = _cast(_rope(x, partner, freqs_ptr, fpos, offs_d, m, 2 * (D // 2)), x.dtype)
        if DOT_F32:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _sanitize_rows(x):
        # Packed tiles hold several sequences, and 0 * NaN in a dot would carry one sequence's NaN/inf into
        # its neighbours: non-finite entries become 0 and the rows that held them are reported instead.
        fin = (x == x) & (tl.abs(x) != float("inf"))
        bad = tl.sum(tl.where(fin, 0, 1), axis=1) > 0
        return tl.where(fin, x, 0.0), bad

    @triton.jit
    def _dropout_keep(bh_rows, qpos, kpos, LQ, LK, p_drop, seed_lo, seed_hi, offset):
        # Keep-scale (0 or 1/(1-p)) of probability (pair bh, query i, key j): Philox uniform at counter
        # offset + (bh*LQ + i)*LK + j, the same function as the sampler's (reference: attention_dropout_scale)
        ctr = offset + ((bh_rows.to(tl.uint64) * LQ + qpos.to(tl.uint64))[:, None] * LK + kpos.to(tl.uint64)[None, :])
        u = _philox_uniform(seed_lo, seed_hi, ctr)
        return tl.where(u >= p_drop, 1.0 / (1.0 - p_drop), 0.0)

    @triton.jit
    def _rope(x, partner, freqs_ptr, fpos, offs_d, m, HALF_STRIDE):
        # freqs laid out [P, D/2, 2] contiguous: cos at (p, i, 0), sin at (p, i, 1)
        fo = fpos[:, None] * HALF_STRIDE + (offs_d // 2)[None, :] * 2
        cos = tl.load(freqs_ptr + fo, mask=m, other=0.0)
        sin = tl.load(freqs_ptr + fo + 1, mask=m, other=0.0)
        sign = tl.where((offs_d % 2) == 0, -1.0, 1.0)[None, :]
        return x.to(tl.float32) * cos + sign * partner * sin

    @triton.jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, lens_ptr, freqs_ptr,
                         NH, H, LQ, LK, D, P, scale, p_drop, seed_lo, seed_hi, drop_offset,
                         sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol,
                         CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, DECODE: tl.constexpr, ROPE: tl.constexpr,
                         DOT_F32: tl.constexpr, GROUPS: tl.constexpr, LPQ: tl.constexpr, LPK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                         DROPOUT: tl.constexpr):
        # Packed (GROUPS > 1): rows = GROUPS pairs x LPQ queries, columns = GROUPS pairs x LPK keys,
        # block-diagonal, one key pass. Streaming (GROUPS == 1): one pair, BLOCK_M queries, keys in BLOCK_N
        # blocks with an online softmax.
        pid = tl.program_id(0)
        mb = tl.program_id(1)
        qg, qpos, bh, n, h, pair_ok = _row_layout(pid, mb, NH, H, GROUPS, LPQ, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        if HAS_LENS:
            klen = tl.load(lens_ptr + n, mask=pair_ok, other=0)
        else:
            klen = qpos * 0 + LK
        if DECODE:
            shift = klen - LQ  # query i of the last LQ positions sits at klen - LQ + i
            q_ok = pair_ok & (qpos < LQ)
        else:
            shift = klen * 0
            q_ok = pair_ok & (qpos < LQ) & (qpos < klen)
        if ROPE:
            q = _load_rope_rows(q_ptr, n, h, qpos, q_ok, sqn, sqh, sql, offs_d, dmask, freqs_ptr,
                                tl.minimum(tl.maximum(qpos + shift, 0), P - 1), D, DOT_F32)
        else:
            q = _load_rows(q_ptr, n, h, qpos, q_ok, sqn, sqh, sql, offs_d, dmask, DOT_F32)
        poison = q_ok & False
        if GROUPS > 1:
            q, qbad = _sanitize_rows(q)
            poison = qbad & q_ok
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = LK
        if CAUSAL and not DECODE and GROUPS == 1:
            hi = tl.minimum(LK, (mb + 1) * BLOCK_M)
        kg, kpos0, kbh, kn, kh, kpair_ok = _row_layout(pid, 0, NH, H, GROUPS, LPK, BLOCK_N)
        for start in range(0, hi, BLOCK_N):
            kpos = start + kpos0
            k_ok = kpair_ok & (kpos < LK)
            if ROPE:
                k = _load_rope_rows(k_ptr, kn, kh, kpos, k_ok, skn, skh, skl, offs_d, dmask, freqs_ptr,
                                    tl.minimum(kpos, P - 1), D, DOT_F32)
            else:
                k = _load_rows(k_ptr, kn, kh, kpos, k_ok, skn, skh, skl, offs_d, dmask, DOT_F32)
            v = _load_rows(v_ptr, kn, kh, kpos, k_ok, svn, svh, svl, offs_d, dmask, DOT_F32)
            valid = (kg[None, :] == qg[:, None]) & (kpos[None, :] < klen[:, None]) & k_ok[None, :] & q_ok[:, None]
            if CAUSAL:
                valid = valid & (kpos[None, :] <= (qpos + shift)[:, None])
            if GROUPS > 1:
                k, kbad = _sanitize_rows(k)
                v, vbad = _sanitize_rows(v)
                poison = poison | (tl.sum(tl.where(valid & (kbad | vbad)[None, :], 1, 0), axis=1) > 0)
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision=PREC) * scale  # [BLOCK_M, BLOCK_N]
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:  # dropout on the normalised probabilities: the denominator keeps every p
                p = p * _dropout_keep(bh, qpos, kpos, LQ, LK, p_drop, seed_lo, seed_hi, drop_offset)
            # P is rounded to the input dtype before P.V (the GPU's 16-bit dot); under the interpreter (fp32
            # operands) the round trip keeps that rounding point, on a GPU the second cast is a no-op
            pv = _cast(p, v_ptr.dtype.element_ty).to(v.dtype)
            acc = acc * alpha[:, None] + tl.dot(pv, v, out_dtype=tl.float32, input_precision=PREC)
            m_i = m_new
        empty = l_i == 0.0  # padded query or a sequence of length 0: zeros out, lse 0
        l_safe = tl.where(empty, 1.0, l_i)
        out = tl.where(poison[:, None], float("nan"), acc / l_safe[:, None])
        lse = tl.where(poison, float("nan"), tl.where(empty, 0.0, m_i + tl.log(l_safe)))
        tl.store(o_ptr + _row_off(n, h, qpos, son, soh, sol)[:, None] + offs_d[None, :],
                 _cast(out, o_ptr.dtype.element_ty), mask=(pair_ok & (qpos < LQ))[:, None] & dmask[None, :])
        tl.store(lse_ptr + bh.to(tl.int64) * LQ + qpos, lse, mask=pair_ok & (qpos < LQ))

    @triton.jit
    def _attn_bwd_packed_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, lens_ptr,
                                dq_ptr, dk_ptr, dv_ptr, NH, H, L, D, scale, p_drop, seed_lo, seed_hi, drop_offset,
                                sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol, sdn, sdh, sdl,
                                dqn, dqh, dql, dkn, dkh, dkl, dvn, dvh, dvl,
                                CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, GROUPS: tl.constexpr,
                                LP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                                DROPOUT: tl.constexpr):
        # Whole sequences (L <= LP <= BLOCK), GROUPS pairs per tile: dq, dk, dv in one pass, fp32 math.
        pid = tl.program_id(0)
        g, pos, bh, n, h, pair_ok = _row_layout(pid, 0, NH, H, GROUPS, LP, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        if HAS_LENS:
            klen = tl.load(lens_ptr + n, mask=pair_ok, other=0)
        else:
            klen = pos * 0 + L
        ok = pair_ok & (pos < L) & (pos < klen)
        q = _load_rows(q_ptr, n, h, pos, ok, sqn, sqh, sql, offs_d, dmask, True)
        k = _load_rows(k_ptr, n, h, pos, ok, skn, skh, skl, offs_d, dmask, True)
        v = _load_rows(v_ptr, n, h, pos, ok, svn, svh, svl, offs_d, dmask, True)
        o = _load_rows(o_ptr, n, h, pos, ok, son, soh, sol, offs_d, dmask, True)
        do = _load_rows(do_ptr, n, h, pos, ok, sdn, sdh, sdl, offs_d, dmask, True)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * L + pos, mask=ok, other=0.0)
        # a non-finite value anywhere in a pair makes that pair's gradients NaN, and only that pair's
        q, b1 = _sanitize_rows(q)
        k, b2 = _sanitize_rows(k)
        v, b3 = _sanitize_rows(v)
        o, b4 = _sanitize_rows(o)
        do, b5 = _sanitize_rows(do)
        bad = (b1 | b2 | b3 | b4 | b5 | (lse != lse)) & ok
        lse = tl.where(lse == lse, lse, 0.0)
        same = g[None, :] == g[:, None]
        poison = tl.sum(tl.where(same & bad[None, :], 1, 0), axis=1) > 0
        delta = tl.sum(do * o, axis=1)  # rowsum(dO * O), fp32
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [BLOCK, BLOCK]: rows = queries, columns = keys
        valid = same & ok[:, None] & ok[None, :]
        if CAUSAL:
            valid = valid & (pos[None, :] <= pos[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _dropout_keep(bh, pos, pos, L, L, p_drop, seed_lo, seed_hi, drop_offset)
            dv = tl.dot(tl.trans(p * keep), do, input_precision=PREC)
            dp = dp * keep
        else:
            dv = tl.dot(tl.trans(p), do, input_precision=PREC)
        ds = tl.where(valid, p * (dp - delta[:, None]) * scale, 0.0)
        dq = tl.where(poison[:, None], float("nan"), tl.dot(ds, k, input_precision=PREC))
        dk = tl.where(poison[:, None], float("nan"), tl.dot(tl.trans(ds), q, input_precision=PREC))
        dv = tl.where(poison[:, None], float("nan"), dv)
        wmask = (pair_ok & (pos < L))[:, None] & dmask[None, :]
        tl.store(dq_ptr + _row_off(n, h, pos, dqn, dqh, dql)[:, None] + offs_d[None, :],
                 _cast(dq, dq_ptr.dtype.element_ty), mask=wmask)
        tl.store(dk_ptr + _row_off(n, h, pos, dkn, dkh, dkl)[:, None] + offs_d[None, :],
                 _cast(dk, dk_ptr.dtype.element_ty), mask=wmask)
        tl.store(dv_ptr + _row_off(n, h, pos, dvn, dvh, dvl)[:, None] + offs_d[None, :],
                 _cast(dv, dv_ptr.dtype.element_ty), mask=wmask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, lens_ptr, dk_ptr, dv_ptr,
                              H, L, D, scale, p_drop, seed_lo, seed_hi, drop_offset, sqn, sqh, sql, skn, skh, skl, svn, svh, svl, sdn, sdh, sdl,
                              dkn, dkh, dkl, dvn, dvh, dvl,
                              CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                              DROPOUT: tl.constexpr):
        # Long sequences: one program = one pair x BLOCK_N keys; queries streamed. fp32 math.
        bh = tl.program_id(0)
        nb = tl.program_id(1)
        n = (bh // H).to(tl.int64)
        h = bh % H
        klen = L
        if HAS_LENS:
            klen = tl.load(lens_ptr + n)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        k_ok = (offs_n < L) & (offs_n < klen)
        k = _load_rows(k_ptr, n, h, offs_n, k_ok, skn, skh, skl, offs_d, dmask, True)
        v = _load_rows(v_ptr, n, h, offs_n, k_ok, svn, svh, svl, offs_d, dmask, True)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = 0
        if CAUSAL:
            lo = (nb * BLOCK_N) // BLOCK_M * BLOCK_M
        for start in range(lo, L, BLOCK_M):
            qm = start + offs_m
            q_ok = (qm < L) & (qm < klen)
            q = _load_rows(q_ptr, n, h, qm, q_ok, sqn, sqh, sql, offs_d, dmask, True)
            do = _load_rows(do_ptr, n, h, qm, q_ok, sdn, sdh, sdl, offs_d, dmask, True)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * L + qm, mask=q_ok, other=0.0)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * L + qm, mask=q_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [M, N]
            valid = q_ok[:, None] & k_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= qm[:, None])
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if DROPOUT:
                keep = _dropout_keep(qm * 0 + bh, qm, offs_n, L, L, p_drop, seed_lo, seed_hi, drop_offset)
                dv += tl.dot(tl.trans(p * keep), do, input_precision=PREC)
                dp = dp * keep
            else:
                dv += tl.dot(tl.trans(p), do, input_precision=PREC)
            ds = p * (dp - delta[:, None]) * scale
            dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
        wmask = (offs_n < L)[:, None] & dmask[None, :]
        tl.store(dk_ptr + _row_off(n, h, offs_n, dkn, dkh, dkl)[:, None] + offs_d[None, :],
                 _cast(dk, dk_ptr.dtype.element_ty), mask=wmask)
        tl.store(dv_ptr + _row_off(n, h, offs_n, dvn, dvh, dvl)[:, None] + offs_d[None, :],
                 _cast(dv, dv_ptr.dtype.element_ty), mask=wmask)

    @triton.jit
    def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, lens_ptr, dq_ptr,
                            H, L, D, scale, p_drop, seed_lo, seed_hi, drop_offset, sqn, sqh, sql, skn, skh, skl, svn, svh, svl, sdn, sdh, sdl,
                            dqn, dqh, dql,
                            CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                            DROPOUT: tl.constexpr):
        bh = tl.program_id(0)
        mb = tl.program_id(1)
        n = (bh // H).to(tl.int64)
        h = bh % H
        klen = L
        if HAS_LENS:
            klen = tl.load(lens_ptr + n)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q_ok = (offs_m < L) & (offs_m < klen)
        q = _load_rows(q_ptr, n, h, offs_m, q_ok, sqn, sqh, sql, offs_d, dmask, True)
        do = _load_rows(do_ptr, n, h, offs_m, q_ok, sdn, sdh, sdl, offs_d, dmask, True)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * L + offs_m, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * L + offs_m, mask=q_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, (mb + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            kn = start + offs_n
            k_ok = (kn < L) & (kn < klen)
            k = _load_rows(k_ptr, n, h, kn, k_ok, skn, skh, skl, offs_d, dmask, True)
            v = _load_rows(v_ptr, n, h, kn, k_ok, svn, svh, svl, offs_d, dmask, True)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            valid = q_ok[:, None] & k_ok[None, :]
            if CAUSAL:
                valid = valid & (kn[None, :] <= offs_m[:, None])
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if DROPOUT:
                dp = dp * _dropout_keep(offs_m * 0 + bh, offs_m, kn, L, L, p_drop, seed_lo, seed_hi, drop_offset)
            ds = p * (dp - delta[:, None]) * scale
            dq += tl.dot(ds, k, input_precision=PREC)
        tl.store(dq_ptr + _row_off(n, h, offs_m, dqn, dqh, dql)[:, None] + offs_d[None, :],
                 _cast(dq, dq_ptr.dtype.element_ty), mask=(offs_m < L)[:, None] & dmask[None, :])


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _Cfg(NamedTuple):
    """Launch configuration of one kernel call: tile rows ``block_m`` (packed kernels: rows of the whole tile),
    key block ``block_n`` (packed: 0 = the tile's keys in one pass), warps and software-pipelining depth."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _attn_config(kind: str, L: int, D: int, dtype: torch.dtype, device) -> _Cfg:
    """Tile sizes, warps and stages of every attention launch, per (kind, L, D, dtype, GPU arch).

    ``kind``: "fwd" (L <= PACK_MAX_L: packed, one key pass), "fwd_stream", "decode" (packed or streaming
    over the cache), "bwd" (packed), "dkdv" and "dq" (the streaming backward). Chosen from the ahead-of-time
    compile data (registers, spills, shared memory on sm_80 and sm_90): a packed kernel's key loop runs
    once, so software pipelining only buys shared memory (``num_stages=1``; decode at 3 needs 184-200 KB
    and cannot launch on an A100); fp32 inputs keep "ieee" dots, which are FMA loops holding both operands
    in registers, so they get smaller tiles."""
    arch = device_arch(device)
    f32 = dtype == torch.float32
    bd = _block_d(D)
    lp = triton.next_power_of_2(max(L, 1))
    if L <= PACK_MAX_L and kind in ("fwd", "bwd", "decode"):
        # Packed tiles. sm_90: 64 rows feed wgmma (a warpgroup's M is 64); sm_80 (mma.sync) and fp32 (FMA
        # dots hold a thread's rows of both operands over the whole K in registers): 32 rows keep the
        # [tile, tile] scores, masks and operands under 255 registers (64 rows: 0.1-2.8 KB of spills on
        # sm_80, the 32-register fallback with 8 KB of stack in fp32). The backward holds q, k, v, o, dO and
        # three [tile, tile] fp32 products: 32 rows everywhere, 8 warps for fp32 and for D = 80 (padded to 128).
        # fp32 at D = 80 takes 32 warps: five [32, 128] fp32 operands plus the FMA dots' operand copies do not
        # fit a thread's 255 registers at 8 warps (28 B of spills on sm_80) nor 128 at 16 (4-32 B); at 32
        # warps ptxas needs 46 registers and spills nothing on either arch.
        if kind == "decode":
            return _Cfg(max(64 if arch >= 90 else 32, lp), 0, 4, 1)
        if kind == "fwd":
            tile = 64 if arch >= 90 and not f32 else 32
            return _Cfg(max(tile, lp), 0, 8 if bd >= 128 else 4, 1)
        return _Cfg(max(32, lp), 0, 32 if f32 and bd >= 128 else 8 if bd >= 128 or f32 else 4, 1)
    if kind == "decode":  # a few queries streaming over a long cache
        return _Cfg(16, STREAM_BLOCK, 4, 1)
    # Streaming kernels (L > PACK_MAX_L): 64 x 64 blocks spill on sm_80 and at D = 128 (dk/dv up to 1.5 KB).
    # fp32: 32 x 32 blocks, the backward's with 8 warps and no pipelining (the FMA dots' operands fill the
    # registers that the pipeline's buffers would take).
    if kind == "fwd_stream":
        return _Cfg(32, 32, 8 if bd >= 128 else 4, 2) if f32 else _Cfg(64, 32, 4, 3)
    if kind == "dkdv":  # one program: BLOCK_N keys held (k, v, dk, dv), BLOCK_M queries streamed
        # fp32 sm_80 at D = 80: 16 warps (ptxas settles at 80 registers and spills 8 B with 8; 64 with 16, none)
        if f32:
            return _Cfg(32, 32, 8, 1) if arch >= 90 else _Cfg(16, 32, 16 if bd >= 128 else 8, 1)
        return _Cfg(32, 32, 4, 2)
    if kind == "dq":  # one program: BLOCK_M queries held (q, dO, dq), BLOCK_N keys streamed
        return _Cfg(32, 32, 8, 1) if f32 else _Cfg(32, 64, 4, 2)
    raise ValueError(f"kind: unknown attention launch {kind!r}")


def _packed_layout(L: int, tile: int = TILE) -> Tuple[int, int]:
    """(pairs per program G, padded length Lp) of the packed kernels for a length L <= PACK_MAX_L."""
    lp = triton.next_power_of_2(max(L, 1))
    return max(1, tile // lp), lp


def _precision(q: torch.Tensor) -> str:
    """``tl.dot`` precision: fp32 inputs keep true fp32 products ("ieee": the reference's fp32 attention; Triton's
    default would be TF32); fp16/bf16 inputs use the tensor cores (the backward's fp32-upcast dots as TF32)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _out_like_heads_last(q: torch.Tensor, L: int) -> torch.Tensor:
    """An ``[N, H, L, D]`` view of a fresh ``[N, L, H, D]`` buffer: ``o.transpose(1, 2).reshape(N, L, H*D)``
    is then free for the output projection."""
    N, H, _, D = q.shape
    return torch.empty(N, L, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)


def _seed_words(seed: int) -> Tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def _triton_fwd(q, k, v, o, lse, lens, causal, scale, decode=False, freqs=None, p_drop=0.0, seed=0):
    N, H, LQ, D = q.shape
    LK = k.shape[2]
    NH = N * H
    dot_f32 = triton_interpreting() or q.dtype == torch.float32
    lens_arg = lens if lens is not None else lse
    freqs_arg = freqs if freqs is not None else lse
    P = freqs.shape[0] if freqs is not None else 1
    if LK <= PACK_MAX_L:
        # whole sequences, several pairs per program (decode: a few queries against a short cache)
        cfg = _attn_config("decode" if decode else "fwd", LK, D, q.dtype, q.device)
        groups, lpk = _packed_layout(LK, cfg.block_m)
        lpq = max(triton.next_power_of_2(LQ), 16 // groups)  # tl.dot needs >= 16 rows
        bm, bn = groups * lpq, groups * lpk
        grid = (triton.cdiv(NH, groups), 1)
    else:
        cfg = _attn_config("decode" if decode else "fwd_stream", LK, D, q.dtype, q.device)
        groups, lpq, lpk = 1, 1, 1
        bm, bn = (cfg.block_m if LQ > 16 else 16), cfg.block_n
        grid = (NH, triton.cdiv(LQ, bm))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, lens_arg, freqs_arg, NH, H, LQ, LK, D, P, scale, p_drop, *_seed_words(seed), 0,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        CAUSAL=causal, HAS_LENS=lens is not None, DECODE=decode, ROPE=freqs is not None, DOT_F32=dot_f32,
        GROUPS=groups, LPQ=lpq, LPK=lpk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), PREC=_precision(q),
        DROPOUT=p_drop > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _triton_bwd(do, q, k, v, o, lse, lens, causal, scale, dq, dk, dv, p_drop=0.0, seed=0):
    N, H, L, D = q.shape
    NH = N * H
    bd = _block_d(D)
    lens_arg = lens if lens is not None else lse
    if L <= PACK_MAX_L:
        cfg = _attn_config("bwd", L, D, q.dtype, q.device)
        groups, lp = _packed_layout(L, cfg.block_m)
        _attn_bwd_packed_kernel[(triton.cdiv(NH, groups),)](
            q, k, v, o, do, lse, lens_arg, dq, dk, dv, NH, H, L, D, scale, p_drop, *_seed_words(seed), 0,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
            *_strides(dq), *_strides(dk), *_strides(dv),
            CAUSAL=causal, HAS_LENS=lens is not None, GROUPS=groups, LP=lp, BLOCK=groups * lp, BLOCK_D=bd,
            PREC=_precision(q), DROPOUT=p_drop > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    delta = (do.float() * o.float()).sum(-1).reshape(NH, L)  # [N*H, L]
    args = (H, L, D, scale, p_drop, *_seed_words(seed), 0, *_strides(q), *_strides(k), *_strides(v), *_strides(do))
    c = _attn_config("dkdv", L, D, q.dtype, q.device)
    _attn_bwd_dkdv_kernel[(NH, triton.cdiv(L, c.block_n))](
        q, k, v, do, lse, delta, lens_arg, dk, dv, *args, *_strides(dk), *_strides(dv), CAUSAL=causal,
        HAS_LENS=lens is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=bd, PREC=_precision(q),
        DROPOUT=p_drop > 0, num_warps=c.num_warps, num_stages=c.num_stages)
    c = _attn_config("dq", L, D, q.dtype, q.device)
    _attn_bwd_dq_kernel[(NH, triton.cdiv(L, c.block_m))](
        q, k, v, do, lse, delta, lens_arg, dq, *args, *_strides(dq), CAUSAL=causal, HAS_LENS=lens is not None,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=bd, PREC=_precision(q), DROPOUT=p_drop > 0,
        num_warps=c.num_warps, num_stages=c.num_stages)


def _fwd_into(q, k, v, o, lse, lens, causal, scale, backend, p_drop=0.0, seed=0):
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return
    if backend == "cuda":
        _cuda_ext().tiny_attention_fwd(q, k, v, o, lse, lens, causal, scale)
    else:
        _triton_fwd(q, k, v, o, lse, lens, causal, scale, p_drop=p_drop, seed=seed)


def _bwd_into(do, q, k, v, o, lse, lens, causal, scale, backend, dq, dk, dv, p_drop=0.0, seed=0):
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return
    if backend == "cuda":
        _cuda_ext().tiny_attention_bwd(do, q, k, v, o, lse, dq, dk, dv, lens, causal, scale)
    else:
        _triton_bwd(do, q, k, v, o, lse, lens, causal, scale, dq, dk, dv, p_drop=p_drop, seed=seed)


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


# ---- validation and public entry points ---------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name}: expected float32, float16 or bfloat16 (float64: torch backend), got {dtype}")


def _check_head_dim_scale(name: str, D: int, scale) -> None:
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{name}: head dim D={D} unsupported (1..{MAX_D}; tuned for {SUPPORTED_D})")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")


def _check_qkv(q, k, v, scale, same_length: bool = True) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a [N, H, L, D] tensor, got {_shape(t)}")
        _check_dtype(name, t.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them to one dtype")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: on different devices q {q.device}, k {k.device}, v {v.device}")
    N, H, L, D = q.shape
    if same_length and (k.shape != q.shape or v.shape != q.shape):
        raise ValueError(f"k, v: expected the shape of q {tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not same_length and (k.shape[:2] != q.shape[:2] or k.shape[3] != D or v.shape != k.shape):
        raise ValueError(f"k_cache, v_cache: expected [N={N}, H={H}, Lmax, D={D}], got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    _check_head_dim_scale("q", D, scale)


def _check_lens(seqlens, N: int, L: int, device, name: str = "seqlens") -> Optional[torch.Tensor]:
    if seqlens is None:
        return None
    if not isinstance(seqlens, torch.Tensor) or seqlens.shape != (N,) or seqlens.dtype.is_floating_point:
        raise ValueError(f"{name}: expected an integer tensor of shape [N={N}], got {_shape(seqlens)}")
    if seqlens.device != device:
        raise ValueError(f"{name}: expected it on {device} like q, got {seqlens.device}")
    # the value check reads the device (a host sync per call on CUDA): CPU tensors or FRACTAL_KERNELS_DEBUG=1
    # only; the kernels treat values outside [0, L] as clamped to it (never out of bounds)
    if seqlens.numel() and host_checks(device) and (int(seqlens.min()) < 0 or int(seqlens.max()) > L):
        raise ValueError(f"{name}: values must lie in [0, {L}], got [{int(seqlens.min())}, {int(seqlens.max())}]")
    return seqlens.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=1024)
def _uniform_lens(n: int, length: int, device: torch.device) -> torch.Tensor:
    """``[n]`` int32 lengths all equal to ``length``, made once: a decode step would otherwise spend an op
    (a launch on a GPU) building it. The kernels only read it."""
    return torch.full((n,), length, dtype=torch.int32, device=device)


def _measured_crossover(D: int, dtype: torch.dtype, device: Optional[torch.device] = None) -> Optional[int]:
    """Length from which SDPA beat the kernel in the benchmark run recorded for this device (if any; the
    policy files and the device name are read once per process: the dispatch is hot)."""
    if device is None:
        device = torch.device("cuda") if dispatch._cuda_available() else torch.device("cpu")
    name = dispatch.device_name(device.index) if device.type == "cuda" else ""
    return policy.load().crossover_length(name, str(dtype).replace("torch.", ""), D)


def _choose(op: str, backend: Optional[str], dtype: torch.dtype, device: torch.device, D: int, L: int,
            dropout: bool = False, varlen: bool = False) -> str:
    """The backend for this call; 'sdpa' when ``auto`` hands a long sequence to PyTorch SDPA."""
    if dtype == torch.float64:
        if backend not in (None, "auto", "torch"):
            raise TypeError(f"q: float64 runs on the torch backend only (the {backend} kernels take fp32/bf16/fp16)")
        return resolve(op, "torch", device)
    forced = backend not in (None, "auto") or os.environ.get("FRACTAL_KERNELS_BACKEND") not in (None, "", "auto")
    if L > MAX_L:
        if forced and (backend or os.environ.get("FRACTAL_KERNELS_BACKEND")) != "torch":
            raise ValueError(f"q: sequence length L={L} over the kernels' limit {MAX_L}; use backend=None "
                             f"(SDPA) or 'torch'")
        if not forced:
            return record(op, "sdpa" if device.type == "cuda" else "torch")
    shape = dispatch.shape_class(D=D, dropout=dropout, varlen=varlen)
    which = resolve(op, backend, device, dtype=dtype, shape_class=shape)
    if not forced and which != "torch" and dispatch.unsupported(op, "torch", dtype, shape) is None:
        cross = _measured_crossover(D, dtype, device)  # SDPA's path runs the reference for varlen/dropout
        if cross is not None and L >= cross:
            return record(op, "sdpa")
    return which


def _check_strides(which: str, **tensors) -> None:
    if which in ("triton", "cuda"):
        for name, t in tensors.items():
            if t.stride(-1) != 1:
                raise ValueError(f"{name}: the head dim must be contiguous (stride(-1) == 1) for the {which} "
                                 f"kernel, got strides {t.stride()}")


def _sdpa(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _dropout_seed(dropout_p, dropout_seed) -> int:
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a number in [0, 1), got {dropout_p!r}")
    if dropout_p == 0.0:
        return 0
    if dropout_seed is None:  # from torch's CPU generator, so torch.manual_seed makes a run reproducible
        return int(torch.randint(0, 2 ** 62, (1,)))
    from operator import index  # local: keeps this fix inside the helper
    try:
        seed = index(dropout_seed) & ((1 << 64) - 1)  # any int, taken mod 2^64 on every backend
    except TypeError:
        raise TypeError(f"dropout_seed: expected an int (any value, taken mod 2**64) or None, got "
                        f"{type(dropout_seed).__name__}") from None
    # the custom ops' schema holds an int64: pass the same 64 bits as a signed value (the Philox key words
    # _seed_words and the reference take are unchanged)
    return seed - (1 << 64) if seed >= 1 << 63 else seed


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


def _no_cuda_dropout(which: str, backend: Optional[str], dropout_p: float) -> str:
    if dropout_p > 0 and which == "cuda":
        if backend == "cuda":
            raise BackendUnavailable("tiny_attention: the CUDA kernels have no dropout; use backend='triton' or None")
        return record("tiny_attention", "triton")
    return which


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
    Other arguments as :func:`tiny_attention`."""
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
    which = resolve("tiny_attention_decode", backend, q.device) if q.dtype != torch.float64 else \
        resolve("tiny_attention_decode", "torch", q.device)
    if which == "torch":
        return attention_decode_reference(q, k_cache, v_cache, lens, scale=scale, freqs_cis=freqs_cis)
    if which == "cuda":
        raise BackendUnavailable("tiny_attention_decode: no CUDA decode kernel; use backend='triton' or None")
    _check_strides(which, q=q, k_cache=k_cache, v_cache=v_cache)
    return _decode_op(q, k_cache, v_cache, lens, freqs_cis, scale)
