"""End-to-end model benchmarks: ``generate`` images/s, training-step time and NLL throughput.

Every row runs the faithful ``backend="torch"`` models; kernel backends add rows beside them as they
land. Each row also verifies its output (seeded reruns identical, losses finite; fast rows against the
faithful images) so a broken path cannot post a number, and records which backend each ``fractal_kernels``
op ran on (``metrics["ran_on"]``): an op on another backend than the row names, a fast row whose fused pixel
head did not run, or a fallback warning (the fused head's ``auto`` path warns and switches to PyTorch) fails
the row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch

from .harness import Dispatched, Row, dispatch_failure, summarize, time_fn
from fractal_kernels.dispatch import backend_report
from fractal_models import build_model, generate
from fractal_models.engine.paths import level_paths
from fractal_models.sampling import default_num_iter_list, normalize_uint8

TINY = ("tiny_mar", "tiny_ar", "tiny_mar_gp")


@dataclass
class Mode:
    name: str
    batch: int
    repeats: int
    warmup: int
    full_iters: bool  # reference iteration counts (else 2 per level, for smoke runs)
    big: bool  # include the published configs (GPU only)
    crossover_path: Optional[str] = None  # where the measured attention crossover goes (None: the committed file)


MODES = {
    "smoke": Mode("smoke", batch=2, repeats=1, warmup=0, full_iters=False, big=False),
    "quick": Mode("quick", batch=8, repeats=3, warmup=1, full_iters=True, big=False),
    "full": Mode("full", batch=8, repeats=5, warmup=1, full_iters=True, big=True),
}

BIG = ("fractalmar_in64", "fractalmar_large_in256")


def fused_head_expected(backend: str, device: torch.device, fast: bool = True) -> bool:
    """Whether ``generate(fast=fast, backend=backend)`` must run the fused pixel head (``pixel_head_sample``):
    the fast engine on a kernel backend, or ``auto`` where it has one (a GPU, or a CPU whose compiled kernels
    build)."""
    if not fast or backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" or backend_report()["cpu"][0]
    return True


def _iters(model, mode: Mode) -> List[int]:
    return default_num_iter_list(model) if mode.full_iters else [2] * len(model.levels()[:-1])


# The GPU rows: published configs, random weights, at the reference's evaluation settings
BIG_GENERATE = {"fractalmar_in64": dict(batch=256, num_iter_list=[64, 16]),
                "fractalmar_large_in256": dict(batch=64, num_iter_list=[64, 16, 16])}
# Published seconds per 256x256 image on one H100, for readers to compare (not measured here): the paper's
# FractalMAR-H figure (batch 1024) and the authors' ~7 min for 512 FractalMAR-L images.
PAPER_S_PER_IMAGE = {"fractalmar_huge_in256 (paper, H100, batch 1024)": 1.29,
                     "fractalmar_large_in256 (authors, H100, 512 images in ~7 min)": 0.82}


def generate_rows(config: str, mode: Mode, device: torch.device, backend: str = "torch", fast: bool = False,
                  batch: Optional[int] = None, num_iter_list: Optional[List[int]] = None,
                  baseline: Optional[Row] = None) -> Row:
    """``generate`` images/s: ``fast=False`` is the reference's loop (the faithful baseline), ``fast=True`` the
    fast engine on ``backend``. With ``baseline`` (the faithful row of the same config, batch and weights) the
    row adds its speed-up; fast rows on the torch backend must reproduce the faithful images exactly."""
    torch.manual_seed(0)  # same random weights for every row of a config
    model = build_model(config).to(device).eval().set_backend("torch")
    bsz = batch or mode.batch
    labels = torch.arange(bsz, device=device) % model.num_classes
    iters = num_iter_list or _iters(model, mode)
    cfg = 2.0
    shape = dict(config=config, batch=bsz, num_iter_list=iters, cfg=cfg, fast=fast)
    outs = []
    big = batch is not None

    def run():
        outs.append(generate(model, labels, num_iter_list=iters, cfg=cfg, seed=0, backend=backend, fast=fast))
    with Dispatched() as d:
        times = time_fn(run, device, warmup=0 if big else mode.warmup, repeats=1 if big else mode.repeats)
    same = all(torch.equal(outs[0], o) for o in outs[1:]) if len(outs) > 1 else None
    check = {True: "seeded reruns identical", False: "SEEDED RERUNS DIFFER", None: "single run"}[same]
    timing = summarize(times)
    metrics = {"images_per_s": bsz / timing["median_s"], "s_per_image": timing["median_s"] / bsz, "ran_on": d.ran}
    if fast:  # which path each level took and why (a fused level and an op-by-op one time differently)
        try:
            metrics["level_paths"] = level_paths(model, device, backend)
        except Exception as e:  # noqa: BLE001 -- the row's own run reports a backend failure; note it here too
            metrics["level_paths"] = f"unknown: {type(e).__name__}: {e}"
    if baseline is not None and baseline.timing:
        metrics["speedup_vs_faithful"] = baseline.timing["median_s"] / timing["median_s"]
        if backend == "torch" and baseline.__dict__.get("_images") is not None:
            equal = torch.equal(baseline.__dict__["_images"], outs[0])
            check += "; images identical to faithful" if equal else "; IMAGES DIFFER FROM FAITHFUL"
        elif backend == "auto" and device.type == "cpu" and baseline.__dict__.get("_images") is not None:
            # compiled CPU pixel head: another fp32 summation order, the reference's draws
            same = (baseline.__dict__["_images"] == outs[0]).float().mean().item()
            metrics["identical_subpixels"] = same
            check += f"; {same:.4%} of sub-pixels identical to faithful"
    if big and "256" in config:
        metrics["published_s_per_image"] = PAPER_S_PER_IMAGE
    required = ("pixel_head_sample",) if fused_head_expected(backend, device, fast) else ()
    check = dispatch_failure(d, backend, device, required) or check
    row = Row("e2e", "generate[fast]" if fast else "generate[faithful]", backend, shape, timing, metrics=metrics,
              check=check)
    row.__dict__["_images"] = outs[0]  # for the fast rows' comparison; not serialised
    return row


def train_step_row(config: str, mode: Mode, device: torch.device, backend: str = "torch") -> Row:
    torch.manual_seed(0)
    model = build_model(config).to(device).train().set_backend(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    bsz = mode.batch
    imgs = normalize_uint8(torch.randint(0, 256, (bsz, 3, model.img_size, model.img_size), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(0))).to(device)
    labels = torch.arange(bsz, device=device) % model.num_classes
    losses: List[float] = []
    amp = device.type == "cuda"

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(imgs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with Dispatched() as d:
        times = time_fn(step, device, warmup=mode.warmup, repeats=mode.repeats)
    timing = summarize(times)
    ok = all(math.isfinite(x) for x in losses)
    # a fused backend computes the pixel loss with the fused cross-entropy
    required = ("pixel_cross_entropy",) if backend != "torch" else ()
    return Row("e2e", "train_step", backend, dict(config=config, batch=bsz, bf16_autocast=amp), timing,
               metrics={"images_per_s": bsz / timing["median_s"], "s_per_iter": timing["median_s"], "ran_on": d.ran},
               check=dispatch_failure(d, backend, device, required) or ("losses finite" if ok else "NON-FINITE LOSS"))


def nll_row(config: str, mode: Mode, device: torch.device) -> Row:
    model = build_model(config).to(device).eval().set_backend("torch")  # the row says torch (the default is auto)
    bsz = mode.batch * 2
    imgs = normalize_uint8(torch.randint(0, 256, (bsz, 3, model.img_size, model.img_size), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(0))).to(device)
    labels = torch.zeros(bsz, dtype=torch.long, device=device)
    vals: List[float] = []

    def run():
        with torch.no_grad():
            vals.append(float(model(imgs, labels)) / math.log(2))
    with Dispatched() as d:
        times = time_fn(run, device, warmup=mode.warmup, repeats=mode.repeats)
    timing = summarize(times)
    ok = all(math.isfinite(v) for v in vals)
    return Row("e2e", "nll_forward", "torch", dict(config=config, batch=bsz), timing,
               metrics={"images_per_s": bsz / timing["median_s"], "bits_per_dim": vals[-1], "ran_on": d.ran},
               check=dispatch_failure(d, "torch", device) or ("finite" if ok else "NON-FINITE"))


def plan(mode: Mode, device: torch.device) -> Iterator[Callable[[], List[Row]]]:
    """The rows of a run, as thunks (so the CLI can show progress and skip cleanly)."""
    fused = [b for b in ("triton", "cuda") if device.type == "cuda" and backend_report()[b][0]]
    # on a CPU, "auto" (generate's default) adds the compiled C++ pixel head to the torch math
    cpu_auto = ["auto"] if device.type == "cpu" and backend_report()["cpu"][0] else []
    for config in TINY:
        yield lambda c=config: _generate_group(c, mode, device, ["torch"] + cpu_auto + fused)
        yield lambda c=config: train_step_row(c, mode, device)
        yield lambda c=config: nll_row(c, mode, device)
        for b in fused:
            yield lambda c=config, b=b: train_step_row(c, mode, device, b)
        if device.type != "cuda":
            for name in ("generate[fast]", "train_step"):
                yield lambda c=config, n=name: Row("e2e", n, "triton|cuda", dict(config=c), skipped=(
                    "GPU-only row: on CPU the fused backends run through the Triton interpreter (not timed)"))
    if mode.big:
        for config in BIG:
            if device.type != "cuda":
                reason = "GPU-only row: published config at full size, minutes per image on CPU"
                for name in ("generate[faithful]", "generate[fast]", "train_step"):
                    yield lambda c=config, n=name, r=reason: Row("e2e", n, "torch", dict(config=c), skipped=r)
                continue
            yield lambda c=config: _generate_group(c, mode, device, ["torch"] + fused, **BIG_GENERATE[c])
            for b in ["torch"] + fused:
                yield lambda c=config, b=b: train_step_row(c, mode, device, b)


def _generate_group(config: str, mode: Mode, device: torch.device, backends: List[str], **kw) -> List[Row]:
    """The faithful row, then the fast engine on each backend against it (same weights, batch, seed)."""
    base = generate_rows(config, mode, device, "torch", fast=False, **kw)
    rows = [base] + [generate_rows(config, mode, device, b, fast=True, baseline=base, **kw) for b in backends]
    for r in rows:
        r.__dict__.pop("_images", None)
    return rows
