"""Fused AR block stack decode step: the Triton kernel ``_ar_stack_decode_kernel`` (every block of one AR level's
decode step plus its final LayerNorm, one launch) and its inlined helpers. Design and numerics:
:mod:`fractal_kernels.ops.ar_stack`. Defined only when triton is installed (``HAS_TRITON``).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from fractal_kernels.ops.pixel_head.kernels import _dot
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _to16(x, dtype: tl.constexpr, DOT16: tl.constexpr):
        # x (fp32) cast to dtype with round-to-nearest-even. The interpreter's fp32 -> bf16 cast truncates, so
        # there (DOT16 == 2) the rounding is done on the bits first; the cast of the rounded value is exact.
        if DOT16 == 2 and dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _linear_chunk(acc, a_ptr, LDA: tl.constexpr, K: tl.constexpr, Kr, w_ptr, n0, N: tl.constexpr,
                      BM: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr, EVEN: tl.constexpr,
                      DOT16: tl.constexpr):
        # acc [BM, NC] += A[:, 0:K] @ Wm[n0:n0+NC, 0:K]^T; A fp32 scratch (row stride LDA), Wm [N, K] row-major
        # (an nn.Linear weight). 16-bit Wm: A rounded to its dtype first (autocast's rounding), then a
        # tensor-core dot with fp32 accumulation. K in KC chunks, a runtime loop: one operand pair live. The
        # offset tiles do not depend on n0 / k0 (a scalar base moves), so every call site shares them, and
        # EVEN (K, N multiples of KC, NC) drops the masks: per-element offsets and predicates kept live across
        # the whole kernel are what made ptxas spill.
        a_off = tl.arange(0, BM)[:, None] * LDA + tl.arange(0, KC)[None, :]  # [BM, KC]
        w_off = tl.arange(0, NC)[None, :] * K + tl.arange(0, KC)[:, None]  # [KC, NC]
        for k0 in tl.range(0, Kr, KC):  # Kr == K at run time: a bound LLVM cannot unroll
            if EVEN:
                a = tl.load(a_ptr + k0 + a_off)
                w = tl.load(w_ptr + (n0 * K + k0) + w_off)
            else:
                kk = k0 + tl.arange(0, KC)
                km = kk < K
                nm = n0 + tl.arange(0, NC) < N
                a = tl.load(a_ptr + k0 + a_off, mask=km[None, :], other=0.0)
                w = tl.load(w_ptr + (n0 * K + k0) + w_off, mask=km[:, None] & nm[None, :], other=0.0)
            acc = _dot(acc, _to16(a, w.dtype, DOT16), w, DOT16)
        return acc

    @triton.jit
    def _rms_norm_rows(src, dst, w_ptr, eps, D: tl.constexpr, Dr, BM: tl.constexpr, NC: tl.constexpr):
        # dst = src * rsqrt(mean(src^2) + eps) * w over rows of [BM, D] scratch, in NC-column chunks (two passes)
        rr = tl.arange(0, BM)
        ss = tl.zeros([BM], dtype=tl.float32)
        for c0 in tl.range(0, Dr, NC):
            cc = c0 + tl.arange(0, NC)
            x = tl.load(src + rr[:, None] * D + cc[None, :], mask=(cc < D)[None, :], other=0.0)
            ss += tl.sum(x * x, axis=1)
        inv = 1.0 / tl.sqrt_rn(ss / D + eps)
        for c0 in tl.range(0, Dr, NC):
            cc = c0 + tl.arange(0, NC)
            cm = cc < D
            x = tl.load(src + rr[:, None] * D + cc[None, :], mask=cm[None, :], other=0.0)
            w = tl.load(w_ptr + cc, mask=cm, other=0.0)
            tl.store(dst + rr[:, None] * D + cc[None, :], x * inv[:, None] * w[None, :], mask=cm[None, :])

    @triton.jit(do_not_specialize=["B", "stride_x", "stride_o", "n_blocks", "pos", "max_len", "ws_stride", "Dr", "Hr",
                                   "HIDr"])
    def _ar_stack_decode_kernel(
        x_ptr, out_ptr, wqkv, wo, w1, w3, w2, an_w, fn_w, rms_eps, nf_w, nf_b, cache_ptr, freqs_ptr, ws_ptr,
        B, stride_x, stride_o, n_blocks, pos, max_len, ws_stride, scale, ln_eps, Dr, Hr, HIDr,
        D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, HID: tl.constexpr,
        BM: tl.constexpr, KC: tl.constexpr, NC: tl.constexpr, KB: tl.constexpr, EVEN: tl.constexpr,
        DOT16: tl.constexpr,
    ):
        # One program per tile of BM rows (every row its own sequence). Dr, Hr, HIDr: D, H, HID again as runtime
        # ints, the bounds of the chunk / head loops: with constexpr bounds LLVM unrolls them and ptxas spills.
        # ws: this program's fp32 scratch,
        # sH [BM, D] residual stream, sA [BM, D] staged dot operand (norm output / attention output),
        # sQ [BM, 3D] q, k, v of the new token, sG [BM, HID] the SwiGLU hidden.
        pid = tl.program_id(0)
        ws = ws_ptr + pid.to(tl.int64) * ws_stride
        sH = ws
        sA = sH + BM * D
        sQ = sA + BM * D
        sG = sQ + BM * 3 * D
        rr = tl.arange(0, BM)
        row = pid * BM + rr
        rmask = row < B
        r64 = row.to(tl.int64)
        ncs = tl.arange(0, NC)

        for c0 in tl.range(0, Dr, NC):
            cc = c0 + ncs
            cm = cc < D
            x = tl.load(x_ptr + r64[:, None] * stride_x + cc[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
            tl.store(sH + rr[:, None] * D + cc[None, :], x.to(tl.float32), mask=cm[None, :])
        # RoPE angles of position pos, shared by every head and block: freqs [T, HD/2, 2] (cos, sin)
        HALF: tl.constexpr = HD // 2
        ii = tl.arange(0, HDP // 2)
        im = ii < HALF
        cos = tl.load(freqs_ptr + pos * HD + 2 * ii, mask=im, other=0.0)
        sin = tl.load(freqs_ptr + pos * HD + 2 * ii + 1, mask=im, other=0.0)
        cc_h = tl.arange(0, HDP)
        hm = cc_h < HD
        jj0 = tl.arange(0, KB)
        tl.debug_barrier()

        for d in tl.range(0, n_blocks):
            # ---- RMSNorm (attention) -> sA
            _rms_norm_rows(sH, sA, an_w + d * D, tl.load(rms_eps + 2 * d), D, Dr, BM, NC)
            tl.debug_barrier()
            # ---- q, k, v = sA @ wqkv^T -> sQ, NC columns at a time
            for n0 in tl.range(0, 3 * Dr, NC):
                acc = _linear_chunk(tl.zeros([BM, NC], dtype=tl.float32), sA, D, D, Dr, wqkv + d * 3 * D * D, n0,
                                    3 * D, BM, NC, KC, EVEN, DOT16)
                nn = n0 + ncs
                tl.store(sQ + rr[:, None] * (3 * D) + nn[None, :], acc, mask=(nn < 3 * D)[None, :])
            tl.debug_barrier()
            # ---- RoPE on q (in place) and k; rotated k and v written to the cache at pos
            # cache [NB, 2, B, T, D]: block d's keys of row r at ((2d * B + r) * T + j) * D, values B*T*D further
            kbase = cache_ptr + ((2 * d * B + r64) * max_len + pos) * D  # [BM] (int64: r64 first)
            vbase = cache_ptr + (((2 * d + 1) * B + r64) * max_len + pos) * D
            m2 = rmask[:, None] & im[None, :]
            for hh in tl.range(0, Hr):
                ev = hh * HD + 2 * ii  # even columns of head hh
                q0 = tl.load(sQ + rr[:, None] * (3 * D) + ev[None, :], mask=im[None, :], other=0.0)
                q1 = tl.load(sQ + rr[:, None] * (3 * D) + ev[None, :] + 1, mask=im[None, :], other=0.0)
                tl.store(sQ + rr[:, None] * (3 * D) + ev[None, :], q0 * cos[None, :] - q1 * sin[None, :],
                         mask=im[None, :])
                tl.store(sQ + rr[:, None] * (3 * D) + ev[None, :] + 1, q1 * cos[None, :] + q0 * sin[None, :],
                         mask=im[None, :])
                k0 = tl.load(sQ + rr[:, None] * (3 * D) + D + ev[None, :], mask=im[None, :], other=0.0)
                k1 = tl.load(sQ + rr[:, None] * (3 * D) + D + ev[None, :] + 1, mask=im[None, :], other=0.0)
                kp = kbase[:, None] + ev[None, :]
                cdt: tl.constexpr = cache_ptr.dtype.element_ty
                tl.store(kp, _to16(k0 * cos[None, :] - k1 * sin[None, :], cdt, DOT16), mask=m2)
                tl.store(kp + 1, _to16(k1 * cos[None, :] + k0 * sin[None, :], cdt, DOT16), mask=m2)
                v0 = tl.load(sQ + rr[:, None] * (3 * D) + 2 * D + ev[None, :], mask=im[None, :], other=0.0)
                v1 = tl.load(sQ + rr[:, None] * (3 * D) + 2 * D + ev[None, :] + 1, mask=im[None, :], other=0.0)
                vp = vbase[:, None] + ev[None, :]
                tl.store(vp, _to16(v0, cdt, DOT16), mask=m2)
                tl.store(vp + 1, _to16(v1, cdt, DOT16), mask=m2)
            tl.debug_barrier()
            # ---- attention of the new query over keys 0..pos, per head: online softmax over KB-key chunks of
            # [BM, KB, HDP] broadcast products (fp32) -> sA
            krow = cache_ptr + (2 * d * B + r64) * max_len * D  # [BM] block d's keys of each row
            vrow = cache_ptr + ((2 * d + 1) * B + r64) * max_len * D
            for hh in tl.range(0, Hr):
                q = tl.load(sQ + rr[:, None] * (3 * D) + hh * HD + cc_h[None, :], mask=hm[None, :], other=0.0)
                m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
                l_i = tl.zeros([BM], dtype=tl.float32)
                acc = tl.zeros([BM, HDP], dtype=tl.float32)
                for j0 in tl.range(0, pos + 1, KB):
                    jj = j0 + jj0
                    jm = jj <= pos
                    off = (jj.to(tl.int64) * D)[None, :, None] + (hh * HD + cc_h)[None, None, :]
                    m3 = rmask[:, None, None] & jm[None, :, None] & hm[None, None, :]
                    k = tl.load(krow[:, None, None] + off, mask=m3, other=0.0).to(tl.float32)
                    s = tl.sum(q[:, None, :] * k, axis=2) * scale  # [BM, KB]
                    s = tl.where(jm[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    v = tl.load(vrow[:, None, None] + off, mask=m3, other=0.0).to(tl.float32)
                    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
                    m_i = m_new
                tl.store(sA + rr[:, None] * D + hh * HD + cc_h[None, :], acc / l_i[:, None], mask=hm[None, :])
            tl.debug_barrier()
            # ---- h += o @ wo^T
            for n0 in tl.range(0, Dr, NC):
                nn = n0 + ncs
                nm = (nn < D)[None, :]
                hp = sH + rr[:, None] * D + nn[None, :]
                acc = _linear_chunk(tl.load(hp, mask=nm, other=0.0), sA, D, D, Dr, wo + d * D * D, n0, D, BM, NC,
                                    KC, EVEN, DOT16)
                tl.store(hp, acc, mask=nm)
            tl.debug_barrier()
            # ---- RMSNorm (ffn) -> sA; SwiGLU hidden silu(sA @ w1^T) * (sA @ w3^T) -> sG; h += sG @ w2^T
            _rms_norm_rows(sH, sA, fn_w + d * D, tl.load(rms_eps + 2 * d + 1), D, Dr, BM, NC)
            tl.debug_barrier()
            for n0 in tl.range(0, HIDr, NC):
                a1 = _linear_chunk(tl.zeros([BM, NC], dtype=tl.float32), sA, D, D, Dr, w1 + d * HID * D, n0, HID,
                                   BM, NC, KC, EVEN, DOT16)
                a3 = _linear_chunk(tl.zeros([BM, NC], dtype=tl.float32), sA, D, D, Dr, w3 + d * HID * D, n0, HID,
                                   BM, NC, KC, EVEN, DOT16)
                g = a1 / (1.0 + tl.exp(-a1)) * a3
                nn = n0 + ncs
                tl.store(sG + rr[:, None] * HID + nn[None, :], g, mask=(nn < HID)[None, :])
            tl.debug_barrier()
            for n0 in tl.range(0, Dr, NC):
                nn = n0 + ncs
                nm = (nn < D)[None, :]
                hp = sH + rr[:, None] * D + nn[None, :]
                acc = _linear_chunk(tl.load(hp, mask=nm, other=0.0), sG, HID, HID, HIDr, w2 + d * D * HID, n0, D,
                                    BM, NC, KC, EVEN, DOT16)
                tl.store(hp, acc, mask=nm)
            tl.debug_barrier()

        # ---- the level's final LayerNorm -> out (x's dtype), three chunked passes: mean, variance, write
        s1 = tl.zeros([BM], dtype=tl.float32)
        for c0 in tl.range(0, Dr, NC):
            cc = c0 + ncs
            s1 += tl.sum(tl.load(sH + rr[:, None] * D + cc[None, :], mask=(cc < D)[None, :], other=0.0), axis=1)
        mean = s1 / D
        s2 = tl.zeros([BM], dtype=tl.float32)
        for c0 in tl.range(0, Dr, NC):
            cc = c0 + ncs
            cm = (cc < D)[None, :]
            xc = tl.where(cm, tl.load(sH + rr[:, None] * D + cc[None, :], mask=cm, other=0.0) - mean[:, None], 0.0)
            s2 += tl.sum(xc * xc, axis=1)
        rstd = 1.0 / tl.sqrt_rn(s2 / D + ln_eps)
        for c0 in tl.range(0, Dr, NC):
            cc = c0 + ncs
            cm = cc < D
            xh = tl.load(sH + rr[:, None] * D + cc[None, :], mask=cm[None, :], other=0.0)
            y = (xh - mean[:, None]) * rstd[:, None] * tl.load(nf_w + cc, mask=cm, other=0.0)[None, :] \
                + tl.load(nf_b + cc, mask=cm, other=0.0)[None, :]
            tl.store(out_ptr + r64[:, None] * stride_o + cc[None, :], _to16(y, out_ptr.dtype.element_ty, DOT16),
                     mask=rmask[:, None] & cm[None, :])
