"""Fused linear: the Triton kernel ``_fused_linear_kernel``. Numerics and design:
:mod:`fractal_kernels.ops.fused_linear`. Defined only when triton is installed (``HAS_TRITON``)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    # 16-bit casts through tiny_attention's _cast: the interpreter's fp32 -> bf16 cast truncates, a GPU's rounds
    # to nearest even; _cast keeps the GPU's rounding in interpreter runs (a plain cast on a GPU)
    from fractal_kernels.ops.tiny_attention.kernels import _cast
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _fused_linear_kernel(
            x_ptr, w_ptr, b_ptr, nw_ptr, nb_ptr, r_ptr, out_ptr,
            M, N, K, sxm, sxk, swn, srm, som, eps,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NORM: tl.constexpr,
            BIAS: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr, DOT16: tl.constexpr, EVEN_K: tl.constexpr):
        # One program: a [BM, BN] output tile, K in BK chunks through tl.dot (fp32 accumulation). Tiles ordered in
        # GROUP_M-row bands so consecutive programs share weight columns in L2.
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        band = GROUP_M * n_n
        first = (pid // band) * GROUP_M
        size = tl.minimum(n_m - first, GROUP_M)
        pid_m = first + (pid % band) % size
        pid_n = (pid % band) // size
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
        w_cols = w_ptr + cols_c[None, :] * swn
        if NORM:
            # LayerNorm prologue: every program reduces its BM rows over K itself (two passes, from L2)
            s1 = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + ks0
                xt = tl.load(x_rows + ks[None, :] * sxk, mask=(ks < K)[None, :], other=0.0).to(tl.float32)
                s1 += tl.sum(xt, axis=1)
            mean = s1 / K
            s2 = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + ks0
                # lanes past K read wrapped real columns (unmasked): the where drops them
                xt = tl.load(x_rows + (ks % K)[None, :] * sxk).to(tl.float32)
                d = tl.where((ks < K)[None, :], xt - mean[:, None], 0.0)
                s2 += tl.sum(d * d, axis=1)
            rstd = 1.0 / tl.sqrt(s2 / K + eps)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + ks0
            if EVEN_K:
                a = tl.load(x_rows + ks[None, :] * sxk)
                w = tl.load(w_cols + ks[:, None])
            else:
                kmask = ks < K
                a = tl.load(x_rows + ks[None, :] * sxk, mask=kmask[None, :], other=0.0)
                w = tl.load(w_cols + ks[:, None], mask=kmask[:, None], other=0.0)
            if NORM:
                if EVEN_K:
                    nw = tl.load(nw_ptr + ks).to(tl.float32)
                    nb = tl.load(nb_ptr + ks).to(tl.float32)
                else:
                    nw = tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
                    nb = tl.load(nb_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * nw[None, :] + nb[None, :]
            if DOT16 == 0:  # fp32 weights: an exact fp32 dot
                acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                # 16-bit weights: the input rounded to their dtype (autocast), then a tensor-core dot; under the
                # interpreter (DOT16 == 2, whose bf16 dot is wrong) the same exact products as an fp32 dot
                a16 = _cast(a.to(tl.float32), w.dtype) if a.dtype != w.dtype else a
                if DOT16 == 2:
                    acc = tl.dot(a16.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee",
                                 out_dtype=tl.float32)
                else:
                    acc = tl.dot(a16, w, acc, out_dtype=tl.float32)
        if BIAS:
            acc += tl.load(b_ptr + cols_c).to(tl.float32)[None, :]
        if ACT == 1:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        omask = rmask[:, None] & cmask[None, :]
        if RES:
            acc += tl.load(r_ptr + rows_c[:, None] * srm + cols_c[None, :]).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * som + cols[None, :], _cast(acc, out_ptr.dtype.element_ty),
                 mask=omask)
