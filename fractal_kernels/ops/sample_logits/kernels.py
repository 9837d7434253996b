"""Fused pixel sampler: the Triton kernel ``_sample_logits_kernel`` and its inlined helpers, which the pixel head
and attention kernels reuse (``_philox_uniform`` is the one Philox of every op). Numerics:
:mod:`fractal_kernels.ops.sample_logits`. Defined only when triton is installed (``HAS_TRITON``).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

MAX_V = 4096

if HAS_TRITON:

    @triton.jit
    def _sanitize(x):
        # NaN -> -inf (never drawn), +inf -> FLT_MAX (ties with other +inf entries)
        x = tl.where(x != x, float("-inf"), x)
        return tl.where(x == float("inf"), 3.4028234663852886e38, x)

    @triton.jit
    def _philox_uniform(seed_lo, seed_hi, ctr):
        # Philox4x32-10 on uint64 lanes holding 32-bit words; counter = (ctr lo, ctr hi, 0, 0)
        mask32 = 0xFFFFFFFF
        c0 = ctr & mask32
        c1 = (ctr >> 32) & mask32
        c2 = c0 * 0
        c3 = c0 * 0
        k0 = c0 * 0 + seed_lo
        k1 = c0 * 0 + seed_hi
        for _ in tl.static_range(10):
            p0 = c0 * 0xD2511F53
            p1 = c2 * 0xCD9E8D57
            n0 = (p1 >> 32) ^ c1 ^ k0
            n2 = (p0 >> 32) ^ c3 ^ k1
            c1 = p1 & mask32
            c3 = p0 & mask32
            c0 = n0
            c2 = n2
            k0 = (k0 + 0x9E3779B9) & mask32
            k1 = (k1 + 0xBB67AE85) & mask32
        return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _bisect_threshold(p, cmask, target, USE_MASS: tl.constexpr, BLOCK_N: tl.constexpr):
        # Largest t (a value present in p) with  count(p >= t) >= target  (or  mass(p >= t) >= target).
        lo = tl.zeros([BLOCK_N], dtype=tl.int32)
        hi = tl.full([BLOCK_N], 0x3F800001, dtype=tl.int32)  # just above 1.0: nothing qualifies
        # a runtime loop: unrolled, 31 copies of a pass over the whole [BLOCK_N, V] tile were most of the code
        # and the compile time of the kernels that use it (the sampler's top-k + top-p: 32 s on sm_80)
        for _ in tl.range(31):
            mid = lo + (hi - lo) // 2
            t = mid.to(tl.float32, bitcast=True)
            sel = (p >= t[:, None]) & cmask[None, :]
            if USE_MASS:
                score = tl.sum(tl.where(sel, p, 0.0), axis=1)
            else:
                score = tl.sum(tl.where(sel, 1.0, 0.0), axis=1)
            ok = score >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        return lo.to(tl.float32, bitcast=True)

    @triton.jit
    def _inverse_cdf_draw(p, cmask, uni):
        # The contract's draw: p [R, V] final fp32 probabilities, cmask [V] live columns, uni [R] fp64 uniforms
        # -> ids [R] (int32), -1 for a row without mass. q = trunc(p * 2^52) is exact and so are its int64 sums:
        # the scan and the total (= the scan's last element) agree in any order, and t = u * T < T = cdf[-1], so
        # the first index with cdf > t always exists and has q > 0 (never a zero-probability id, no clamp).
        q = tl.where(cmask[None, :], (p * 4503599627370496.0).to(tl.int64), 0)
        cdf = tl.cumsum(q, axis=1)
        total = tl.sum(q, axis=1)
        u = tl.where(uni > 0.0, uni, 0.0)  # NaN, u <= 0 -> 0
        tot = total.to(tl.float64)
        target = tl.where(u < 1.0, u * tot, tot - 1.0)  # u >= 1 acts as the largest double below 1
        idx = tl.sum(tl.where(cdf.to(tl.float64) <= target[:, None], 1, 0), axis=1)
        return tl.where(total > 0, idx, -1)

    @triton.jit
    def _filter_cfg_mix(x, u, w, filter_threshold):
        # [R, V] sanitised cond / uncond logits -> the reference's filter (where the conditional probability
        # is tiny, lift the unconditional logit), then the CFG mix with weight w (scalar or [R, 1])
        cmax = tl.max(x, axis=1)
        e = tl.exp(x - cmax[:, None])
        pc = e / tl.sum(e, axis=1)[:, None]
        umax = tl.max(u, axis=1)
        lifted = tl.maximum(u, x - cmax[:, None] + umax[:, None])
        u = tl.where(pc < filter_threshold, lifted, u)
        return _sanitize(u + w * (x - u))

    @triton.jit
    def _sample_logits_kernel(
        cond_ptr, uncond_ptr, cfg_ptr, u_ptr, ids_ptr, probs_ptr,
        n_rows, V, stride_c, stride_uc, stride_p,
        inv_temp, cfg_scalar, filter_threshold, top_p, top_k,
        seed_lo, seed_hi, offset,
        HAS_UNCOND: tl.constexpr, CFG_PER_ROW: tl.constexpr, HAS_UNIFORMS: tl.constexpr,
        WRITE_PROBS: tl.constexpr, DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr, GREEDY: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        cols = tl.arange(0, BLOCK_V)  # [BV]
        rmask = rows < n_rows
        cmask = cols < V
        m2 = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)

        x = tl.load(cond_ptr + r64[:, None] * stride_c + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        x = _sanitize(x * inv_temp)
        if HAS_UNCOND:
            u = tl.load(uncond_ptr + r64[:, None] * stride_uc + cols[None, :], mask=m2, other=float("-inf"))
            u = _sanitize(u.to(tl.float32) * inv_temp)
            if CFG_PER_ROW:
                w = tl.load(cfg_ptr + rows, mask=rmask, other=1.0).to(tl.float32)[:, None]
            else:
                w = cfg_scalar
            x = _filter_cfg_mix(x, u, w, filter_threshold)

        xmax = tl.max(x, axis=1)
        valid = xmax > float("-inf")
        shift = tl.where(valid, xmax, 0.0)
        e = tl.where(m2, tl.exp(x - shift[:, None]), 0.0)
        p = e / tl.sum(e, axis=1)[:, None]
        p = tl.where(valid[:, None] & m2, p, 0.0)

        if DO_TOP_K:
            t = _bisect_threshold(p, cmask, top_k * 1.0, False, BLOCK_N)
            p = tl.where(p >= t[:, None], p, 0.0)
            p = p / tl.sum(p, axis=1)[:, None]
            p = tl.where(valid[:, None] & m2, p, 0.0)
        if DO_TOP_P:
            t = _bisect_threshold(p, cmask, top_p, True, BLOCK_N)
            p = tl.where(p >= t[:, None], p, 0.0)
            p = p / tl.sum(p, axis=1)[:, None]
            p = tl.where(valid[:, None] & m2, p, 0.0)

        if GREEDY:
            idx = tl.argmax(x, axis=1)
            p = tl.where(cols[None, :] == idx[:, None], 1.0, 0.0)
            p = tl.where(valid[:, None] & m2, p, 0.0)
        else:
            if HAS_UNIFORMS:
                uni = tl.load(u_ptr + rows, mask=rmask, other=0.5).to(tl.float64)
            else:
                uni = _philox_uniform(seed_lo, seed_hi, (r64 + offset).to(tl.uint64)).to(tl.float64)
            idx = _inverse_cdf_draw(p, cmask, uni)
        idx = tl.where(valid, idx, -1)
        tl.store(ids_ptr + rows, idx.to(tl.int64), mask=rmask)
        if WRITE_PROBS:
            tl.store(probs_ptr + r64[:, None] * stride_p + cols[None, :], p, mask=m2)
