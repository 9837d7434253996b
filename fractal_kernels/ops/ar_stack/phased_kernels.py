"""AR decode step spread over the whole GPU: ``_ar_step_phased_kernel``, one step of a level's block stack cut
into phases whose work is split over the grid (the math of :mod:`fractal_kernels.reference.ar_stack`).
Phase 0 is ``INIT``; block ``d`` has phases ``1 + 5 d + i``; the last one is ``FINAL``.

The tile kernel (:mod:`.kernels`) runs a 16-row tile's whole stack in one program: at batch 1 with CFG (2 rows)
one CTA streams every weight of the level. Here:

* ``INIT`` (phase 0): the input rows into the residual stream's scratch;
* ``QKV`` (i = 0): items (row tile, ``BN`` of the 3 D columns): RMSNorm of the rows (recomputed per item), the
  columns of ``n @ wqkv^T``; q and k rotated by RoPE row ``pos`` (each column's pair partner is a second product
  with the partner's weight row, same cache lines), rotated q to the scratch, the key / value into the cache;
* ``ATT`` (1): items (row, head): the query against keys ``0..pos`` (online softmax over ``KB``-key chunks);
* ``WO`` (2): ``X += round(O) @ wo^T`` over ``BN`` columns;
* ``W13`` (3): ``G = silu(n @ w1^T) * (n @ w3^T)`` over ``BN`` of the hidden columns, RMSNorm recomputed;
* ``W2`` (4): ``X += round(G) @ w2^T``;

then ``FINAL`` (phase ``1 + 5 NB``): the final LayerNorm of every row tile into the output. ``BARRIER=False``: the
host launches one phase at a time (the *phased* mode, what the interpreter tests); ``BARRIER=True``: all of them in one launch
with a grid-wide barrier between phases (the *persistent* mode: GPU only, every program resident). Products are
fp32 FMA (``[BR, BN, BK]`` broadcast products summed once at the end), a 16-bit weight's input rounded to its
dtype first (autocast's rounding, as the reference).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    # 16-bit casts through tiny_attention's _cast: the interpreter's fp32 -> bf16 cast truncates, a GPU's rounds
    from fractal_kernels.ops._grid_kernels import _grid_exit, _grid_sync
    from fractal_kernels.ops.tiny_attention.kernels import _cast
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

QKV, ATT, WO, W13, W2, FINAL, INIT = range(7)

if HAS_TRITON:

    @triton.jit
    def _round(a, ROUND: tl.constexpr):
        # a linear's input rounded to its 16-bit weight dtype (1 bf16, 2 fp16); fp32 weights take it as is
        if ROUND == 1:
            a = _cast(a, tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            a = a.to(tl.float16).to(tl.float32)
        return a

    @triton.jit
    def _rstd(x_ptr, ldx, rows, rmask, eps, D: tl.constexpr, DP: tl.constexpr):
        # RMSNorm's 1 / sqrt(mean(x^2) + eps) of fp32 rows (row stride ldx; rows past the batch read 0); DP: D
        # rounded up to a power of two
        cols = tl.arange(0, DP)
        x = tl.load(x_ptr + rows[:, None] * ldx + cols[None, :], mask=rmask[:, None] & (cols < D)[None, :],
                    other=0.0).to(tl.float32)
        return 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)

    @triton.jit
    def _lin(acc, x_ptr, ldx, rows, rmask, K, w_ptr, ncols, rstd, nw_ptr, NORM: tl.constexpr,
             ROUND: tl.constexpr, BK: tl.constexpr):
        # acc [BR, BN, BK] += round(norm?(X[rows, :K])) x W[ncols, :K] elementwise (summed over BK by the caller)
        for k0 in tl.range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            a = tl.load(x_ptr + rows[:, None] * ldx + kk[None, :], mask=rmask[:, None] & km[None, :],
                        other=0.0).to(tl.float32)
            if NORM:
                a = a * rstd[:, None] * tl.load(nw_ptr + kk, mask=km, other=0.0)[None, :]
            a = _round(a, ROUND)
            w = tl.load(w_ptr + ncols[:, None].to(tl.int64) * K + kk[None, :], mask=km[None, :], other=0.0)
            acc += a[:, None, :] * w.to(tl.float32)[None, :, :]
        return acc

    @triton.jit(do_not_specialize=["B", "pos", "depth", "ph_start", "ph_end"])
    def _ar_step_phased_kernel(
        x_ptr, wqkv, wo, w1, w3, w2, an_ptr, fn_ptr, eps_ptr, nw_ptr, nb_ptr, cache_ptr, freqs_ptr, out_ptr,
        ws_ptr, bar_ptr,
        B, pos, depth, T, sxm, norm_eps, scale, ph_start, ph_end,
        D: tl.constexpr, DP: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, HID: tl.constexpr, NRP: tl.constexpr,
        BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, ROUND: tl.constexpr,
        BARRIER: tl.constexpr,
    ):
        # scratch (fp32): X [NRP, D] the residual stream, Q [NRP, D] rotated queries, O [NRP, D] attention
        # output, G [NRP, HID] the SwiGLU hidden. cache [NB, 2, B, T, D] contiguous (keys rotated)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        sX = ws_ptr
        sQ = sX + NRP * D
        sO = sQ + NRP * D
        sG = sO + NRP * D
        n_rt = NRP // BR
        cstep = B * T * D  # cache stride between keys and values
        for ph in range(ph_start, ph_end):
            d = tl.maximum(ph - 1, 0) // 5
            kind = tl.where(ph == 0, 6, tl.where(d >= depth, 5, (ph - 1) % 5))
            blk = d.to(tl.int64)
            if kind == 6:
                # ---- INIT: the input rows into X (padding rows 0)
                for rt in range(pid, n_rt, nprog):
                    rows = rt * BR + tl.arange(0, BR)
                    cols = tl.arange(0, DP)
                    cm = cols < D
                    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxm + cols[None, :],
                                mask=(rows < B)[:, None] & cm[None, :], other=0.0)
                    tl.store(sX + rows[:, None] * D + cols[None, :], x.to(tl.float32), mask=cm[None, :])
            elif kind == 1:
                # ---- ATT: items (row, head), the new query against keys 0..pos
                for it in range(pid, B * H, nprog):
                    row = it // H
                    h = it % H
                    dd = h * HD + tl.arange(0, HD)
                    q = tl.load(sQ + row * D + dd)
                    kbase = cache_ptr + ((blk * 2) * B + row) * T * D + dd[None, :]
                    m_i = tl.max(tl.full([KB], float("-inf"), tl.float32), axis=0)
                    l_i = tl.sum(tl.zeros([KB], dtype=tl.float32), axis=0)
                    acc = tl.zeros([HD], dtype=tl.float32)
                    for j0 in range(0, pos + 1, KB):
                        jj = j0 + tl.arange(0, KB)
                        jm = jj <= pos
                        kj = tl.load(kbase + jj[:, None] * D, mask=jm[:, None], other=0.0).to(tl.float32)
                        vj = tl.load(kbase + cstep + jj[:, None] * D, mask=jm[:, None], other=0.0).to(tl.float32)
                        s = tl.where(jm, tl.sum(kj * q[None, :], axis=1) * scale, float("-inf"))
                        m_new = tl.maximum(m_i, tl.max(s, axis=0))
                        alpha = tl.exp(m_i - m_new)
                        p = tl.exp(s - m_new)
                        l_i = l_i * alpha + tl.sum(p, axis=0)
                        acc = acc * alpha + tl.sum(p[:, None] * vj, axis=0)
                        m_i = m_new
                    tl.store(sO + row * D + dd, acc / l_i)
            elif kind == 5:
                # ---- FINAL: the level's LayerNorm of every row tile into the output (x's dtype)
                for rt in range(pid, n_rt, nprog):
                    rows = rt * BR + tl.arange(0, BR)
                    rmask = rows < B
                    cols = tl.arange(0, DP)
                    cm = cols < D
                    x = tl.load(sX + rows[:, None] * D + cols[None, :], mask=cm[None, :], other=0.0)
                    mean = tl.sum(x, axis=1) / D
                    xc = tl.where(cm[None, :], x - mean[:, None], 0.0)
                    var = tl.sum(xc * xc, axis=1) / D
                    y = xc / tl.sqrt(var + norm_eps)[:, None] * tl.load(nw_ptr + cols, mask=cm, other=0.0)[None, :] \
                        + tl.load(nb_ptr + cols, mask=cm, other=0.0)[None, :]
                    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                             _cast(y, out_ptr.dtype.element_ty), mask=rmask[:, None] & cm[None, :])
            else:
                # ---- the column-split phases: items (row tile, BN output columns)
                n_out = tl.where(kind == 0, 3 * D, tl.where(kind == 3, HID, D))
                n_ct = n_out // BN
                for it in range(pid, n_rt * n_ct, nprog):
                    rows = (it // n_ct) * BR + tl.arange(0, BR)
                    rmask = rows < B
                    ncols = (it % n_ct) * BN + tl.arange(0, BN)
                    acc = tl.zeros([BR, BN, BK], dtype=tl.float32)
                    if kind == 0:  # QKV + RoPE + the cache write
                        rstd = _rstd(sX, D, rows, rmask, tl.load(eps_ptr + 2 * d), D, DP)
                        acc = _lin(acc, sX, D, rows, rmask, D, wqkv + blk * 3 * D * D, ncols, rstd,
                                   an_ptr + d * D, True, ROUND, BK)
                        y = tl.sum(acc, axis=2)
                        # the pair partner (2i <-> 2i+1 of a head) of q / k columns: cos / sin of pair i
                        par = tl.zeros([BR, BN, BK], dtype=tl.float32)
                        par = _lin(par, sX, D, rows, rmask, D, wqkv + blk * 3 * D * D, ncols ^ 1, rstd,
                                   an_ptr + d * D, True, ROUND, BK)
                        yp = tl.sum(par, axis=2)
                        fi = (ncols % HD) // 2
                        cs = tl.load(freqs_ptr + pos * HD + 2 * fi)
                        sn = tl.load(freqs_ptr + pos * HD + 2 * fi + 1)
                        rot = y * cs[None, :] + tl.where(ncols % 2 == 0, -yp, yp) * sn[None, :]
                        y = tl.where((ncols < 2 * D)[None, :], rot, y)
                        part = ncols // D  # 0 q, 1 k, 2 v
                        cc = ncols % D
                        tl.store(sQ + rows[:, None] * D + cc[None, :], y, mask=(part == 0)[None, :])
                        cptr = cache_ptr + ((blk * 2 + (part - 1).to(tl.int64)) * B + rows[:, None]) * T * D \
                            + pos * D + cc[None, :]
                        tl.store(cptr, _cast(y, cache_ptr.dtype.element_ty),
                                 mask=rmask[:, None] & (part > 0)[None, :])
                    elif kind == 2:  # WO: X += round(O) @ wo^T
                        acc = _lin(acc, sO, D, rows, rmask, D, wo + blk * D * D, ncols, 1.0, an_ptr, False, ROUND,
                                   BK)
                        xo = sX + rows[:, None] * D + ncols[None, :]
                        tl.store(xo, tl.load(xo) + tl.sum(acc, axis=2))
                    elif kind == 3:  # W13: G = silu(n @ w1^T) * (n @ w3^T)
                        rstd = _rstd(sX, D, rows, rmask, tl.load(eps_ptr + 2 * d + 1), D, DP)
                        acc = _lin(acc, sX, D, rows, rmask, D, w1 + blk * HID * D, ncols, rstd, fn_ptr + d * D,
                                   True, ROUND, BK)
                        gacc = tl.zeros([BR, BN, BK], dtype=tl.float32)
                        gacc = _lin(gacc, sX, D, rows, rmask, D, w3 + blk * HID * D, ncols, rstd, fn_ptr + d * D,
                                    True, ROUND, BK)
                        y1 = tl.sum(acc, axis=2)
                        tl.store(sG + rows[:, None] * HID + ncols[None, :],
                                 y1 * tl.sigmoid(y1) * tl.sum(gacc, axis=2))
                    else:  # W2: X += round(G) @ w2^T
                        acc = _lin(acc, sG, HID, rows, rmask, HID, w2 + blk * D * HID, ncols, 1.0, an_ptr, False,
                                   ROUND, BK)
                        xo = sX + rows[:, None] * D + ncols[None, :]
                        tl.store(xo, tl.load(xo) + tl.sum(acc, axis=2))
            if BARRIER:  # between phases, not after the last one
                if ph + 1 < ph_end:
                    _grid_sync(bar_ptr, (ph - ph_start + 1) * nprog, BARRIER)
        _grid_exit(bar_ptr, nprog, BARRIER)
