"""``python -m benchmarks.launches``: the command line (published run in worker processes, ``--tiny``, ``--job``
pieces, ``--build-only``)."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

from .roofline_model import CALIBRATION
from .runs import (PUBLISHED, TINY, _BENCH_DIR, assemble_jobs, job_file, published_jobs, run_config,
                   run_job, run_jobs)
from .tables import build_document, lever_analysis, markdown, plot, timing_note


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m benchmarks.launches``: launches/syncs per image of the five published configs (narrow clones,
    batch 1 and 256, reference loop and fast engine) and the roofline MODEL, written to
    ``benchmarks/results/launches/launches.{json,md,png}``; ``--tiny``: the tiny configs (CI)."""
    import argparse
    import json

    from ..harness import atomic_write
    p = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the three tiny configs at full width (CI)")
    p.add_argument("--configs", default=None, help="comma-separated config names")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--iters", type=int, default=None,
                   help="iterations per level for every config (default: the reference's; a quick check)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--stem", default=None)
    p.add_argument("--exact-depth", action="store_true",
                   help="count every level at its real depth (default: depths 1 and 2, extrapolated exactly)")
    p.add_argument("--exact-batch", action="store_true",
                   help="count every batch (default for the published configs: batch 1, per batch = any batch)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="published run: count its pieces in this many child processes (default: 2, or 1 on a "
                        "one-core machine; 1 = in this process)")
    p.add_argument("--job", default=None,
                   help="CONFIG:ref|fast:DEPTH[,...] -- pieces of the published run (batch 1), saved for assembly")
    p.add_argument("--resume", action="store_true", help="published run: keep the pieces already saved")
    p.add_argument("--build-only", action="store_true", help="only rebuild the tables from the saved pieces")
    args = p.parse_args(argv)
    configs = args.configs.split(",") if args.configs else list(TINY if args.tiny else PUBLISHED)
    batches = [int(b) for b in args.batches.split(",")]
    out_dir = args.out_dir or os.path.join(_BENCH_DIR, "results", "launches")
    stem = args.stem or ("launches_tiny" if args.tiny else "launches")
    raw_dir = os.path.join(out_dir, "raw_" + stem)
    os.makedirs(raw_dir, exist_ok=True)
    if args.job:
        for spec in args.job.split(","):
            c, path, depth = spec.split(":")
            print("wrote " + run_job(c, path, int(depth), raw_dir), flush=True)
        return 0
    results = []
    t0, c0 = time.perf_counter(), time.process_time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    run_info: Dict[str, Any] = {}
    if not args.tiny:
        if not args.build_only:
            jobs = [(c, p_) for c, p_ in published_jobs(configs)
                    if not (args.resume and all(os.path.exists(job_file(raw_dir, c, p_, d)) for d in (1, 2)))]
            run_info = run_jobs(jobs, raw_dir, args.workers)
        for c in configs:
            extra = [cal["batch"] for cal in CALIBRATION if cal["config"] == c and cal["batch"] not in batches]
            r = assemble_jobs(c, raw_dir, batches, extra)
            if r is None:
                print(f"{c}: pieces missing in {raw_dir}, left out", flush=True)
                continue
            results.append(r)
    else:
        for c in configs:
            tc0 = time.process_time()
            from fractal_models import config_kwargs
            iters = [args.iters] * (len(config_kwargs(c)["img_size_list"]) - 1) if args.iters else None
            r = run_config(c, batches, narrow=False, num_iter_list=iters, depth_extrapolation=not args.exact_depth,
                           batch_extrapolation=False)
            r["cpu_s"] = time.process_time() - tc0
            results.append(r)
    for r in results:
        print(f"{r['config']}: " + ", ".join(f"B={b} ref {r['ref'][b]['launches_per_image']:.0f} / fast "
                                             f"{r['fast'][b]['launches_per_image']:.0f} launches per image"
                                             for b in batches) + f" ({r['wall_s']['total']:.0f} s wall, "
                                                                 f"{r['cpu_s']:.0f} s CPU)", flush=True)
    doc = build_document(results, batches)
    doc["cpu_s"] = sum(r.get("cpu_s", 0.0) for r in results)
    doc["wall_s"] = sum(r["wall_s"]["total"] for r in results)
    previous = os.path.join(out_dir, stem + ".json")
    if args.build_only and os.path.exists(previous):  # the tables are rebuilt: the counting run stays described
        with open(previous) as f:
            doc["run"] = {**json.load(f).get("run", {}), "tables_rebuilt": True}
    else:
        doc["run"] = {**run_info, "total_wall_s": time.perf_counter() - t0, "main_cpu_s": time.process_time() - c0,
                      "loadavg_before": load_before,
                      "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
                      "build_only": bool(args.build_only), "resumed": bool(args.resume)}
    files = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    png = plot(doc, os.path.join(out_dir, stem + ".png"))
    if png:
        files["png"] = png
    doc["files"] = files
    md = markdown(doc) + "\n".join(lever_analysis(doc)) + timing_note(doc)
    atomic_write(files["md"], md.encode())
    atomic_write(files["json"], (json.dumps(doc, indent=1, default=str) + "\n").encode())
    print("wrote " + ", ".join(files.values()))
    return 0
