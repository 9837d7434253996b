"""Kernel benchmarks of the pixel head: the fused sampler and the fused logits + cross-entropy.

Every row checks its output against the reference computed in the same run before its time counts, and
records the backend that ran (``metrics["ran_on"]``, from ``dispatch.last_backend``): a row whose op ran on
another backend than the one it names fails. Checks and tolerances:

* sampler (same uniforms as the reference): every id has positive reference probability and obeys the
  inverse-CDF contract within ``CDF_TOL`` (``cdf[id - 1] <= u + tol`` and ``cdf[id] >= u - tol``, CDF of the
  reference's fp32 probabilities accumulated in fp64): ids may differ from the reference's only at near-ties
  of a CDF step. Samplers with their own RNG (FlashInfer): support, plus a distribution test (the mean
  probability of the drawn ids against its expectation, ``|z| <= Z_MAX``);
* cross-entropy forward+backward: the loss within ``CE_LOSS_RTOL`` (relative) and dx, dW, db within
  ``CE_GRAD_TOL`` (``max |g - ref| / max(1, max |ref|)``) of the reference's, fp32 inputs.
 Bandwidth is reported against the device's copy bandwidth measured
in the same run; rows that need a GPU (Triton, CUDA, FlashInfer, torch.compile, N >= 10^5) are listed as
skipped on a CPU machine, with analytic byte counts so the targets stay visible.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional

import torch

from .harness import Dispatched, Row, dispatch_failure, failure, summarize, time_fn
from fractal_kernels.dispatch import backend_report
from fractal_kernels.ops.pixel_cross_entropy import CHUNK_ROWS, pixel_cross_entropy
from fractal_kernels.ops.sample_logits import sample_logits
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference
from fractal_kernels.reference.pixel_sampling import inverse_cdf_draw, pixel_probs_reference

V = 256
CDF_TOL = 2e-5  # fp32 probabilities summed in another order: ~V * 2^-24 worst case, 1e-6 typical
Z_MAX = 5.0
CE_LOSS_RTOL = 1e-5
CE_GRAD_TOL = 1e-4
_COPY_BW: dict = {}


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured once per run."""
    if device.type in _COPY_BW:
        return _COPY_BW[device.type]
    n = (256 if device.type == "cuda" else 32) * 2 ** 20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = summarize(time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=10))["median_s"]
    _COPY_BW[device.type] = 2 * n * 4 / t
    return _COPY_BW[device.type]


_MM_PEAK: dict = {}


def matmul_peak(device: torch.device) -> float:
    """Dense matmul throughput in FLOP/s measured once per run: bf16 8192^3 on a GPU (the tensor-core yardstick
    for "% of peak"), fp32 1024^3 on a CPU."""
    if device.type in _MM_PEAK:
        return _MM_PEAK[device.type]
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = summarize(time_fn(lambda: a @ b, device, warmup=2, repeats=5))["median_s"]
    _MM_PEAK[device.type] = 2 * n ** 3 / t
    return _MM_PEAK[device.type]


def _logits(n: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g) * 3).to(dtype).to(device)


