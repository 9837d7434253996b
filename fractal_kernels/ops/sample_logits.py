"""Fused pixel sampler: temperature, the reference's low-probability filter, CFG, top-k, top-p, softmax and
the draw in one pass over each row (``[N, V]`` logits, V = 256 for pixels; any V up to 4096).

Layers: the Triton kernel, its launcher, and :func:`sample_logits`, the public op that validates inputs and
dispatches (CUDA -> Triton -> PyTorch, see ``fractal_kernels.dispatch``). The math is
``fractal_kernels.reference.pixel_sampling.sample_logits_reference``; randomness is Philox4x32-10 keyed by
``(seed, offset + row)`` (``fractal_kernels.reference.philox``), identical on every backend.

Numerics: the sampler contract of ``fractal_kernels.reference.pixel_sampling`` (its module docstring). fp32
everywhere (inputs of any float dtype are upcast on load); truncation thresholds are found by a 31-step
bisection on the fp32 bit patterns of the probabilities, so no sort is needed and the result is the exact k-th
value / nucleus boundary; the draw is the contract's exact fixed-point CDF (``_inverse_cdf_draw``, shared with
the pixel head).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fractal_kernels.dispatch import resolve, shape_class
from fractal_kernels.reference.philox import philox_uniform
from fractal_kernels.reference.pixel_sampling import sample_logits_reference

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


def _launch_triton(cond, uncond, cfg_t, cfg_scalar, inv_temp, filter_threshold, top_p, top_k, uniforms, seed,
                   offset, greedy, ids, probs) -> None:
    n, v = cond.shape
    block_v = max(16, triton.next_power_of_2(v))
    if cond.device.type == "cuda":
        block_n = max(1, 2048 // block_v)  # 8 rows of 256 per program: one row per warp-ish, registers stay small
    else:
        block_n = max(1, 131072 // block_v)  # the interpreter pays per program: use big blocks
    grid = (triton.cdiv(n, block_n),)
    dummy = cond
    _sample_logits_kernel[grid](
        cond, uncond if uncond is not None else dummy, cfg_t if cfg_t is not None else dummy,
        uniforms if uniforms is not None else dummy, ids, probs if probs is not None else dummy,
        n, v, cond.stride(0), uncond.stride(0) if uncond is not None else 0, probs.stride(0) if probs is not None else 0,
        inv_temp, cfg_scalar, filter_threshold, top_p, float(top_k),
        seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset,
        HAS_UNCOND=uncond is not None, CFG_PER_ROW=cfg_t is not None, HAS_UNIFORMS=uniforms is not None,
        WRITE_PROBS=probs is not None, DO_TOP_K=0 < top_k < v, DO_TOP_P=top_p < 1.0, GREEDY=greedy,
        BLOCK_N=block_n, BLOCK_V=block_v,
    )


def _check(cond_logits, uncond_logits, cfg, temperature, filter_threshold, top_p, top_k, uniforms, out_probs):
    if not isinstance(cond_logits, torch.Tensor) or cond_logits.dim() != 2:
        raise ValueError(f"cond_logits: expected a [N, V] tensor, got "
                         f"{tuple(cond_logits.shape) if isinstance(cond_logits, torch.Tensor) else type(cond_logits).__name__}")
    if not cond_logits.is_floating_point():
        raise TypeError(f"cond_logits: expected a floating-point tensor, got {cond_logits.dtype}")
    n, v = cond_logits.shape
    if v < 1 or v > MAX_V:
        raise ValueError(f"cond_logits: vocabulary width V={v} outside the supported 1..{MAX_V}")
    if cond_logits.stride(1) != 1:
        raise ValueError("cond_logits: the last dimension must be contiguous (stride 1); rows may have any stride")
    if uncond_logits is not None:
        if not isinstance(uncond_logits, torch.Tensor) or tuple(uncond_logits.shape) != (n, v):
            raise ValueError(f"uncond_logits: expected shape {(n, v)} like cond_logits, got "
                             f"{tuple(uncond_logits.shape) if isinstance(uncond_logits, torch.Tensor) else uncond_logits}")
        if uncond_logits.dtype != cond_logits.dtype:
            raise TypeError(f"uncond_logits: dtype {uncond_logits.dtype} differs from cond_logits' {cond_logits.dtype}")
        if uncond_logits.device != cond_logits.device:
            raise ValueError(f"uncond_logits: on {uncond_logits.device}, cond_logits on {cond_logits.device}")
        if uncond_logits.stride(1) != 1:
            raise ValueError("uncond_logits: the last dimension must be contiguous (stride 1)")
    if isinstance(cfg, torch.Tensor):
        if cfg.numel() not in (1, n):
            raise ValueError(f"cfg: expected a scalar or {n} per-row values, got shape {tuple(cfg.shape)}")
        if cfg.device != cond_logits.device:
            raise ValueError(f"cfg: on {cfg.device}, logits on {cond_logits.device}")
    elif not math.isfinite(float(cfg)):
        raise ValueError(f"cfg: expected a finite number, got {cfg!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (0.0 <= filter_threshold <= 1.0):
        raise ValueError(f"filter_threshold: expected a probability in [0, 1], got {filter_threshold!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {top_k!r}")
    if uniforms is not None:
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (n,) or not uniforms.is_floating_point():
            raise ValueError(f"uniforms: expected a float tensor of shape ({n},), got "
                             f"{tuple(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__}")
        if uniforms.device != cond_logits.device:
            raise ValueError(f"uniforms: on {uniforms.device}, logits on {cond_logits.device}")
    if out_probs is not None:
        if (not isinstance(out_probs, torch.Tensor) or tuple(out_probs.shape) != (n, v) or out_probs.dtype != torch.float32
                or out_probs.stride(1) != 1 or out_probs.device != cond_logits.device):
            raise ValueError(f"out_probs: expected a float32 [{n}, {v}] tensor on {cond_logits.device} with a contiguous last dimension")


def sample_logits(
    cond_logits: torch.Tensor,
    uncond_logits: Optional[torch.Tensor] = None,
    *,
    cfg: Union[float, torch.Tensor] = 1.0,
    temperature: float = 1.0,
    filter_threshold: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
    out_probs: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Draw one index per row from CFG-mixed, filtered, truncated logits; returns int64 ``[N]``.

    ``cond_logits``/``uncond_logits`` ``[N, V]`` (any float dtype; rows may be strided). The pipeline:
    ``logits / temperature`` (computed as ``logits * (1 / temperature)``; ``temperature = 0`` is greedy:
    no scaling, argmax), the reference's filter (unconditional logit lifted to
    ``max(uncond, cond - max(cond) + max(uncond))`` where the conditional probability is below
    ``filter_threshold``), CFG ``uncond + cfg * (cond - uncond)`` with a scalar or per-row ``cfg`` (no
    ``uncond_logits``, or ``cfg == 1``, skips it), softmax, top-k (``0`` = off; ``>= V`` = off), top-p (ties
    kept together; the argmax always survives), then the inverse-CDF draw: the first index whose cumulative
    probability exceeds ``u * total``, never a zero-probability index (the exact contract:
    ``fractal_kernels.reference.pixel_sampling``).

    Randomness: ``uniforms`` ``[N]`` if given, else Philox ``(seed, offset + row)``; ``seed=None`` draws a
    seed from ``generator`` (or the global torch RNG). NaN logits are never drawn, ``+inf`` logits share the
    mass; a row with no finite logit returns ``-1``. ``out_probs`` (float32 ``[N, V]``) receives the final
    probabilities. ``backend``: ``None``/"auto", "torch", "triton", "cuda" (see ``fractal_kernels.dispatch``).

    Note: the FractalGen reference *multiplies* logits by its temperature; pass ``1 / t`` to match it.
    """
    _check(cond_logits, uncond_logits, cfg, temperature, filter_threshold, top_p, top_k, uniforms, out_probs)
    n, v = cond_logits.shape
    device = cond_logits.device
    which = resolve("sample_logits", backend, device, dtype=cond_logits.dtype, shape_class=shape_class(V=v))
    ids = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return ids
    greedy = temperature == 0
    inv_temp = 1.0 if greedy else 1.0 / float(temperature)
    if isinstance(cfg, torch.Tensor) and cfg.numel() == 1:
        cfg = float(cfg)
    if uncond_logits is not None and not isinstance(cfg, torch.Tensor) and float(cfg) == 1.0:
        uncond_logits = None  # cfg = 1 is the conditional distribution: skip the unconditional half
    if uniforms is None and not greedy and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    seed = int(seed or 0)

    if which == "torch":
        u = uniforms if uniforms is not None else (None if greedy else philox_uniform(seed, offset, n, device))
        out, probs = sample_logits_reference(cond_logits, uncond_logits, cfg=cfg, inv_temperature=inv_temp,
                                             filter_threshold=filter_threshold, top_p=top_p, top_k=top_k,
                                             uniforms=u, greedy=greedy)
        if out_probs is not None:
            out_probs.copy_(probs)
        return out
    cfg_t = cfg.reshape(-1).float().contiguous() if isinstance(cfg, torch.Tensor) else None
    cfg_scalar = 1.0 if cfg_t is not None else float(cfg)
    uni = uniforms.contiguous() if uniforms is not None else None
    if which == "triton":
        _launch_triton(cond_logits, uncond_logits, cfg_t, cfg_scalar, inv_temp, float(filter_threshold), float(top_p),
                       int(top_k), uni, seed, int(offset), greedy, ids, out_probs)
    else:
        from fractal_kernels.dispatch import _cuda_ext
        _cuda_ext().sample_logits(cond_logits, uncond_logits, cfg_t, uni, ids, out_probs, inv_temp, cfg_scalar,
                                  float(filter_threshold), float(top_p), int(top_k), seed, int(offset), greedy)
    return ids
