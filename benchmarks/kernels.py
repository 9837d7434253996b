"""Kernel benchmarks of the pixel head: the fused sampler and the fused logits + cross-entropy.

Every row checks its output against the reference computed in the same run (same uniforms -> same ids;
losses equal) before its time counts. Bandwidth is reported against the device's copy bandwidth measured
in the same run; rows that need a GPU (Triton, CUDA, FlashInfer, torch.compile, N >= 10^5) are listed as
skipped on a CPU machine, with analytic byte counts so the targets stay visible.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional

import torch

from .harness import Row, summarize, time_fn
from fractal_kernels.dispatch import backend_report
from fractal_kernels.ops.pixel_cross_entropy import CHUNK_ROWS, pixel_cross_entropy
from fractal_kernels.ops.sample_logits import sample_logits
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference
from fractal_kernels.reference.pixel_sampling import inverse_cdf_draw, pixel_probs_reference

V = 256
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
        got = fn()
        agree = float((got == expected).float().mean())
        timing = summarize(time_fn(fn, device, warmup=warmup, repeats=repeats))
        rows.append(Row("pixel", "sampler", name, shape, timing,
                        metrics={"GB_per_s": bytes_min / timing["median_s"] / 1e9,
                                 "pct_copy_bw": 100 * bytes_min / timing["median_s"] / bw,
                                 "speedup_vs_reference": base["median_s"] / timing["median_s"]},
                        check=f"ids agree {agree:.4%}" if agree >= 0.999 else f"IDS DISAGREE {agree:.4%}"))
    return rows


def flashinfer_row(both, guided, t_ref, cfg, thr, shape, bytes_min, bw, base, device, repeats, warmup) -> Row:
    """FlashInfer's sampler as a baseline: it samples from probabilities, so the CFG/filter pipeline runs in
    PyTorch first (the same work our kernel fuses). Its RNG is its own, so the check is that every drawn id
    has non-zero probability under the reference distribution."""
    import flashinfer
    sampler = getattr(getattr(flashinfer, "sampling", flashinfer), "sampling_from_probs", None)
    if sampler is None:
        return Row("pixel", "sampler", "flashinfer", shape, skipped="flashinfer has no sampling_from_probs")

    def fn():
        probs = pixel_probs_reference(both, temperature=t_ref, cfg=cfg, filter_threshold=thr, guided=guided)
        return sampler(probs.float().contiguous())
    probs = pixel_probs_reference(both, temperature=t_ref, cfg=cfg, filter_threshold=thr, guided=guided)
    ids = fn().long()
    valid = bool(((ids >= 0) & (ids < V)).all()) and bool((probs.gather(1, ids.clamp(0, V - 1)[:, None]) > 0).all())
    timing = summarize(time_fn(fn, device, warmup=warmup, repeats=repeats))
    return Row("pixel", "sampler", "flashinfer", shape, timing,
               metrics={"GB_per_s": bytes_min / timing["median_s"] / 1e9,
                        "pct_copy_bw": 100 * bytes_min / timing["median_s"] / bw,
                        "speedup_vs_reference": base["median_s"] / timing["median_s"]},
               check="ids drawn from the support" if valid else "IDS OUTSIDE THE SUPPORT")


def cross_entropy_rows(n: int, c: int, device: torch.device, repeats: int, warmup: int) -> List[Row]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).to(device).requires_grad_()
    w = (torch.randn(V, c, generator=g) * 0.1).to(device).requires_grad_()
    b = torch.zeros(V).to(device).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g).to(device)
    shape = dict(N=n, C=c, V=V)
    analytic = {"ref_extra_bytes": 2 * n * V * 4, "fused_extra_bytes": min(n, CHUNK_ROWS) * V * 4}
    rows: List[Row] = []
    losses = {}

    def step(fn):
        def run():
            x.grad = w.grad = b.grad = None
            loss = fn()
            loss.backward()
            losses[fn] = float(loss)
        return run

    def ref():
        return pixel_cross_entropy_reference(x, w, b, t)
    impls = [("reference", ref)]
    report = backend_report()
    for bk in ("triton", "cuda"):
        if device.type == "cuda" and report[bk][0]:
            impls.append((bk, lambda bk=bk: pixel_cross_entropy(x, w, b, t, backend=bk)))
        else:
            rows.append(Row("pixel", "cross_entropy_fwd_bwd", bk, shape, metrics=analytic,
                            skipped=f"GPU-only: {report[bk][1]}"))
    base = None
    for name, fn in impls:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        timing = summarize(time_fn(step(fn), device, warmup=warmup, repeats=repeats))
        metrics = dict(analytic)
        if device.type == "cuda":
            metrics["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        base = base or timing
        metrics["speedup_vs_reference"] = base["median_s"] / timing["median_s"]
        ok = math.isclose(losses[fn], losses[ref] if ref in losses else losses[fn], rel_tol=1e-5)
        rows.append(Row("pixel", "cross_entropy_fwd_bwd", name, shape, timing, metrics=metrics,
                        check=("baseline" if name == "reference" else ("loss agrees" if ok else "LOSS DISAGREES"))))
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
