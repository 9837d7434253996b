"""Operator-count proxy of ``generate``: how many PyTorch operators one batch dispatches, faithful vs fast.

Machine-independent (no timing in the count): the fast generation engine's first target is the host-side
operator count, which bounds the launch/dispatch overhead that dominates FractalGen sampling (millions of
tiny ops). ``count_generate_ops`` profiles one ``generate`` call with ``torch.profiler`` (CPU activity) and
counts operator events:

* an event is an *operator* if its name starts with ``aten::`` or with a custom-op namespace in
  ``CUSTOM_NAMESPACES`` (``fractal_kernels::``);
* **primary count ("ops", top-level rule)**: operators not nested inside another operator on the same
  thread (interval containment), i.e. the calls dispatched from Python (``aten::linear`` counts once, its
  inner ``aten::t``/``aten::addmm`` do not; a custom op counts once, whatever it runs inside);
* secondary count ("ops_all"): every operator event, nested ones included (the issue's counting: ~460 000
  for the faithful tiny_mar batch);
* "ops_all_outside_kernels": ``ops_all`` without the events nested inside a custom op. A custom op is one
  kernel launch on a GPU; on a CPU the kernel row runs through the Triton interpreter, whose own tensor work
  lands inside the op's event and says nothing about a GPU (for the compiled CPU pixel head those inner events
  are its launcher's casts and allocations). Equal to ``ops_all`` for rows without custom ops;
* only the calling thread's events are counted (intra-op worker threads, if any recorded, are ignored);
  Python-level work (tensor bookkeeping, RNG calls through ``torch.Generator``) that dispatches no
  operator is not counted, host syncs count as the operator that causes them (``aten::item`` etc.).

Both sides (``fast=False`` faithful reference loop, ``fast=True``) are counted by the same function with
the same rule, on the same seeded inputs; the fast row also checks that its images equal the faithful ones.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .cases import fused_head_expected
from .harness import Dispatched, Row, dispatch_failure, summarize, time_fn
from fractal_kernels.dispatch import backend_report
from fractal_models import build_model, config_kwargs, generate
from fractal_models.sampling import default_num_iter_list

TINY = ("tiny_mar", "tiny_ar", "tiny_mar_gp")
CUSTOM_NAMESPACES = ("fractal_kernels::",)
OP_PREFIXES = ("aten::",) + CUSTOM_NAMESPACES


def is_operator(name: str) -> bool:
    return name.startswith(OP_PREFIXES)


def count_ops(fn: Callable[[], object]) -> Dict[str, int]:
    """Run ``fn`` once under ``torch.profiler`` and count its operator events (see the module docstring).

    Returns ``{"ops": top-level operators, "ops_all": all operator events, "ops_all_outside_kernels": all
    operator events except those nested inside a custom op}``."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.device_type() == torch.autograd.DeviceType.CPU and is_operator(e.name())]
    if not events:
        return {"ops": 0, "ops_all": 0, "ops_all_outside_kernels": 0}
    # The calling thread: the profiler numbers threads itself, so take the thread of the earliest operator
    # (fn runs on this thread; workers only ever run operators inside one of its operators).
    main = min(events, key=lambda e: e.start_ns()).start_thread_id()
    mine = [e for e in events if e.start_thread_id() == main]
    spans = sorted(((e.start_ns(), e.end_ns()) for e in mine), key=lambda s: (s[0], -s[1]))
    top = 0
    cur = None  # (start, end) of the current top-level operator
    for start, end in spans:
        if cur is not None and cur[0] <= start and end <= cur[1]:
            continue  # nested in the current top-level operator
        top += 1
        cur = (start, end)
    # every operator event except those inside a custom op (one kernel launch on a GPU; on a CPU run through
    # the Triton interpreter, what is inside is the interpreter's own tensor work)
    custom = sorted((e.start_ns(), e.end_ns()) for e in mine if e.name().startswith(CUSTOM_NAMESPACES))
    starts = [c[0] for c in custom]
    inside = 0
    for e in mine:
        if e.name().startswith(CUSTOM_NAMESPACES):
            continue
        i = bisect.bisect_right(starts, e.start_ns()) - 1  # custom ops never nest on one thread
        if i >= 0 and e.end_ns() <= custom[i][1]:
            inside += 1
    return {"ops": top, "ops_all": len(spans), "ops_all_outside_kernels": len(spans) - inside}


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 while profiling: the profiler's native library prints a line at every start
    and stop (``USDT: ... profiler_start``), which would flood the terminal of a benchmark run. Python-level
    output is unaffected (warnings are recorded by the rows)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_generate_ops(model, labels: torch.Tensor, *, fast: bool, num_iter_list: Sequence[int], cfg: float,
                       seed: int = 0, backend: str = "torch", **kwargs) -> Dict[str, object]:
    """Operator counts of one ``generate`` batch (``fast`` or the faithful path, on ``backend``); also returns
    the images."""
    out: List[torch.Tensor] = []

    def run():
        out.append(generate(model, labels, num_iter_list=list(num_iter_list), cfg=cfg, seed=seed, fast=fast,
                            backend=backend, **kwargs))
    counts = count_ops(run)
    return {**counts, "images": out[0]}


