"""Fused pixel head: the Triton kernel ``_pixel_head_kernel`` (the whole 3-channel loop for a tile of pixels)
and its inlined helpers. Design and numerics: :mod:`fractal_kernels.ops.pixel_head`. Defined only when triton
is installed (``HAS_TRITON``).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from fractal_kernels.ops.sample_logits.kernels import (_bisect_threshold, _filter_cfg_mix,
                                                           _inverse_cdf_draw, _philox_uniform, _sanitize)
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _layer_norm(x, w_ptr, b_ptr, cols, W: tl.constexpr):
        # LayerNorm over the last dim of an [R, W] tile, eps 1e-6 (the pixel head's)
        mean = tl.sum(x, axis=1) / W
        xc = x - mean[:, None]
        var = tl.sum(xc * xc, axis=1) / W
        w = tl.load(w_ptr + cols).to(tl.float32)
        b = tl.load(b_ptr + cols).to(tl.float32)
        return xc / tl.sqrt_rn(var + 1e-6)[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _dot(acc, a, w, DOT16: tl.constexpr):
        # acc [M, N] fp32 += a [M, K] @ w [K, N], fp32 accuracy whatever w's dtype.
        # fp32 w: an "ieee" fp32 dot. 16-bit w (exact in its dtype): a of w's dtype goes straight to the tensor
        # cores (the products are exact in fp32); an fp32 a is split into three 16-bit terms hi + mid + lo
        # (24+ significant bits, the fp32 value up to its last bit) and each term is a tensor-core dot with fp32
        # accumulation. DOT16 == 2 (the interpreter, whose dot reads bf16 bit patterns as integers) runs the
        # same split with fp32 dots of the exactly-representable terms.
        if w.dtype == tl.float32:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee", out_dtype=tl.float32)
        elif a.dtype == w.dtype:
            if DOT16 == 2:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(a, w, acc, out_dtype=tl.float32)
        else:
            a = a.to(tl.float32)
            hi = a.to(w.dtype)
            r = a - hi.to(tl.float32)
            mid = r.to(w.dtype)
            lo = (r - mid.to(tl.float32)).to(w.dtype)
            if DOT16 == 2:
                wf = w.to(tl.float32)
                acc = tl.dot(lo.to(tl.float32), wf, acc, input_precision="ieee", out_dtype=tl.float32)
                acc = tl.dot(mid.to(tl.float32), wf, acc, input_precision="ieee", out_dtype=tl.float32)
                acc = tl.dot(hi.to(tl.float32), wf, acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(lo, w, acc, out_dtype=tl.float32)
                acc = tl.dot(mid, w, acc, out_dtype=tl.float32)
                acc = tl.dot(hi, w, acc, out_dtype=tl.float32)
        return acc

    @triton.jit
    def _mm(acc, a_ptr, LDA: tl.constexpr, w_ptr, LDW: tl.constexpr, K: tl.constexpr,
            R: tl.constexpr, N: tl.constexpr, KC: tl.constexpr, DOT16: tl.constexpr):
        # acc [R, N] += A [R, K] @ Wm[0:N, 0:K]^T: A fp32 row-major (row stride LDA) in this program's scratch,
        # Wm a row-major weight block (row stride LDW, e.g. an nn.Linear weight). K in KC-column chunks, a
        # runtime loop: the code does not grow with K and only one [R, KC] / [KC, N] pair of operands is live.
        rr = tl.arange(0, R)
        nn = tl.arange(0, N)
        for k0 in tl.range(0, K, KC):
            kk = k0 + tl.arange(0, KC)
            a = tl.load(a_ptr + rr[:, None] * LDA + kk[None, :])
            w = tl.load(w_ptr + nn[None, :] * LDW + kk[:, None])  # [KC, N]
            acc = _dot(acc, a, w, DOT16)
        return acc

    @triton.jit
    def _heads(t, R: tl.constexpr, H: tl.constexpr, DH: tl.constexpr):
        return tl.reshape(t, [R, H, DH])

    @triton.jit
    def _sample_pixels(cond_rows, uncond_rows, pix, pmask, c, B, cfg_ptr, cfg_scalar, cfg_rows, inv_temp,
                       filter_threshold, top_p, do_top_p, draw, u_ptr, e_ptr, seed_lo, seed_hi, offset,
                       GUIDED: tl.constexpr, V: tl.constexpr, P: tl.constexpr):
        # channel c's draw for the pixels pix [P] (math of _sample_logits_kernel, V = 256, no top-k): cond_rows /
        # uncond_rows [P, 1] pointers to their fp32 logit rows -> (ids [P] int32, valid [P]: a finite logit)
        vcols = tl.arange(0, V)
        vmask = vcols < V
        vm2 = pmask[:, None] & vmask[None, :]
        p64 = pix.to(tl.int64)
        xc = tl.load(cond_rows + vcols[None, :], mask=vm2, other=0.0)
        x_s = _sanitize(xc * inv_temp)
        if GUIDED:
            xu = tl.load(uncond_rows + vcols[None, :], mask=vm2, other=0.0)
            u = _sanitize(xu * inv_temp)
            # per-pixel cfg, or the scalar broadcast (a masked-off load reads nothing)
            wcfg = tl.load(cfg_ptr + pix, mask=pmask & (pix * 0 + cfg_rows != 0), other=cfg_scalar).to(tl.float32)
            x_s = _filter_cfg_mix(x_s, u, wcfg[:, None], filter_threshold)
        xmax = tl.max(x_s, axis=1)
        valid = xmax > float("-inf")
        shift = tl.where(valid, xmax, 0.0)
        # rows without a finite logit (and padding pixels) divide by 1, not 0: no NaN, zero probabilities
        e = tl.where(valid[:, None] & vm2, tl.exp(x_s - shift[:, None]), 0.0)
        pr = e / tl.where(valid & pmask, tl.sum(e, axis=1), 1.0)[:, None]
        if do_top_p != 0:
            t = _bisect_threshold(pr, vmask, top_p, True, P)
            pr = tl.where(pr >= t[:, None], pr, 0.0)
            pr = pr / tl.where(valid & pmask, tl.sum(pr, axis=1), 1.0)[:, None]
        if draw == 3:
            idx = tl.argmax(x_s, axis=1)
        elif draw == 2:
            # exponential race, torch.multinomial's algorithm: argmax of p / e, e ~ Exp(1) given
            ev = tl.load(e_ptr + (c * B + p64)[:, None] * V + vcols[None, :], mask=vm2, other=1.0)
            idx = tl.argmax(pr / ev, axis=1)
        else:
            uni = tl.load(u_ptr + c * B + pix, mask=pmask & (pix * 0 + draw == 1), other=0.5)
            if draw == 0:
                uni = _philox_uniform(seed_lo, seed_hi, (p64 + c * B + offset).to(tl.uint64)).to(tl.float64)
            # the sampler contract's draw (fractal_kernels/reference/pixel_sampling.py)
            idx = _inverse_cdf_draw(pr, vmask, uni)
        return idx, valid

    @triton.jit(do_not_specialize=["B", "n_rows", "depth", "n_tiles", "ws_stride", "seed_lo", "seed_hi", "offset",
                                   "cfg_rows", "draw", "do_top_p", "write_logits", "write_values"])
    def _pixel_head_kernel(
        cond_ptr, cond_w, cond_b, cb_ptr, mlm_b, ln_w, ln_b,
        n1_w, n1_b, qkv_w, qkv_b, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, nf_w, nf_b,
        cfg_ptr, u_ptr, e_ptr, ids_ptr, ws_ptr, logits_ptr, vt_ptr, vals_ptr,
        B, C, n_rows, stride_cond, depth, n_tiles, ws_stride,
        scale, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
        cfg_rows, draw, do_top_p, write_logits, write_values,
        GUIDED: tl.constexpr, W: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, HID: tl.constexpr,
        HC: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr, NC: tl.constexpr, BLOCK_B: tl.constexpr,
        V: tl.constexpr, DOT16: tl.constexpr,
    ):
        # Runtime switches (one compiled variant serves them all): cfg_rows 1 = per-pixel cfg at cfg_ptr, else
        # cfg_scalar; draw 0 = inverse CDF of Philox uniforms, 1 = of the fp64 uniforms at u_ptr, 2 = exponential
        # race with the Exp(1) noise at e_ptr, 3 = greedy; do_top_p; write_logits (debug: raw logits out);
        # write_values: each id's value from the [3, V + 1] table at vt_ptr (column V: id -1) to vals_ptr too,
        # the lookup the caller would otherwise launch.
        NH: tl.constexpr = 2 if GUIDED else 1
        R: tl.constexpr = NH * BLOCK_B
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        r = tl.arange(0, R)
        cols = tl.arange(0, W)
        bb = tl.arange(0, BLOCK_B)

        # this program's scratch (fp32, reused by every tile it runs): A and Bo [R, W] staged dot operands
        # (LayerNorm outputs / attention output), Dh [2, R, HC] the MLP hidden chunk (double-buffered), F [R, V]
        # the logits, KV [depth, 2 tokens, R, 2W] keys/values of tokens 0 and 1
        ws = ws_ptr + pid.to(tl.int64) * ws_stride
        sA = ws
        sB = sA + R * W
        sD = sB + R * W
        sF = sD + 2 * R * HC
        sKV = sF + R * V
        rw_off = r[:, None] * W + cols[None, :]

        # one loop over this program's (tile, channel) pairs, not a channel loop inside a tile loop: there the
        # codebook's per-thread pointer was a tile-loop invariant that ptxas 12.9 spilled on sm_80 (W=128,
        # 16-bit weights: 8 B)
        dead = tl.zeros([BLOCK_B], dtype=tl.int32)  # 1: an earlier channel had no finite logit, ids stay -1
        for it in range(0, tl.cdiv(n_tiles - pid, nprog) * 3):
            tile = pid + (it // 3) * nprog
            c = it % 3
            pix_r = tile * BLOCK_B + r % BLOCK_B  # pixel of each tile row
            rmask = pix_r < B
            grow = (r // BLOCK_B) * B + pix_r  # row in cond: uncond rows sit B rows below
            g64 = grow.to(tl.int64)
            pix = tile * BLOCK_B + bb  # [BB] one per pixel (sampler side)
            pmask = pix < B
            p64 = pix.to(tl.int64)

            dead = tl.where(c == 0, 0, dead)  # a new tile
            # ---- token c's embedding [R, W]: the condition's projection, or the drawn id's codebook row
            if c == 0:
                tok = tl.zeros([R, W], dtype=tl.float32)
                for k0 in tl.range(0, C, BK):
                    kk = k0 + tl.arange(0, BK)
                    km = kk < C
                    xa = tl.load(cond_ptr + g64[:, None] * stride_cond + kk[None, :],
                                 mask=rmask[:, None] & km[None, :], other=0.0)
                    wt = tl.load(cond_w + cols[None, :] * C + kk[:, None], mask=km[:, None], other=0.0)
                    tok = _dot(tok, xa, wt, DOT16)
                tok += tl.load(cond_b + cols).to(tl.float32)[None, :]
            else:
                # the previous channel's ids (written below, behind a barrier); a dead pixel's -1 embeds id 0
                emb = tl.load(ids_ptr + pix_r.to(tl.int64) * 3 + (c - 1), mask=rmask, other=0)
                emb = tl.maximum(emb, 0)
                tok = tl.load(cb_ptr + (c - 1) * V * W + emb[:, None] * W + cols[None, :]).to(tl.float32)
            x = _layer_norm(tok, ln_w, ln_b, cols, W)

            # ---- the blocks, this token only, against cached keys/values of tokens < c
            for d in range(depth):
                tl.store(sA + rw_off, _layer_norm(x, n1_w + d * W, n1_b + d * W, cols, W))
                tl.debug_barrier()
                wq = qkv_w + d * 3 * W * W
                bq = qkv_b + d * 3 * W
                q = _mm(tl.zeros([R, W], dtype=tl.float32), sA, W, wq, W, W, R, W, KC, DOT16)
                k = _mm(tl.zeros([R, W], dtype=tl.float32), sA, W, wq + W * W, W, W, R, W, KC, DOT16)
                v = _mm(tl.zeros([R, W], dtype=tl.float32), sA, W, wq + 2 * W * W, W, W, R, W, KC, DOT16)
                q += tl.load(bq + cols).to(tl.float32)[None, :]
                k += tl.load(bq + W + cols).to(tl.float32)[None, :]
                v += tl.load(bq + 2 * W + cols).to(tl.float32)[None, :]
                kv_off = (d * 2 * R + r)[:, None] * (2 * W) + cols[None, :]  # token j at + j * R * 2W
                if c < 2:  # token 2 (G) is the last one any channel reads
                    tl.store(sKV + kv_off + c * R * 2 * W, k)
                    tl.store(sKV + kv_off + c * R * 2 * W + W, v)
                qh = _heads(q, R, H, DH)
                # online softmax over keys c (own), then 0 .. c-1 (cached): [R, H] scores, [R, H, DH] acc
                m_i = tl.sum(qh * _heads(k, R, H, DH), axis=2) * scale
                l_i = tl.full([R, H], 1.0, dtype=tl.float32)
                acc = _heads(v, R, H, DH)
                for j in range(c):
                    kj = tl.load(sKV + kv_off + j * R * 2 * W)
                    vj = tl.load(sKV + kv_off + j * R * 2 * W + W)
                    s = tl.sum(qh * _heads(kj, R, H, DH), axis=2) * scale
                    m_new = tl.maximum(m_i, s)
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new)
                    l_i = l_i * alpha + p
                    acc = acc * alpha[:, :, None] + p[:, :, None] * _heads(vj, R, H, DH)
                    m_i = m_new
                tl.store(sB + rw_off, tl.reshape(acc / l_i[:, :, None], [R, W]))
                tl.debug_barrier()
                x = _mm(x, sB, W, proj_w + d * W * W, W, W, R, W, KC, DOT16)
                x += tl.load(proj_b + d * W + cols).to(tl.float32)[None, :]
                # MLP, hidden dim in HC-column chunks: gelu(h @ fc1^T + b1) @ fc2^T accumulated, then + b2
                tl.store(sA + rw_off, _layer_norm(x, n2_w + d * W, n2_b + d * W, cols, W))
                tl.debug_barrier()
                mlp = tl.zeros([R, W], dtype=tl.float32)
                hcs = tl.arange(0, HC)
                for j0 in tl.range(0, HID, HC):
                    hc = j0 + hcs
                    hm = hc < HID
                    a = tl.zeros([R, HC], dtype=tl.float32)
                    rr = tl.arange(0, R)
                    for k0 in tl.range(0, W, KC):
                        kk = k0 + tl.arange(0, KC)
                        ak = tl.load(sA + rr[:, None] * W + kk[None, :])
                        w1 = tl.load(fc1_w + d * HID * W + hc[None, :] * W + kk[:, None], mask=hm[None, :],
                                     other=0.0)
                        a = _dot(a, ak, w1, DOT16)
                    a += tl.load(fc1_b + d * HID + hc, mask=hm, other=0.0).to(tl.float32)[None, :]
                    a = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
                    sDj = sD + ((j0 // HC) % 2) * R * HC  # double buffer: one barrier per chunk
                    tl.store(sDj + r[:, None] * HC + hcs[None, :], a)
                    tl.debug_barrier()
                    for k0 in tl.range(0, HC, KC):
                        kk = k0 + tl.arange(0, KC)
                        ak = tl.load(sDj + rr[:, None] * HC + kk[None, :])
                        w2 = tl.load(fc2_w + d * W * HID + cols[None, :] * HID + (j0 + kk)[:, None],
                                     mask=(j0 + kk)[:, None] < HID, other=0.0)
                        mlp = _dot(mlp, ak, w2, DOT16)
                x = x + mlp + tl.load(fc2_b + d * W + cols).to(tl.float32)[None, :]

            # ---- channel c's logits [R, V] in NC-column chunks: final norm, codebook c as the output
            # matrix, mlm bias; staged in F for the sampler
            tl.store(sA + rw_off, _layer_norm(x, nf_w, nf_b, cols, W))
            tl.debug_barrier()
            ncs = tl.arange(0, NC)
            for n0 in tl.range(0, V, NC):
                lg = _mm(tl.zeros([R, NC], dtype=tl.float32), sA, W, cb_ptr + c * V * W + n0 * W, W, W,
                         R, NC, KC, DOT16)
                lg += tl.load(mlm_b + c * V + n0 + ncs).to(tl.float32)[None, :]
                tl.store(sF + r[:, None] * V + (n0 + ncs)[None, :], lg)
                tl.store(logits_ptr + (c * n_rows + g64)[:, None] * V + (n0 + ncs)[None, :], lg,
                         mask=(rmask & (pix_r * 0 + write_logits != 0))[:, None])
            tl.debug_barrier()

            # ---- the sampler (math of _sample_logits_kernel, V = 256, no top-k)
            idx, valid = _sample_pixels(sF + bb[:, None] * V, sF + (BLOCK_B + bb)[:, None] * V, pix, pmask, c, B,
                                        cfg_ptr, cfg_scalar, cfg_rows, inv_temp, filter_threshold, top_p,
                                        do_top_p, draw, u_ptr, e_ptr, seed_lo, seed_hi, offset, GUIDED, V, BLOCK_B)
            idx = tl.where(valid & (dead == 0), idx, -1)
            dead = tl.where(idx < 0, 1, dead)
            tl.store(ids_ptr + p64 * 3 + c, idx.to(tl.int64), mask=pmask)
            vmask_w = pmask & (pix * 0 + write_values != 0)
            val = tl.load(vt_ptr + c * (V + 1) + tl.where(idx < 0, V, idx), mask=vmask_w, other=0.0)
            tl.store(vals_ptr + p64 * 3 + c, val, mask=vmask_w)
            # the next token reads the ids (and every scratch region is rewritten) by other threads
            tl.debug_barrier()

