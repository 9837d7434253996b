"""Fused pixel head, spread over the whole GPU: ``_pixel_head_phased_kernel``, the pixel loop cut into phases.

The tile kernel (:mod:`.kernels`) runs every pixel's whole 3-channel loop in one program: at batch 1 that is one
CTA of 132 for ~45 dependent steps. Here each of those steps is a *phase* whose work is split over the grid:

* ``EMB`` (channel 0 only): ``T = cond @ cond_w^T + cond_b``, items = (row tile, ``BN`` output columns);
* per block ``d``: ``QKV`` (items = (row tile, head): LayerNorm(s) recomputed from the rows, q / k / v of the head,
  attention over the cached tokens, ``O``), ``PROJ`` (``X += O @ proj^T``), ``FC1`` (``Hh = gelu(LN2(X) @ fc1^T)``),
  ``FC2`` (``X += Hh @ fc2^T``), each over (row tile, ``BN`` columns);
* ``LOGITS``: ``F = LN_f(X) @ codebook_c^T + mlm_bias_c`` over (row tile, ``BN`` of the 256 columns);
* ``SAMPLE``: items = ``BP``-pixel tiles: the draw of :func:`.kernels._sample_pixels`, the ids, and the next
  token's codebook row into ``T``.

Phase ``0`` is ``EMB``, then channel ``c`` has phases ``1 + c * (4 depth + 2) ...``. Two modes, same code:
``BARRIER=False`` runs ``[ph_start, ph_end)`` and ends (the host launches one phase at a time: the *phased* mode,
what the interpreter tests); ``BARRIER=True`` runs every phase in one launch with a grid-wide barrier between
phases (the *persistent* mode: GPU only, the grid must be co-resident). The state between phases lives in an fp32
scratch in global memory (L2-resident at these sizes). Dots are fp32 FMA: broadcast products summed over K where
a tile is too small for a dot (``DOT=0``: 2 rows x 2 columns at batch 1, so the column split gives the phases up
to a few hundred programs), from 16 x 16 tiles up the tile kernel's ``_dot`` (``DOT=1``: an "ieee" dot for fp32
weights, three tensor-core dots of a split fp32 operand for 16-bit ones; 2 the interpreter's emulation; ``DOTQ``
the same for the QKV phase's head-wide tiles).
All math fp32, weights of any float dtype upcast on load (as the tile kernel; another summation order).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from fractal_kernels.ops._grid_kernels import _grid_exit, _grid_sync
    from fractal_kernels.ops.pixel_head.kernels import _dot, _sample_pixels
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

# phase kinds (the host's item counts use the same numbers: phased.phase_kind)
EMB, QKV, PROJ, FC1, FC2, LOGITS, SAMPLE = range(7)

if HAS_TRITON:

    @triton.jit
    def _stats(x, W: tl.constexpr):
        # LayerNorm statistics of an [R, W] tile (eps 1e-6, the pixel head's): mean, sqrt(var + eps)
        mean = tl.sum(x, axis=1) / W
        xc = x - mean[:, None]
        return mean, tl.sqrt_rn(tl.sum(xc * xc, axis=1) / W + 1e-6)

    @triton.jit
    def _norm(x, mean, sd, w_ptr, b_ptr, kk):
        # the tile kernel's _layer_norm on a K chunk of a W-wide row: (x - mean) / sd * w + b (the chunks of a
        # normalised operand divide W, powers of two both: no mask)
        w = tl.load(w_ptr + kk).to(tl.float32)
        b = tl.load(b_ptr + kk).to(tl.float32)
        return (x - mean[:, None]) / sd[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _chunk(x_ptr, ldx, rows, k0, K, m0, s0, w0, b0, m1, s1, w1, b1, NORM: tl.constexpr, KC: tl.constexpr):
        # the [R, KC] operand chunk at column k0 of fp32 rows (row stride ldx): raw (NORM 0), one LayerNorm
        # (NORM 1: m0 / s0 / w0 / b0) or two in a row (NORM 2: the embedding norm, then the block's norm1)
        kk = k0 + tl.arange(0, KC)
        km = kk < K
        a = tl.load(x_ptr + rows[:, None] * ldx + kk[None, :], mask=km[None, :], other=0.0).to(tl.float32)
        if NORM >= 1:
            a = _norm(a, m0, s0, w0, b0, kk)
        if NORM == 2:
            a = _norm(a, m1, s1, w1, b1, kk)
        return a, kk, km

    @triton.jit
    def _wtile(w_ptr, ldw, ncols, nmask, kk, km, MASKN: tl.constexpr):
        # [KC, N] tile of a row-major [out, in] weight (an nn.Linear's) in its own dtype: rows ncols, columns kk;
        # MASKN: the output columns may end inside the tile (only the MLP's width: W and 256 are multiples of BN)
        ptrs = w_ptr + ncols[None, :].to(tl.int64) * ldw + kk[:, None]
        if MASKN:
            return tl.load(ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
        return tl.load(ptrs, mask=km[:, None], other=0.0)

    @triton.jit
    def _fma(acc, a, w, DOT: tl.constexpr):
        # acc [R, N] += a [R, KC] (fp32) @ w [KC, N] with fp32 accuracy. DOT 1 / 2 (R, N >= 16): the tile kernel's
        # _dot (fp32 w: an "ieee" FMA dot; 16-bit w: a split into three 16-bit terms on the tensor cores, 2 its
        # interpreter emulation); DOT 0 (a 2-row tile: no dot shape): broadcast products summed over K
        if DOT != 0:
            return _dot(acc, a, w, DOT)
        return acc + tl.sum(a[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)

    @triton.jit
    def _mm(acc, x_ptr, ldx, rows, K, w_ptr, ldw, ncols, nmask, m0, s0, w0, b0, NORM: tl.constexpr,
            KC: tl.constexpr, DOT: tl.constexpr, MASKN: tl.constexpr):
        # acc [R, N] += norm(X[rows, :K]) @ Wm[ncols, :K]^T, K in KC chunks (a runtime loop)
        for k0 in tl.range(0, K, KC):
            a, kk, km = _chunk(x_ptr, ldx, rows, k0, K, m0, s0, w0, b0, m0, s0, w0, b0, NORM, KC)
            acc = _fma(acc, a, _wtile(w_ptr, ldw, ncols, nmask, kk, km, MASKN), DOT)
        return acc

    @triton.jit
    def _qkv(qa, ka, va, a, wq, W: tl.constexpr, dh, kk, km, DOTQ: tl.constexpr):
        # one K chunk of a head's q, k, v (rows dh of the three W x W blocks of qkv_w)
        qa = _fma(qa, a, _wtile(wq, W, dh, dh, kk, km, False), DOTQ)
        ka = _fma(ka, a, _wtile(wq + W * W, W, dh, dh, kk, km, False), DOTQ)
        va = _fma(va, a, _wtile(wq + 2 * W * W, W, dh, dh, kk, km, False), DOTQ)
        return qa, ka, va

    @triton.jit(do_not_specialize=["B", "C", "n_rows", "depth", "ph_start", "ph_end", "seed_lo", "seed_hi",
                                   "offset", "cfg_rows", "draw", "do_top_p", "write_logits", "write_values"])
    def _pixel_head_phased_kernel(
        cond_ptr, cond_w, cond_b, cb_ptr, mlm_b, ln_w, ln_b,
        n1_w, n1_b, qkv_w, qkv_b, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, nf_w, nf_b,
        cfg_ptr, u_ptr, e_ptr, ids_ptr, ws_ptr, logits_ptr, vt_ptr, vals_ptr, bar_ptr,
        B, C, n_rows, stride_cond, depth, ph_start, ph_end,
        scale, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
        cfg_rows, draw, do_top_p, write_logits, write_values,
        GUIDED: tl.constexpr, W: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, HID: tl.constexpr,
        NRP: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, KCQ: tl.constexpr,
        BP: tl.constexpr, V: tl.constexpr, DOT: tl.constexpr, DOTQ: tl.constexpr, BARRIER: tl.constexpr,
    ):
        # Runtime switches as _pixel_head_kernel's. NRP: rows of the scratch (n_rows rounded up to BR), a
        # constexpr so every scratch offset below is a compile-time multiple.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, W)
        n_rt = NRP // BR
        # the scratch (fp32): T [NRP, W] token, X [NRP, W] residual stream, O [NRP, W] attention output,
        # Hh [NRP, HID] MLP hidden, F [NRP, V] logits, KV [depth, 2 tokens, 2 (k, v), NRP, W]
        sT = ws_ptr
        sX = sT + NRP * W
        sO = sX + NRP * W
        sH = sO + NRP * W
        sF = sH + NRP * HID
        sKV = sF + NRP * V
        per_c = 4 * depth + 2
        for ph in range(ph_start, ph_end):
            q = tl.maximum(ph - 1, 0)
            c = q // per_c
            r = q % per_c
            d = r // 4
            kind = tl.where(ph == 0, 0, tl.where(r < 4 * depth, 1 + r % 4, tl.where(r == 4 * depth, 5, 6)))
            if kind == 1:
                # ---- QKV(d) + attention: items (row tile, head)
                for it in range(pid, n_rt * H, nprog):
                    rows = (it // H) * BR + tl.arange(0, BR)
                    h = it % H
                    dh = h * DH + tl.arange(0, DH)
                    wq = qkv_w + d * 3 * W * W
                    qa = tl.zeros([BR, DH], dtype=tl.float32)
                    ka = tl.zeros([BR, DH], dtype=tl.float32)
                    va = tl.zeros([BR, DH], dtype=tl.float32)
                    if d == 0:  # x = LN(T), the residual stream's first value; this head's columns of it
                        t = tl.load(sT + rows[:, None] * W + cols[None, :])
                        m0, s0 = _stats(t, W)
                        x = (t - m0[:, None]) / s0[:, None] * tl.load(ln_w + cols).to(tl.float32)[None, :] \
                            + tl.load(ln_b + cols).to(tl.float32)[None, :]
                        tl.store(sX + rows[:, None] * W + cols[None, :], x, mask=(cols // DH == h)[None, :])
                        m1, s1 = _stats(x, W)
                        for k0 in tl.range(0, W, KCQ):
                            a, kk, km = _chunk(sT, W, rows, k0, W, m0, s0, ln_w, ln_b, m1, s1, n1_w, n1_b, 2, KCQ)
                            qa, ka, va = _qkv(qa, ka, va, a, wq, W, dh, kk, km, DOTQ)
                    else:
                        m1, s1 = _stats(tl.load(sX + rows[:, None] * W + cols[None, :]), W)
                        for k0 in tl.range(0, W, KCQ):
                            a, kk, km = _chunk(sX, W, rows, k0, W, m1, s1, n1_w + d * W, n1_b + d * W,
                                               m1, s1, n1_w, n1_b, 1, KCQ)
                            qa, ka, va = _qkv(qa, ka, va, a, wq, W, dh, kk, km, DOTQ)
                    bq = qkv_b + d * 3 * W
                    qa += tl.load(bq + dh).to(tl.float32)[None, :]
                    ka += tl.load(bq + W + dh).to(tl.float32)[None, :]
                    va += tl.load(bq + 2 * W + dh).to(tl.float32)[None, :]
                    # online softmax over keys c (own), then 0 .. c-1 (cached), as the tile kernel
                    kv = sKV + (d * 4 * NRP + rows)[:, None] * W + dh[None, :]  # + (2 token + kv) * NRP * W
                    if c < 2:  # token 2 (G) is the last one any channel reads
                        tl.store(kv + (2 * c) * NRP * W, ka)
                        tl.store(kv + (2 * c + 1) * NRP * W, va)
                    m_i = tl.sum(qa * ka, axis=1) * scale
                    l_i = tl.full([BR], 1.0, dtype=tl.float32)
                    acc = va
                    for j in range(c):
                        kj = tl.load(kv + (2 * j) * NRP * W)
                        vj = tl.load(kv + (2 * j + 1) * NRP * W)
                        s = tl.sum(qa * kj, axis=1) * scale
                        m_new = tl.maximum(m_i, s)
                        alpha = tl.exp(m_i - m_new)
                        p = tl.exp(s - m_new)
                        l_i = l_i * alpha + p
                        acc = acc * alpha[:, None] + p[:, None] * vj
                        m_i = m_new
                    tl.store(sO + rows[:, None] * W + dh[None, :], acc / l_i[:, None])
            elif kind == 6:
                # ---- SAMPLE: items BP-pixel tiles; ids, values, the next token's codebook row into T
                for it in range(pid, tl.cdiv(B, BP), nprog):
                    pix = it * BP + tl.arange(0, BP)
                    pmask = pix < B
                    p64 = pix.to(tl.int64)
                    idx, valid = _sample_pixels(sF + p64[:, None] * V, sF + (B + p64)[:, None] * V, pix, pmask,
                                                c, B, cfg_ptr, cfg_scalar, cfg_rows, inv_temp, filter_threshold,
                                                top_p, do_top_p, draw, u_ptr, e_ptr, seed_lo, seed_hi, offset,
                                                GUIDED, V, BP)
                    # a pixel whose earlier channel had no finite logit stays -1
                    prev = tl.load(ids_ptr + p64 * 3 + (c - 1), mask=pmask & (pix * 0 + c > 0), other=0)
                    idx = tl.where(valid & (prev >= 0), idx, -1)
                    tl.store(ids_ptr + p64 * 3 + c, idx.to(tl.int64), mask=pmask)
                    vmask_w = pmask & (pix * 0 + write_values != 0)
                    val = tl.load(vt_ptr + c * (V + 1) + tl.where(idx < 0, V, idx), mask=vmask_w, other=0.0)
                    tl.store(vals_ptr + p64 * 3 + c, val, mask=vmask_w)
                    if c < 2:  # the next token: codebook c's row of the id (a dead pixel's -1 embeds id 0)
                        emb = tl.load(cb_ptr + c * V * W + tl.maximum(idx, 0)[:, None] * W + cols[None, :])
                        tl.store(sT + p64[:, None] * W + cols[None, :], emb, mask=pmask[:, None])
                        if GUIDED:
                            tl.store(sT + (B + p64)[:, None] * W + cols[None, :], emb, mask=pmask[:, None])
            else:
                # ---- the column-split phases: items (row tile, BN output columns)
                n_out = tl.where(kind == 3, HID, tl.where(kind == 5, V, W))
                n_ct = tl.cdiv(n_out, BN)
                for it in range(pid, n_rt * n_ct, nprog):
                    rows = (it // n_ct) * BR + tl.arange(0, BR)
                    ncols = (it % n_ct) * BN + tl.arange(0, BN)
                    out_off = rows[:, None] * W + ncols[None, :]
                    acc = tl.zeros([BR, BN], dtype=tl.float32)
                    # only the MLP's width (any int) can end inside an item: W and 256 are multiples of BN
                    if kind == 0:  # EMB: the condition's projection (cond rows past n_rows read row 0)
                        crow = tl.where(rows < n_rows, rows, 0).to(tl.int64)
                        for k0 in tl.range(0, C, KC):
                            kk = k0 + tl.arange(0, KC)
                            km = kk < C
                            a = tl.load(cond_ptr + crow[:, None] * stride_cond + kk[None, :], mask=km[None, :],
                                        other=0.0).to(tl.float32)
                            acc = _fma(acc, a, _wtile(cond_w, C, ncols, ncols, kk, km, False), DOT)
                        acc += tl.load(cond_b + ncols).to(tl.float32)[None, :]
                        tl.store(sT + out_off, acc)
                    elif kind == 2:  # PROJ: X += O @ proj^T + b
                        acc = _mm(acc, sO, W, rows, W, proj_w + d * W * W, W, ncols, ncols, 0.0, 1.0, n1_w, n1_b, 0,
                                  KC, DOT, False)
                        acc += tl.load(proj_b + d * W + ncols).to(tl.float32)[None, :]
                        tl.store(sX + out_off, tl.load(sX + out_off) + acc)
                    elif kind == 3:  # FC1: Hh = gelu(LN2(X) @ fc1^T + b1)
                        nm = ncols < HID
                        m, s = _stats(tl.load(sX + rows[:, None] * W + cols[None, :]), W)
                        acc = _mm(acc, sX, W, rows, W, fc1_w + d * HID * W, W, ncols, nm, m, s, n2_w + d * W,
                                  n2_b + d * W, 1, KC, DOT, True)
                        acc += tl.load(fc1_b + d * HID + ncols, mask=nm, other=0.0).to(tl.float32)[None, :]
                        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
                        tl.store(sH + rows[:, None] * HID + ncols[None, :], acc, mask=nm[None, :])
                    elif kind == 4:  # FC2: X += Hh @ fc2^T + b2
                        acc = _mm(acc, sH, HID, rows, HID, fc2_w + d * W * HID, HID, ncols, ncols, 0.0, 1.0, n1_w,
                                  n1_b, 0, KC, DOT, False)
                        acc += tl.load(fc2_b + d * W + ncols).to(tl.float32)[None, :]
                        tl.store(sX + out_off, tl.load(sX + out_off) + acc)
                    else:  # LOGITS: F = LN_f(X) @ codebook_c^T + mlm_bias_c
                        m, s = _stats(tl.load(sX + rows[:, None] * W + cols[None, :]), W)
                        acc = _mm(acc, sX, W, rows, W, cb_ptr + c * V * W, W, ncols, ncols, m, s, nf_w, nf_b, 1, KC,
                                  DOT, False)
                        acc += tl.load(mlm_b + c * V + ncols).to(tl.float32)[None, :]
                        tl.store(sF + rows[:, None] * V + ncols[None, :], acc)
                        lmask = (rows < n_rows) & (rows * 0 + write_logits != 0)
                        tl.store(logits_ptr + (c * n_rows + rows.to(tl.int64))[:, None] * V + ncols[None, :], acc,
                                 mask=lmask[:, None])
            if BARRIER:  # between phases, not after the last one
                if ph + 1 < ph_end:
                    _grid_sync(bar_ptr, (ph - ph_start + 1) * nprog, BARRIER)
        _grid_exit(bar_ptr, nprog, BARRIER)
