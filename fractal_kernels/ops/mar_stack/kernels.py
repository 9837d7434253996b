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
    def _ln_rows(src, dst, w_ptr, b_ptr, eps, n_rows, D: tl.constexpr, Dr, LP: tl.constexpr, NC: tl.constexpr,
                 EVEN: tl.constexpr):
        # dst[r, :] = LayerNorm(src[r, :]) for the LP rows of a [LP, D] fp32 tile (row stride D), stored for
        # rows < n_rows in dst's dtype. D in NC-column chunks: two passes (mean, then the centred variance, as
        # F.layer_norm's two-pass numerics), then the normalised chunks; registers stay [LP, NC]. Dr == D at run
        # time (a loop bound LLVM cannot unroll); EVEN (NC divides D) drops the column masks; offset tiles are
        # built per chunk.
        rr = tl.arange(0, LP)
        ncs = tl.arange(0, NC)
        acc = tl.zeros([LP], dtype=tl.float32)
        for c0 in tl.range(0, Dr, NC):
            off = rr[:, None] * D + (c0 + ncs)[None, :]
            if EVEN:
                t = tl.load(src + off)
            else:
                t = tl.load(src + off, mask=(c0 + ncs < D)[None, :], other=0.0)
            acc += tl.sum(t, axis=1)
        mean = acc / D
        acc = tl.zeros([LP], dtype=tl.float32)
        for c0 in tl.range(0, Dr, NC):
            off = rr[:, None] * D + (c0 + ncs)[None, :]
            if EVEN:
                t = tl.load(src + off) - mean[:, None]
            else:
                cm = (c0 + ncs < D)[None, :]
                t = tl.where(cm, tl.load(src + off, mask=cm, other=0.0) - mean[:, None], 0.0)
            acc += tl.sum(t * t, axis=1)
        den = tl.sqrt_rn(acc / D + eps)
        rm = (rr < n_rows)[:, None]
        for c0 in tl.range(0, Dr, NC):
            off = rr[:, None] * D + (c0 + ncs)[None, :]
            if EVEN:
                t = tl.load(src + off)
                w = tl.load(w_ptr + c0 + ncs)
                b = tl.load(b_ptr + c0 + ncs)
                m = rm
            else:
                cmask = c0 + ncs < D
                t = tl.load(src + off, mask=cmask[None, :], other=0.0)
                w = tl.load(w_ptr + c0 + ncs, mask=cmask, other=0.0)
                b = tl.load(b_ptr + c0 + ncs, mask=cmask, other=0.0)
                m = rm & cmask[None, :]
            y = (t - mean[:, None]) / den[:, None] * w[None, :] + b[None, :]
            tl.store(dst + off, _cast(y, dst.dtype.element_ty), mask=m)

    @triton.jit
    def _linear(a_ptr, K: tl.constexpr, Kr, w_ptr, b_ptr, N: tl.constexpr, Nr, out_ptr, RESID: tl.constexpr,
                GELU: tl.constexpr, LP: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr, EVEN: tl.constexpr,
                DOT16: tl.constexpr):
        # out[LP, N] (+)= act(A[LP, K] @ Wm[N, K]^T + b). A fp32 in the scratch (row stride K), Wm row-major (an
        # nn.Linear weight), out fp32 (row stride N). N in NC-column chunks, K in KC chunks, both runtime loops
        # (Kr, Nr == K, N at run time: bounds LLVM cannot unroll): only an [LP, NC] accumulator and one
        # [LP, KC] / [KC, NC] operand pair are live, whatever the width. Offset tiles are built per chunk (tiles
        # hoisted out of the block loop stay live across it and spill); EVEN (KC, NC divide K, N) drops the masks.
        # 16-bit Wm: A is rounded to Wm's dtype first (autocast's cast), a tensor-core dot with fp32 accumulation.
        rr = tl.arange(0, LP)
        ncs = tl.arange(0, NC)
        kcs = tl.arange(0, KC)
        for n0 in tl.range(0, Nr, NC):
            acc = tl.zeros([LP, NC], dtype=tl.float32)
            o_off = rr[:, None] * N + (n0 + ncs)[None, :]  # [LP, NC]
            for k0 in tl.range(0, Kr, KC):
                a_off = rr[:, None] * K + (k0 + kcs)[None, :]  # [LP, KC]
                w_off = (n0 + ncs)[None, :] * K + (k0 + kcs)[:, None]  # [KC, NC]
                if EVEN:
                    a = tl.load(a_ptr + a_off)
                    w = tl.load(w_ptr + w_off)
                else:
                    kmask = k0 + kcs < K
                    nmask = n0 + ncs < N
                    a = tl.load(a_ptr + a_off, mask=kmask[None, :], other=0.0)
                    w = tl.load(w_ptr + w_off, mask=kmask[:, None] & nmask[None, :],
                                other=0.0)  # [KC, NC]
                if w.dtype != tl.float32:
                    a = _cast(a, w.dtype)
                acc = _dot(acc, a, w, DOT16)
            if EVEN:
                acc += tl.load(b_ptr + n0 + ncs)[None, :]
            else:
                acc += tl.load(b_ptr + n0 + ncs, mask=n0 + ncs < N, other=0.0)[None, :]
            if GELU:
                acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            optr = out_ptr + o_off
            if EVEN:
                if RESID:
                    acc = tl.load(optr) + acc
                tl.store(optr, acc)
            else:
                nm = (n0 + ncs < N)[None, :]
                if RESID:
                    acc = tl.load(optr, mask=nm, other=0.0) + acc
                tl.store(optr, acc, mask=nm)

    @triton.jit
    def _attention(qkv_ptr, o_ptr, L, scale, D: tl.constexpr, H: tl.constexpr, Hr, DH: tl.constexpr, DHr,
                   LP: tl.constexpr, DC: tl.constexpr, EVEN: tl.constexpr):
        # o[LP, D] = softmax(q k^T * scale) v per head, all fp32 ("ieee" dots), from qkv [LP, 3D] in the scratch.
        # Keys past L are masked; the head dim goes in DC chunks (masked past DH unless EVEN, DC dividing DH: head
        # dims like 80 or 20 need no power of two), so only [LP, LP] scores and [LP, DC] operands are live.
        # Hr, DHr == H, DH at run time (loop bounds LLVM cannot unroll).
        rr = tl.arange(0, LP)
        dcs = tl.arange(0, DC)
        kvalid = rr < L
        for h in tl.range(0, Hr):
            s = tl.zeros([LP, LP], dtype=tl.float32)
            for d0 in tl.range(0, DHr, DC):
                c = h * DH + d0
                q_off = rr[:, None] * (3 * D) + (c + dcs)[None, :]  # [LP, DC]
                k_off = rr[None, :] * (3 * D) + (c + dcs)[:, None]  # [DC, LP]
                if EVEN:
                    q = tl.load(qkv_ptr + q_off)
                    kt = tl.load(qkv_ptr + D + k_off)
                else:
                    dm = d0 + dcs < DH
                    q = tl.load(qkv_ptr + q_off, mask=dm[None, :], other=0.0)
                    kt = tl.load(qkv_ptr + D + k_off, mask=dm[:, None], other=0.0)  # [DC, LP]
                s = tl.dot(q, kt, s, input_precision="ieee", out_dtype=tl.float32)
            s = tl.where(kvalid[None, :], s * scale, float("-inf"))
            p = tl.exp(s - tl.max(s, axis=1)[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            for d0 in tl.range(0, DHr, DC):
                c = h * DH + d0
                q_off = rr[:, None] * (3 * D) + (c + dcs)[None, :]
                o_off = rr[:, None] * D + (c + dcs)[None, :]
                if EVEN:
                    v = tl.load(qkv_ptr + 2 * D + q_off)
                    o = tl.dot(p, v, input_precision="ieee", out_dtype=tl.float32)
                    tl.store(o_ptr + o_off, o)
                else:
                    dm = (d0 + dcs < DH)[None, :]
                    v = tl.load(qkv_ptr + 2 * D + q_off, mask=dm, other=0.0)
                    o = tl.dot(p, v, input_precision="ieee", out_dtype=tl.float32)
                    tl.store(o_ptr + o_off, o, mask=dm)

    @triton.jit(do_not_specialize=["N", "L", "depth", "ws_stride", "eps", "Dr", "Hr", "DHr", "HIDr"])
    def _mar_stack_kernel(
        x_ptr, out_ptr, ws_ptr,
        n1_w, n1_b, qkv_w, qkv_b, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, nf_w, nf_b,
        N, L, depth, ws_stride, scale, eps, Dr, Hr, DHr, HIDr,
        D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, HID: tl.constexpr,
        LP: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr, DC: tl.constexpr, EVEN: tl.constexpr,
        DOT16: tl.constexpr,
    ):
        # x, out [N, L, D] contiguous. A persistent grid: program p runs sequences p, p + nprog, ... with its own
        # fp32 scratch (reused by each): X [LP, D] the residual stream, A [LP, D] the staged dot operand (LayerNorm
        # outputs, then the attention output), Q [LP, 3D] the qkv projection, Hd [LP, HID] the MLP hidden.
        # Rows past L are zeros on entry and stay finite; no valid row reads them (keys are masked).
        # Dr, Hr, DHr, HIDr: D, H, DH, HID again as runtime ints, the bounds of the chunk / head loops: with
        # constexpr bounds LLVM unrolls them and ptxas spills. EVEN: NC and KC divide D, 3D, HID and DC divides DH
        # (every published width): no column masks.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        sX = ws_ptr + pid.to(tl.int64) * ws_stride
        sA = sX + LP * D
        sQ = sA + LP * D
        sH = sQ + LP * 3 * D
        rr = tl.arange(0, LP)
        ncs = tl.arange(0, NC)
        rmask = rr < L
        D3r = 3 * Dr
        for it in range(0, tl.cdiv(N - pid, nprog)):
            base = (pid + it * nprog).to(tl.int64) * L * D
            for c0 in tl.range(0, Dr, NC):
                x_off = rr[:, None] * D + (c0 + ncs)[None, :]
                if EVEN:
                    t = tl.load(x_ptr + base + x_off, mask=rmask[:, None], other=0.0)
                    tl.store(sX + x_off, t.to(tl.float32))
                else:
                    cm = (c0 + ncs < D)[None, :]
                    t = tl.load(x_ptr + base + x_off, mask=rmask[:, None] & cm, other=0.0)
                    tl.store(sX + x_off, t.to(tl.float32), mask=cm)
            tl.debug_barrier()
            for d in range(depth):
                _ln_rows(sX, sA, n1_w + d * D, n1_b + d * D, eps, LP, D, Dr, LP, NC, EVEN)
                tl.debug_barrier()
                _linear(sA, D, Dr, qkv_w + d * (3 * D * D), qkv_b + d * (3 * D), 3 * D, D3r, sQ, False, False,
                        LP, NC, KC, EVEN, DOT16)
                tl.debug_barrier()
                _attention(sQ, sA, L, scale, D, H, Hr, DH, DHr, LP, DC, EVEN)
                tl.debug_barrier()
                _linear(sA, D, Dr, proj_w + d * (D * D), proj_b + d * D, D, Dr, sX, True, False, LP, NC, KC, EVEN,
                        DOT16)
                tl.debug_barrier()
                _ln_rows(sX, sA, n2_w + d * D, n2_b + d * D, eps, LP, D, Dr, LP, NC, EVEN)
                tl.debug_barrier()
                _linear(sA, D, Dr, fc1_w + d * (HID * D), fc1_b + d * HID, HID, HIDr, sH, False, True, LP, NC, KC,
                        EVEN, DOT16)
                tl.debug_barrier()
                _linear(sH, HID, HIDr, fc2_w + d * (D * HID), fc2_b + d * D, D, Dr, sX, True, False, LP, NC, KC,
                        EVEN, DOT16)
                tl.debug_barrier()
            _ln_rows(sX, out_ptr + base, nf_w, nf_b, eps, L, D, Dr, LP, NC, EVEN)
            tl.debug_barrier()  # the next sequence rewrites X, which the final norm read