def sampler_rows(n: int, guided: bool, device: torch.device, repeats: int, warmup: int) -> List[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cond, uncond = _logits(n, device, dtype, 0), _logits(n, device, dtype, 1)
    both = torch.cat([cond, uncond]) if guided else cond
    u = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    t_ref, cfg, thr = 0.9, (3.0 if guided else 1.0), 1e-4
    elem = cond.element_size()
    bytes_min = (2 if guided else 1) * n * V * elem + n * 8  # read the logits once, write the ids
    shape = dict(N=n, V=V, cfg=cfg, dtype=str(dtype).replace("torch.", ""))
    bw = copy_bandwidth(device)

    def reference():
        probs = pixel_probs_reference(both, temperature=t_ref, cfg=cfg, filter_threshold=thr, guided=guided)
        return inverse_cdf_draw(probs, u)

    expected = reference()
    ref_probs = pixel_probs_reference(both, temperature=t_ref, cfg=cfg, filter_threshold=thr, guided=guided)
    rows: List[Row] = []
    base = summarize(time_fn(reference, device, warmup=warmup, repeats=repeats))
    rows.append(Row("pixel", "sampler", "reference-seq", shape, base,
                    metrics={"GB_per_s": bytes_min / base["median_s"] / 1e9,
                             "pct_copy_bw": 100 * bytes_min / base["median_s"] / bw, "bytes_min": bytes_min},
                    check="baseline"))
    candidates = [("torch", "torch")]
    report = backend_report()
    for b in ("triton", "cuda"):
        if device.type == "cuda" and report[b][0]:
            candidates.append((b, b))
        else:
            rows.append(Row("pixel", "sampler", b, shape, skipped=f"GPU-only: {report[b][1]}",
                            metrics={"bytes_min": bytes_min, "target_s_at_70pct_of_3.0TBps": bytes_min / (0.7 * 3.0e12)}))
    if device.type == "cuda":
        compiled = torch.compile(reference)
        candidates.append(("torch.compile(reference-seq)", compiled))
    else:
        rows.append(Row("pixel", "sampler", "torch.compile(reference-seq)", shape, skipped="GPU-only row"))
    try:
        import flashinfer  # noqa: F401
        has_fi = device.type == "cuda"
    except ImportError:
        has_fi = False
    if not has_fi:
        rows.append(Row("pixel", "sampler", "flashinfer", shape, skipped="flashinfer not importable here"))
    else:
        rows.append(flashinfer_row(both, guided, t_ref, cfg, thr, shape, bytes_min, bw, base, device, repeats, warmup))

    for name, impl in candidates:
        if callable(impl):
            fn = impl
        else:
            def fn(b=impl):
                return sample_logits(cond, uncond if guided else None, cfg=cfg, temperature=1 / t_ref,
                                     filter_threshold=thr, uniforms=u, backend=b)
        with Dispatched(("sample_logits",)) as d:
            got = fn()  # the checked call is the first warm-up
            timing = summarize(time_fn(fn, device, warmup=max(0, warmup - 1), repeats=repeats))
        check = ids_contract_check(got, expected, ref_probs, u)
        if not callable(impl):
            check = dispatch_failure(d, impl, device, required=("sample_logits",)) or check
        rows.append(Row("pixel", "sampler", name, shape, timing,
                        metrics={"GB_per_s": bytes_min / timing["median_s"] / 1e9,
                                 "pct_copy_bw": 100 * bytes_min / timing["median_s"] / bw,
                                 "speedup_vs_reference": base["median_s"] / timing["median_s"],
                                 "ran_on": d.ran},
                        check=check))
    return rows


def ids_contract_check(got: torch.Tensor, expected: torch.Tensor, probs: torch.Tensor, u: torch.Tensor,
                       tol: float = CDF_TOL) -> str:
    """The sampler contract for ids drawn with the reference's uniforms ``u``: each id in range with positive
    probability and ``cdf[id - 1] <= u + tol``, ``cdf[id] >= u - tol`` (the inverse-CDF rule up to ``tol``;
    ``cdf`` of the reference ``probs`` in fp64), so ids differ from ``expected`` only at near-ties of a CDF
    step. Returns the row's check (upper-case on a violation)."""
    got = got.reshape(-1).long()
    n = got.numel()
    if got.shape != expected.shape:
        return failure(f"ids shape {tuple(got.shape)} is not the reference's {tuple(expected.shape)}")
    in_range = (got >= 0) & (got < probs.shape[-1])
    g = got.clamp(0, probs.shape[-1] - 1)[:, None]
    p = probs.double()
    cdf = p.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    hi = cdf.gather(1, g)[:, 0]
    lo = torch.where(g[:, 0] > 0, cdf.gather(1, (g - 1).clamp(min=0))[:, 0], torch.zeros_like(hi))
    uu = u.to(device=p.device, dtype=torch.float64).reshape(-1)
    ok = in_range & (p.gather(1, g)[:, 0] > 0) & (lo <= uu + tol) & (hi >= uu - tol)
    bad = int((~ok).sum())
    agree = float((got == expected).double().mean())
    if bad:
        zero = int((in_range & (p.gather(1, g)[:, 0] <= 0)).sum())
        return failure(f"{bad} of {n} ids break the sampler contract ({zero} with zero probability, "
                       f"{int((~in_range).sum())} out of range); ids agree {agree:.4%}")
    return f"ids agree {agree:.4%}, all within the inverse-CDF contract (tol {tol:.0e}, p > 0)"


def distribution_check(ids: torch.Tensor, probs: torch.Tensor, z_max: float = Z_MAX) -> str:
    """For a sampler with its own RNG: every id in the support, and the mean probability of the drawn ids
    ``mean p_row(id)`` against its expectation ``mean sum_j p_j^2`` (per-row variance ``sum p^3 - (sum p^2)^2``):
    a sampler drawing from the wrong distribution moves it by many standard errors."""
    ids = ids.reshape(-1).long()
    in_range = (ids >= 0) & (ids < probs.shape[-1])
    p = probs.double()
    pid = p.gather(1, ids.clamp(0, p.shape[-1] - 1)[:, None])[:, 0]
    if not bool(in_range.all()) or not bool((pid > 0).all()):
        return failure(f"{int((~in_range | (pid <= 0)).sum())} ids outside the support")
    s2, s3 = (p ** 2).sum(-1), (p ** 3).sum(-1)
    var = (s3 - s2 ** 2).clamp(min=0).sum() / ids.numel() ** 2
    z = float((pid.mean() - s2.mean()) / var.sqrt().clamp(min=1e-30))
    if abs(z) > z_max:
        return failure(f"ids do not follow the reference distribution (z = {z:.1f}, |z| > {z_max})")
    return f"ids in the support; distribution test z = {z:.2f} (|z| <= {z_max})"


def flashinfer_row(both, guided, t_ref, cfg, thr, shape, bytes_min, bw, base, device, repeats, warmup) -> Row:
    """FlashInfer's sampler as a baseline: it samples from probabilities, so the CFG/filter pipeline runs in
    PyTorch first (the same work our kernel fuses). Its RNG is its own, so the check is the support and a
    distribution test against the reference probabilities (:func:`distribution_check`)."""
    import flashinfer
    sampler = getattr(getattr(flashinfer, "sampling", flashinfer), "sampling_from_probs", None)
    if sampler is None:
        return Row("pixel", "sampler", "flashinfer", shape, skipped="flashinfer has no sampling_from_probs")

    def fn():
        probs = pixel_probs_reference(both, temperature=t_ref, cfg=cfg, filter_threshold=thr, guided=guided)
        return sampler(probs.float().contiguous())
    probs = pixel_probs_reference(both, temperature=t_ref, cfg=cfg, filter_threshold=thr, guided=guided)
    ids = fn().long()
    timing = summarize(time_fn(fn, device, warmup=warmup, repeats=repeats))
    return Row("pixel", "sampler", "flashinfer", shape, timing,
               metrics={"GB_per_s": bytes_min / timing["median_s"] / 1e9,
                        "pct_copy_bw": 100 * bytes_min / timing["median_s"] / bw,
                        "speedup_vs_reference": base["median_s"] / timing["median_s"]},
               check=distribution_check(ids, probs))


def cross_entropy_rows(n: int, c: int, device: torch.device, repeats: int, warmup: int) -> List[Row]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).to(device).requires_grad_()
    w = (torch.randn(V, c, generator=g) * 0.1).to(device).requires_grad_()
    b = torch.zeros(V).to(device).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g).to(device)
    shape = dict(N=n, C=c, V=V)
    analytic = {"ref_extra_bytes": 2 * n * V * 4, "fused_extra_bytes": min(n, CHUNK_ROWS) * V * 4}
    rows: List[Row] = []

    def outputs(fn):
        """Loss and gradients of one forward+backward (the values every row is checked on)."""
        x.grad = w.grad = b.grad = None
        loss = fn()
        loss.backward()
        return [loss.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()]

    def step(fn):
        def run():
            x.grad = w.grad = b.grad = None
            fn().backward()
        return run

    def ref():
        return pixel_cross_entropy_reference(x, w, b, t)
    impls = [("reference", None, ref),
             ("torch", "torch", lambda: pixel_cross_entropy(x, w, b, t, backend="torch"))]
    report = backend_report()
    for bk in ("triton", "cuda"):
        if device.type == "cuda" and report[bk][0]:
            impls.append((bk, bk, lambda bk=bk: pixel_cross_entropy(x, w, b, t, backend=bk)))
        else:
            rows.append(Row("pixel", "cross_entropy_fwd_bwd", bk, shape, metrics=analytic,
                            skipped=f"GPU-only: {report[bk][1]}"))
    expected = outputs(ref)
    base = None
    for name, backend, fn in impls:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with Dispatched(("pixel_cross_entropy",)) as d:
            got = outputs(fn)  # the checked call is the first warm-up
            timing = summarize(time_fn(step(fn), device, warmup=max(0, warmup - 1), repeats=repeats))
        metrics = dict(analytic)
        if device.type == "cuda":
            metrics["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        base = base or timing
        metrics["speedup_vs_reference"] = base["median_s"] / timing["median_s"]
        metrics["ran_on"] = d.ran
        loss_err = abs(float(got[0]) - float(expected[0])) / max(1e-30, abs(float(expected[0])))
        grad_err = max(float((g_ - e_).abs().max()) / max(1.0, float(e_.abs().max()))
                       for g_, e_ in zip(got[1:], expected[1:]))
        metrics["loss_rel_err"], metrics["grad_max_err"] = loss_err, grad_err
        if name == "reference":
            check = "baseline"
        elif loss_err <= CE_LOSS_RTOL and grad_err <= CE_GRAD_TOL:
            check = f"loss rel err {loss_err:.1e} <= {CE_LOSS_RTOL:.0e}, grads max err {grad_err:.1e} <= {CE_GRAD_TOL:.0e}"
        else:
            check = failure(f"loss rel err {loss_err:.1e} (tol {CE_LOSS_RTOL:.0e}), grads max err {grad_err:.1e} "
                            f"(tol {CE_GRAD_TOL:.0e}) against the reference")
        if backend is not None:
            check = dispatch_failure(d, backend, device, required=("pixel_cross_entropy",)) or check
        rows.append(Row("pixel", "cross_entropy_fwd_bwd", name, shape, timing, metrics=metrics, check=check))
    return rows


def plan(mode, device: torch.device) -> Iterator[Callable[[], List[Row]]]:
    if mode.name == "smoke":
        sizes, ce_sizes = [1000], [2048]
    elif mode.name == "quick":
        sizes, ce_sizes = [10_000], [16_384]
    else:
        sizes = [10_000, 100_000, 1_000_000] if device.type == "cuda" else [10_000, 100_000]
        ce_sizes = [100_000, 1_000_000] if device.type == "cuda" else [100_000]
    for n in sizes:
        for guided in (False, True):
            yield lambda n=n, g=guided: sampler_rows(n, g, device, mode.repeats, mode.warmup)
    for n in ce_sizes:
        for c in (64, 128):
            yield lambda n=n, c=c: cross_entropy_rows(n, c, device, mode.repeats, mode.warmup)
