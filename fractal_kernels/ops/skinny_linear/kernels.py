"""Skinny fused linear: the Triton kernel ``_skinny_linear_kernel``. Numerics and design:
:mod:`fractal_kernels.ops.skinny_linear`. Defined only when triton is installed (``HAS_TRITON``)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    # 16-bit casts through tiny_attention's _cast: the interpreter's fp32 -> bf16 cast truncates, a GPU's
    # rounds to nearest even; _cast keeps the GPU's rounding in interpreter runs (a plain cast on a GPU)
    from fractal_kernels.ops.tiny_attention.kernels import _cast
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _skinny_linear_kernel(
            x_ptr, w_ptr, g_ptr, b_ptr, nw_ptr, r_ptr, out_ptr, kv_ptr,
            M, N, K, sxm, sxk, swn, sgn, srm, som, eps, NQ, HD, skv0, skvm, skvh, skvd,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, GATE: tl.constexpr,
            BIAS: tl.constexpr, RES: tl.constexpr, ROUND: tl.constexpr, EVEN_K: tl.constexpr, KV: tl.constexpr):
        # One program: BN output columns of BM rows. The weight tile is the only large operand, so the columns
        # are split over (at least) one program per SM and each program streams its [BN, K] weight rows once;
        # x (few rows) is re-read by every program from L2. No tensor cores: at BM <= 16 rows the work is a
        # matrix-vector product bound by weight bytes, and the FMA lanes keep BN free to be as small as the
        # grid needs (a tensor-core tile would force BN >= 16, i.e. N / 16 programs).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < M
        cmask = cols < N
        # padding rows / columns read real rows / columns (indices wrapped, unmasked loads): their results
        # are never stored, and no load reaches past a tensor; only K is masked (its fill meets the products)
        rows_c = (rows % M).to(tl.int64)
        cols_c = (cols % N).to(tl.int64)
        ks0 = tl.arange(0, BK)
        x_rows = x_ptr + rows_c[:, None] * sxm
        if NORM:
            # RMSNorm prologue: every program reduces its rows itself (K values a row: cheaper than a launch)
            ss = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + ks0
                if EVEN_K:
                    xt = tl.load(x_rows + ks[None, :] * sxk).to(tl.float32)
                else:
                    xt = tl.load(x_rows + ks[None, :] * sxk, mask=(ks < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xt * xt, axis=1)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        # products accumulate elementwise over K chunks and are reduced once at the end (one reduction, not
        # one per chunk); the accumulator is BM * BN * BK fp32 spread over the program's threads
        acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
        if GATE:
            gacc = tl.zeros([BM, BN, BK], dtype=tl.float32)
        w_rows = w_ptr + cols_c[:, None] * swn
        g_rows = g_ptr + cols_c[:, None] * sgn
        for k0 in range(0, K, BK):
            ks = k0 + ks0
            if EVEN_K:
                xt = tl.load(x_rows + ks[None, :] * sxk).to(tl.float32)
                wt = tl.load(w_rows + ks[None, :]).to(tl.float32)
            else:
                kmask = ks < K
                xt = tl.load(x_rows + ks[None, :] * sxk, mask=kmask[None, :], other=0.0).to(tl.float32)
                wt = tl.load(w_rows + ks[None, :], mask=kmask[None, :], other=0.0).to(tl.float32)
            if NORM:
                if EVEN_K:
                    nw = tl.load(nw_ptr + ks).to(tl.float32)
                else:
                    nw = tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
                xt = xt * rstd[:, None] * nw[None, :]
            # a 16-bit weight takes its input rounded to its dtype (autocast's cast before the GEMM)
            if ROUND == 1:
                xt = _cast(xt, tl.bfloat16).to(tl.float32)
            elif ROUND == 2:
                xt = xt.to(tl.float16).to(tl.float32)
            acc += xt[:, None, :] * wt[None, :, :]
            if GATE:
                if EVEN_K:
                    gt = tl.load(g_rows + ks[None, :]).to(tl.float32)
                else:
                    gt = tl.load(g_rows + ks[None, :], mask=(ks < K)[None, :], other=0.0).to(tl.float32)
                gacc += xt[:, None, :] * gt[None, :, :]
        y = tl.sum(acc, axis=2)  # [BM, BN]
        if BIAS:
            y += tl.load(b_ptr + cols_c).to(tl.float32)[None, :]
        if GATE:
            y = y * tl.sigmoid(y) * tl.sum(gacc, axis=2)
        omask = rmask[:, None] & cmask[None, :]
        if RES:
            y += tl.load(r_ptr + rows_c[:, None] * srm + cols_c[None, :]).to(tl.float32)
        yo = _cast(y, out_ptr.dtype.element_ty)
        if KV:
            # an attention projection [q | k | v]: columns >= NQ are the key / value of one cache position, stored
            # into the cache (kv_ptr: [2, M, H, HD] strided, the position's slice) after the output's rounding,
            # what the unfused path's copy of the output into the cache would store; q stays in out
            isq = cols < NQ
            c2 = tl.where(isq, 0, cols - NQ).to(tl.int64)
            part = c2 // (NQ)  # 0: key, 1: value (NQ = H * HD columns each)
            head = (c2 % NQ) // HD
            kv_off = part * skv0 + rows.to(tl.int64)[:, None] * skvm + (head * skvh + (c2 % HD) * skvd)[None, :]
            tl.store(kv_ptr + kv_off, yo.to(kv_ptr.dtype.element_ty), mask=omask & (~isq)[None, :])
            omask = omask & isq[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * som + cols[None, :], yo, mask=omask)
