"""Fused MAR block stack: the Triton kernel ``_mar_stack_kernel`` (every block of a MAR level's step and its final
LayerNorm in one launch) and its inlined helpers. Design and numerics: :mod:`fractal_kernels.ops.mar_stack`.
Defined only when triton is installed (``HAS_TRITON``)."""
from __future__ import annotations

from fractal_kernels.ops.pixel_head.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl
    from fractal_kernels.ops.pixel_head.kernels import _dot
    # 16-bit casts go through _cast: the interpreter's fp32 -> bf16 cast truncates, a GPU's rounds to nearest even
    from fractal_kernels.ops.tiny_attention.kernels import _cast

    @triton.jit
    def _ln_rows(src, dst, w_ptr, b_ptr, eps, n_rows, D: tl.constexpr, LP: tl.constexpr, NC: tl.constexpr):
        # dst[r, :] = LayerNorm(src[r, :]) for the LP rows of a [LP, D] fp32 tile (row stride D), stored for
        # rows < n_rows in dst's dtype. D in NC-column chunks: two passes (mean, then the centred variance, as
        # F.layer_norm's two-pass numerics), then the normalised chunks; registers stay [LP, NC].
        rr = tl.arange(0, LP)
        acc = tl.zeros([LP], dtype=tl.float32)
        for c0 in tl.range(0, D, NC):
            cc = c0 + tl.arange(0, NC)
            acc += tl.sum(tl.load(src + rr[:, None] * D + cc[None, :], mask=(cc < D)[None, :], other=0.0), axis=1)
        mean = acc / D
        acc = tl.zeros([LP], dtype=tl.float32)
        for c0 in tl.range(0, D, NC):
            cc = c0 + tl.arange(0, NC)
            cm = (cc < D)[None, :]
            t = tl.where(cm, tl.load(src + rr[:, None] * D + cc[None, :], mask=cm, other=0.0) - mean[:, None], 0.0)
            acc += tl.sum(t * t, axis=1)
        den = tl.sqrt_rn(acc / D + eps)
        for c0 in tl.range(0, D, NC):
            cc = c0 + tl.arange(0, NC)
            cmask = cc < D
            t = tl.load(src + rr[:, None] * D + cc[None, :], mask=cmask[None, :], other=0.0)
            w = tl.load(w_ptr + cc, mask=cmask, other=0.0)
            b = tl.load(b_ptr + cc, mask=cmask, other=0.0)
            y = (t - mean[:, None]) / den[:, None] * w[None, :] + b[None, :]
            tl.store(dst + rr[:, None] * D + cc[None, :], _cast(y, dst.dtype.element_ty),
                     mask=(rr < n_rows)[:, None] & cmask[None, :])

    @triton.jit
    def _linear(a_ptr, K: tl.constexpr, w_ptr, b_ptr, N: tl.constexpr, out_ptr, RESID: tl.constexpr,
                GELU: tl.constexpr, LP: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr, DOT16: tl.constexpr):
        # out[LP, N] (+)= act(A[LP, K] @ Wm[N, K]^T + b). A fp32 in the scratch (row stride K), Wm row-major (an
        # nn.Linear weight), out fp32 (row stride N). N in NC-column chunks, K in KC chunks, both runtime loops:
        # only an [LP, NC] accumulator and one [LP, KC] / [KC, NC] operand pair are live, whatever the width.
        # 16-bit Wm: A is rounded to Wm's dtype first (autocast's cast), a tensor-core dot with fp32 accumulation.
        rr = tl.arange(0, LP)
        for n0 in tl.range(0, N, NC):
            cols = n0 + tl.arange(0, NC)
            nmask = cols < N
            acc = tl.zeros([LP, NC], dtype=tl.float32)
            for k0 in tl.range(0, K, KC):
                kk = k0 + tl.arange(0, KC)
                kmask = kk < K
                a = tl.load(a_ptr + rr[:, None] * K + kk[None, :], mask=kmask[None, :], other=0.0)
                w = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=kmask[:, None] & nmask[None, :],
                            other=0.0)  # [KC, NC]
                if w.dtype != tl.float32:
                    a = _cast(a, w.dtype)
                acc = _dot(acc, a, w, DOT16)
            acc += tl.load(b_ptr + cols, mask=nmask, other=0.0)[None, :]
            if GELU:
                acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            optr = out_ptr + rr[:, None] * N + cols[None, :]
            if RESID:
                acc = tl.load(optr, mask=nmask[None, :], other=0.0) + acc
            tl.store(optr, acc, mask=nmask[None, :])

    @triton.jit
    def _attention(qkv_ptr, o_ptr, L, scale, D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr,
                   LP: tl.constexpr, DC: tl.constexpr):
        # o[LP, D] = softmax(q k^T * scale) v per head, all fp32 ("ieee" dots), from qkv [LP, 3D] in the scratch.
        # Keys past L are masked; the head dim goes in DC chunks (masked past DH: head dims like 80 or 20 need no
        # power of two), so only [LP, LP] scores and [LP, DC] operands are live.
        rr = tl.arange(0, LP)
        kvalid = rr < L
        for h in tl.range(0, H):
            s = tl.zeros([LP, LP], dtype=tl.float32)
            for d0 in tl.range(0, DH, DC):
                dd = d0 + tl.arange(0, DC)
                dm = dd < DH
                q = tl.load(qkv_ptr + rr[:, None] * (3 * D) + (h * DH + dd)[None, :], mask=dm[None, :], other=0.0)
                kt = tl.load(qkv_ptr + rr[None, :] * (3 * D) + (D + h * DH + dd)[:, None], mask=dm[:, None],
                             other=0.0)  # [DC, LP]
                s = tl.dot(q, kt, s, input_precision="ieee", out_dtype=tl.float32)
            s = tl.where(kvalid[None, :], s * scale, float("-inf"))
            p = tl.exp(s - tl.max(s, axis=1)[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            for d0 in tl.range(0, DH, DC):
                dd = d0 + tl.arange(0, DC)
                dm = dd < DH
                v = tl.load(qkv_ptr + rr[:, None] * (3 * D) + (2 * D + h * DH + dd)[None, :], mask=dm[None, :],
                            other=0.0)
                o = tl.dot(p, v, input_precision="ieee", out_dtype=tl.float32)
                tl.store(o_ptr + rr[:, None] * D + (h * DH + dd)[None, :], o, mask=dm[None, :])

    @triton.jit(do_not_specialize=["N", "L", "depth", "ws_stride", "eps"])
    def _mar_stack_kernel(
        x_ptr, out_ptr, ws_ptr,
        n1_w, n1_b, qkv_w, qkv_b, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, nf_w, nf_b,
        N, L, depth, ws_stride, scale, eps,
        D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, HID: tl.constexpr,
        LP: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr, DC: tl.constexpr, DOT16: tl.constexpr,
    ):
        # x, out [N, L, D] contiguous. A persistent grid: program p runs sequences p, p + nprog, ... with its own
        # fp32 scratch (reused by each): X [LP, D] the residual stream, A [LP, D] the staged dot operand (LayerNorm
        # outputs, then the attention output), Q [LP, 3D] the qkv projection, Hd [LP, HID] the MLP hidden.
        # Rows past L are zeros on entry and stay finite; no valid row reads them (keys are masked).
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        sX = ws_ptr + pid.to(tl.int64) * ws_stride
        sA = sX + LP * D
        sQ = sA + LP * D
        sH = sQ + LP * 3 * D
        rr = tl.arange(0, LP)
        rmask = rr < L
        for it in range(0, tl.cdiv(N - pid, nprog)):
            base = (pid + it * nprog).to(tl.int64) * L * D
            for c0 in tl.range(0, D, NC):
                cc = c0 + tl.arange(0, NC)
                cm = (cc < D)[None, :]
                t = tl.load(x_ptr + base + rr[:, None] * D + cc[None, :], mask=rmask[:, None] & cm, other=0.0)
                tl.store(sX + rr[:, None] * D + cc[None, :], t.to(tl.float32), mask=cm)
            tl.debug_barrier()
            for d in range(depth):
                _ln_rows(sX, sA, n1_w + d * D, n1_b + d * D, eps, LP, D, LP, NC)
                tl.debug_barrier()
                _linear(sA, D, qkv_w + d * (3 * D * D), qkv_b + d * (3 * D), 3 * D, sQ, False, False,
                        LP, NC, KC, DOT16)
                tl.debug_barrier()
                _attention(sQ, sA, L, scale, D, H, DH, LP, DC)
                tl.debug_barrier()
                _linear(sA, D, proj_w + d * (D * D), proj_b + d * D, D, sX, True, False, LP, NC, KC, DOT16)
                tl.debug_barrier()
                _ln_rows(sX, sA, n2_w + d * D, n2_b + d * D, eps, LP, D, LP, NC)
                tl.debug_barrier()
                _linear(sA, D, fc1_w + d * (HID * D), fc1_b + d * HID, HID, sH, False, True, LP, NC, KC, DOT16)
                tl.debug_barrier()
                _linear(sH, HID, fc2_w + d * (D * HID), fc2_b + d * D, D, sX, True, False, LP, NC, KC, DOT16)
                tl.debug_barrier()
            _ln_rows(sX, out_ptr + base, nf_w, nf_b, eps, L, D, LP, NC)
            tl.debug_barrier()  # the next sequence rewrites X, which the final norm read
