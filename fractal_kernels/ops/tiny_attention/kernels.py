"""Tiny-sequence attention: the Triton kernels (forward, packed and streaming backward, KV-cache decode with
fused RoPE) and their inlined helpers. Design and numerics: :mod:`fractal_kernels.ops.tiny_attention`.

Defined only when triton is installed (``HAS_TRITON``); nothing here launches anything (see :mod:`.launch`).
"""
from __future__ import annotations

from fractal_kernels.dispatch import triton_interpreting

try:
    import triton
    import triton.language as tl
    from fractal_kernels.ops.sample_logits.kernels import _philox_uniform  # the one Philox of every op
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

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