def kernel_row_available(device: torch.device) -> bool:
    """The fused-kernel row runs where Triton does: a GPU, or the CPU interpreter (``TRITON_INTERPRET=1``)."""
    from fractal_kernels.dispatch import _triton
    return _triton()[0] and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def opcount_rows(config: str, batch: int, num_iter_list: Optional[Sequence[int]], device: torch.device,
                 repeats: int = 1, cfg: float = 2.0, time_it: bool = True, kernels: Optional[bool] = None) -> List[Row]:
    """Rows for one tiny config: operator counts per batch (and images/s) of

    * ``generate[faithful]`` -- the reference's loop (``fast=False``, ``backend="torch"``), the baseline;
    * ``generate[fast]`` -- the fast engine on the reference math (``backend="torch"``); its images must equal
      the faithful ones;
    * ``generate[fast,auto]`` (CPU, where the compiled CPU kernels build) -- what ``generate`` runs by default
      on a CPU: the levels' reference math plus the compiled C++ pixel head (one call per pixel batch), fed the
      reference's own random draws; reported with the share of sub-pixels identical to the faithful images;
    * ``generate[fast,kernels]`` -- the fast engine as dispatched on a GPU (``backend="triton"``: fused pixel
      head, attention and decode kernels, one custom op per launch). On a CPU it runs through the Triton
      interpreter: the *count* is the GPU's dispatch count, the time is meaningless and not reported. Other
      random stream than the torch rows (one Philox seed per pixel-head call), so its images are not compared
      here; ``tests/models/test_kernel_backends.py`` checks them against the torch path with shared uniforms.

    Random weights (seed 0); ``num_iter_list`` None = the reference's defaults; ``kernels`` None = when
    :func:`kernel_row_available`. Timed rows: after the profiled calls, one untimed round of every timed variant,
    then ``repeats`` rounds of one call each, the variants interleaved (the median per variant is reported)."""
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    model.set_backend("torch")
    iters = list(num_iter_list) if num_iter_list is not None else default_num_iter_list(model)
    labels = torch.arange(batch, device=device) % model.num_classes
    shape = dict(config=config, batch=batch, num_iter_list=iters, cfg=cfg)
    variants = [("generate[faithful]", False, "torch"), ("generate[fast]", True, "torch")]
    if device.type == "cpu" and backend_report()["cpu"][0]:
        variants.append(("generate[fast,auto]", True, "auto"))
    if kernels if kernels is not None else kernel_row_available(device):
        variants.append(("generate[fast,kernels]", True, "triton"))
    res, seen = {}, {}
    for name, fast, backend in variants:
        with Dispatched() as seen[name]:
            res[name] = count_generate_ops(model, labels, fast=fast, num_iter_list=iters, cfg=cfg, backend=backend)
    base = res["generate[faithful]"]
    # Timing, round-robin: one untimed call of each variant, then `repeats` rounds of one call each, so slow
    # drifts of the process (allocator growth, the profiler's leftovers, a busy neighbour) hit every variant
    # alike and the speed-ups compare like with like.
    timed_variants = [(name, fast, backend) for name, fast, backend in variants
                      if time_it and not (backend == "triton" and device.type != "cuda")]
    times: Dict[str, List[float]] = {name: [] for name, _, _ in timed_variants}
    timed_seen = {name: Dispatched() for name, _, _ in timed_variants}
    for rnd in range(repeats + 1):
        for name, fast, backend in timed_variants:
            with timed_seen[name]:  # re-entered each round: records the last round's dispatch (and its warnings)
                t = time_fn(lambda f=fast, b=backend: generate(model, labels, num_iter_list=iters, cfg=cfg, seed=0,
                                                               fast=f, backend=b), device, warmup=0, repeats=1)
            if timed_seen[name].fallbacks:
                seen[name].fallbacks += timed_seen[name].fallbacks
            if rnd:
                times[name] += t
    rows = []
    for name, fast, backend in variants:
        r = res[name]
        metrics: Dict[str, object] = {"ops": r["ops"], "ops_all": r["ops_all"],
                                      "ops_all_outside_kernels": r["ops_all_outside_kernels"],
                                      "ops_per_image": r["ops"] / batch}
        if fast:
            metrics["ops_ratio_faithful_over_fast"] = base["ops"] / max(1, r["ops"])
            metrics["ops_all_ratio_faithful_over_fast"] = base["ops_all"] / max(1, r["ops_all"])
            metrics["ops_all_outside_kernels_ratio"] = base["ops_all"] / max(1, r["ops_all_outside_kernels"])
        if backend == "triton":
            check = "other random stream (seeded draws); equivalence with shared uniforms is a unit test"
        elif fast:
            same = base["images"] == r["images"]
            metrics["identical_subpixels"] = float(same.float().mean())
            check = ("images identical to faithful" if bool(same.all()) else
                     f"{float(same.float().mean()):.4%} of sub-pixels identical to faithful")
        else:
            check = "baseline"
        metrics["ran_on"] = seen[name].ran
        required = ("pixel_head_sample",) if fused_head_expected(backend, device, fast) else ()
        check = (dispatch_failure(seen[name], backend, device, required)
                 or (dispatch_failure(timed_seen[name], backend, device, required) if name in timed_seen else None)
                 or check)
        if name in times:
            timing = summarize(times[name])
            metrics["images_per_s"] = batch / timing["median_s"]
        else:
            timing = None  # counted, not timed (the interpreter's time means nothing)
        rows.append(Row("opcount", name, backend, shape, timing, metrics=metrics, check=check))
    for row in rows[1:]:
        if time_it and "images_per_s" in row.metrics and "images_per_s" in rows[0].metrics:
            row.metrics["speedup_images_per_s"] = row.metrics["images_per_s"] / rows[0].metrics["images_per_s"]
    return rows


def plan(mode, device: torch.device) -> Iterator[Callable[[], List[Row]]]:
    """Rows of suite "opcount" for ``fractal-bench``: batch 8, cfg 2 and the reference's iterations (16, 16 /
    16, 16 / 16, 16, 4: ``default_num_iter_list``) in quick/full mode; batch 2 and 2 iterations per level in
    smoke mode. Counted, not timed: the e2e rows of the same run time the same cases (config, batch,
    iterations, cfg, seed, weights), so timing them twice would only double the run (``python -m
    benchmarks.opcount`` times them, interleaved). The fused-kernel row needs a GPU, or ``TRITON_INTERPRET=1``
    on a CPU (count only; smoke mode skips it there, the interpreter being slow)."""
    # a CPU quick run counts one config: counting all three (the fused row through the interpreter) would
    # take the quick run past its 3-minute budget; --full and GPU runs count every tiny config
    configs = TINY[:1] if mode.name == "quick" and device.type != "cuda" else TINY
    for config in TINY[len(configs):]:
        yield lambda c=config: [Row("opcount", "generate[*]", "torch|triton", dict(config=c),
                                    skipped=f"quick mode on a CPU counts {configs[0]} only (--full: all three)")]
    for config in configs:
        kernels = kernel_row_available(device) and (mode.full_iters or device.type == "cuda")
        iters = None if mode.full_iters else [2] * _num_levels(config)
        yield lambda c=config, k=kernels, it=iters: opcount_rows(c, mode.batch, it, device, time_it=False, kernels=k)
        if not kernels:
            yield lambda c=config: [Row("opcount", "generate[fast,kernels]", "triton", dict(config=c),
                                        skipped="needs a GPU (or TRITON_INTERPRET=1 on a CPU, quick/full mode: "
                                                "counts the GPU's dispatches through the interpreter)")]


def _num_levels(config: str) -> int:
    """Generator levels above the pixel head."""
    return len(config_kwargs(config)["img_size_list"]) - 1


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m benchmarks.opcount``: the opcount rows of the three tiny configs (batch 8, cfg 2, reference
    iterations), kernel-dispatch row included (on a CPU run it under ``TRITON_INTERPRET=1``), written to
    ``benchmarks/results/<device>/opcount.{json,md,png}`` (in a checkout; see ``benchmarks.paths``)."""
    import argparse

    from .harness import device_slug, markdown_table, results_document, write_results
    p = argparse.ArgumentParser(prog="python -m benchmarks.opcount", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if not kernel_row_available(device):
        print("note: no GPU and TRITON_INTERPRET is not 1: the generate[fast,kernels] rows are skipped")
    rows: List[Row] = []
    for config in TINY:
        rows += opcount_rows(config, args.batch, None, device, repeats=args.repeats)
    doc = results_document(rows, device, "opcount")
    from .paths import results_root
    out_dir = args.out_dir or os.path.join(results_root(), device_slug(device))
    doc["files"] = write_results(doc, out_dir, "opcount")
    print(markdown_table(doc))
    print("wrote " + ", ".join(doc["files"].values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
