"""The counting runs: one config's counts at given batches (:func:`run_config`), the exact depth and batch
extrapolations (:func:`combine_depths`, :func:`at_batch`), and the published run's pieces, counted in child
processes and assembled."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .models import count_generate, narrow_clone

# benchmarks/, this package's parent: its results/ folder, and the repo root above it (the workers' cwd)
_BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLISHED = ("fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
             "fractalmar_huge_in256")
TINY = ("tiny_mar", "tiny_ar", "tiny_mar_gp")
# the README's sampling settings (cfg, temperature; the reference's iteration counts): counts depend on cfg != 1
# and the schedule only
SAMPLING = {"cfg": 11.0, "temperature": 1.03, "cfg_schedule": "linear"}


def combine_depths(one: Dict[str, Any], two: Dict[str, Any], depths: Dict[str, int]) -> Dict[str, Any]:
    """Counts at the real depths from counts at depth 1 and depth 2 of every generator level (``one``, ``two``:
    :func:`summarize_counts` of the same run with all generator levels 1 and 2 blocks deep). A level's own
    launches, copies and syncs are affine in its own depth (every block issues the same ops; the levels below
    are counted under their own labels), so per label and kind: ``n(d) = n(1) + (n(2) - n(1)) * (d - 1)``.
    Labels without a depth (pixel heads, ``generate``) must agree between the two runs. Tested exactly against
    a direct count (``tests/test_launches.py``)."""
    batch = one["batch"]
    levels = {}
    for lbl in sorted(set(one["levels"]) | set(two["levels"])):
        a, b = one["levels"].get(lbl), two["levels"].get(lbl)
        if a is None or b is None or a["calls"] != b["calls"] or a["rows"] != b["rows"]:
            raise RuntimeError(f"combine_depths: level {lbl!r} differs in structure between depth 1 and 2")
        d = depths.get(lbl)
        if d is None:
            if (a["launches"], a["syncs"], a["copies"]) != (b["launches"], b["syncs"], b["copies"]):
                raise RuntimeError(f"combine_depths: {lbl!r} has no depth but its counts changed with it")
            levels[lbl] = b
            continue

        def affine(x: Dict[str, int], y: Dict[str, int]) -> Dict[str, int]:
            out = {k: x.get(k, 0) + (y.get(k, 0) - x.get(k, 0)) * (d - 1) for k in set(x) | set(y)}
            if any(v < 0 for v in out.values()):
                raise RuntimeError(f"combine_depths: negative count at {lbl!r}")
            return dict(sorted(((k, v) for k, v in out.items() if v), key=lambda kv: -kv[1]))
        kinds = affine(a["kinds"], b["kinds"])
        sync_kinds = affine(a["sync_kinds"], b["sync_kinds"])
        copies = a["copies"] + (b["copies"] - a["copies"]) * (d - 1)
        levels[lbl] = {"launches": sum(kinds.values()), "copies": copies, "syncs": sum(sync_kinds.values()),
                       "calls": a["calls"], "rows": a["rows"], "kinds": kinds, "sync_kinds": sync_kinds,
                       "depth": d, "at_depth_1": a["launches"], "at_depth_2": b["launches"]}
    tot = {k: sum(v[k] for v in levels.values()) for k in ("launches", "copies", "syncs")}
    out = {**two, **tot, "levels": levels, "launches_per_image": tot["launches"] / batch,
           "copies_per_image": tot["copies"] / batch, "syncs_per_image": tot["syncs"] / batch,
           "depth_extrapolated": True, "wall_s": one["wall_s"] + two["wall_s"]}
    out.pop("first_call_extra", None)
    return out


def level_depths(config: str) -> Dict[str, int]:
    """Label of every generator level -> its number of blocks."""
    from fractal_models import config_kwargs
    kw = config_kwargs(config)
    kinds = kw["generator_type_list"]
    return {f"L{i} {kinds[i].upper()}": kw["num_blocks_list"][i] for i in range(len(kw["img_size_list"]) - 1)}


def run_config(config: str, batches: Sequence[int], *, narrow: bool = True,
               num_iter_list: Optional[Sequence[int]] = None, extra_ref_batches: Sequence[int] = (),
               depth_extrapolation: bool = True, batch_extrapolation: bool = True) -> Dict[str, Any]:
    """Reference loop and fast engine (``backend="triton"``) counts of one config at ``batches``: on the narrow
    clone (or the model itself), every generator level counted at depths 1 and 2 and extrapolated to its real
    depth (:func:`combine_depths`), or counted at its real depth directly."""
    from fractal_models import build_model, config_kwargs
    kw = config_kwargs(config)
    n_gen = len(kw["img_size_list"]) - 1

    def model_at(depth: Optional[int]):
        over = {} if depth is None else {"num_blocks_list": (depth,) * n_gen + tuple(kw["num_blocks_list"][n_gen:])}
        if narrow:
            return narrow_clone(config, **over)
        torch.manual_seed(0)
        return build_model(config, **over).eval()

    def count(model, fast: bool, bs: Sequence[int]):
        return count_generate(model, bs, fast=fast, backend="triton" if fast else "torch", num_iter_list=num_iter_list,
                              cfg=SAMPLING["cfg"], temperature=SAMPLING["temperature"], warmup=fast)

    t0 = time.perf_counter()
    out: Dict[str, Any] = {"config": config, "narrow_clone": narrow, "depth_extrapolated": depth_extrapolation,
                           "batch_extrapolated": batch_extrapolation}
    for path, fast, bs in (("ref", False, list(batches) + list(extra_ref_batches)), ("fast", True, list(batches))):
        t = time.perf_counter()
        counted = [1] if batch_extrapolation else bs
        if depth_extrapolation:
            one, two = count(model_at(1), fast, counted), count(model_at(2), fast, counted)
            depths = level_depths(config)
            res = {b: combine_depths(one[b], two[b], depths) for b in counted}
        else:
            res = count(model_at(None), fast, counted)
        out[path] = {b: res[b] if b in res else at_batch(res[1], b) for b in bs}
        out.setdefault("wall_s", {})[path] = time.perf_counter() - t
    out["wall_s"]["total"] = time.perf_counter() - t0
    return out


def at_batch(summary: Dict[str, Any], batch: int) -> Dict[str, Any]:
    """A batch-1 count stated for ``batch``: launches, copies and syncs per *batch* do not depend on the batch
    size (every loop batches over the images; no op's launch count depends on its rows), so per image they are
    the batch-1 count / ``batch``. Tested exactly on the tiny configs (``tests/test_launches.py``), reference loop
    and fast engine, level by level and kind by kind, in the steady state (:func:`count_generate` warms up at the
    counted batch: the decode kernels' per-(rows, length) tensors are built once per process)."""
    out = dict(summary)
    out.update(batch=batch, batch_extrapolated_from=summary["batch"],
               launches_per_image=summary["launches"] / batch, copies_per_image=summary["copies"] / batch,
               syncs_per_image=summary["syncs"] / batch)
    out.pop("first_call_extra", None)
    return out


def job_file(raw_dir: str, config: str, path: str, depth: int) -> str:
    return os.path.join(raw_dir, f"job_{config}_{path}_{depth}.json")


def run_job(config: str, path: str, depth: int, raw_dir: str) -> str:
    """One piece of the published run: ``path`` ("ref"/"fast") of the narrow clone with every generator level
    ``depth`` blocks deep, batch 1; saved as ``job_<config>_<path>_<depth>.json``."""
    import json

    from ..harness import atomic_write, git_commit
    from fractal_models import config_kwargs
    t0, c0 = time.perf_counter(), time.process_time()
    kw = config_kwargs(config)
    n_gen = len(kw["img_size_list"]) - 1
    model = narrow_clone(config, num_blocks_list=(depth,) * n_gen + tuple(kw["num_blocks_list"][n_gen:]))
    fast = path == "fast"
    with torch.no_grad():
        r = count_generate(model, [1], fast=fast, backend="triton" if fast else "torch", cfg=SAMPLING["cfg"],
                           temperature=SAMPLING["temperature"], warmup=fast)[1]
    r.update(cpu_s=time.process_time() - c0, job_wall_s=time.perf_counter() - t0, commit=git_commit())
    out = job_file(raw_dir, config, path, depth)
    atomic_write(out, (json.dumps(r, indent=1, default=str) + "\n").encode())
    return out


def published_jobs(configs: Sequence[str]) -> List[Tuple[str, str]]:
    """(config, path) pieces of the published run, the longest first (a worker runs both depths of one)."""
    order = {"fractalmar_huge_in256": 0, "fractalmar_large_in256": 1, "fractalmar_base_in256": 2,
             "fractalmar_in64": 3, "fractalar_in64": 4}
    jobs = [(c, p) for c in configs for p in ("ref", "fast")]
    return sorted(jobs, key=lambda j: (order.get(j[0], -1), j[1] != "ref"))


def run_jobs(jobs: Sequence[Tuple[str, str]], raw_dir: str, workers: int) -> Dict[str, Any]:
    """Count the pieces: in this process one after another (``workers`` <= 1), or in ``workers`` child processes
    (``python -m benchmarks.launches --job CONFIG:PATH:1,CONFIG:PATH:2``), the longest pieces first."""
    import subprocess
    import sys
    t0 = time.perf_counter()
    if workers <= 1:
        for c, p in jobs:
            for d in (1, 2):
                print("wrote " + run_job(c, p, d, raw_dir), flush=True)
        return {"workers": 1, "wall_s": time.perf_counter() - t0}
    pending = list(jobs)
    running: List[Tuple[Any, Tuple[str, str]]] = []
    failed = []
    while pending or running:
        while pending and len(running) < workers:
            c, p = pending.pop(0)
            spec = f"{c}:{p}:1,{c}:{p}:2"
            cmd = [sys.executable, "-m", "benchmarks.launches", "--job", spec, "--out-dir", os.path.dirname(raw_dir),
                   "--stem", os.path.basename(raw_dir)[len("raw_"):]]
            running.append((subprocess.Popen(cmd, cwd=os.path.dirname(_BENCH_DIR)),
                            (c, p)))
        time.sleep(0.5)
        still = []
        for proc, job in running:
            rc = proc.poll()
            if rc is None:
                still.append((proc, job))
            elif rc != 0:
                failed.append(job)
        running = still
    if failed:
        raise RuntimeError(f"launches: job pieces failed: {failed}")
    return {"workers": workers, "wall_s": time.perf_counter() - t0}


def assemble_jobs(config: str, raw_dir: str, batches: Sequence[int], extra_ref_batches: Sequence[int] = ()):
    """The published-config result from the job pieces (depths 1 and 2, both paths), or None if one is missing."""
    import json
    pieces = {}
    for path in ("ref", "fast"):
        for d in (1, 2):
            f = job_file(raw_dir, config, path, d)
            if not os.path.exists(f):
                return None
            with open(f) as fh:
                pieces[path, d] = json.load(fh)
    depths = level_depths(config)
    out: Dict[str, Any] = {"config": config, "narrow_clone": True, "depth_extrapolated": True,
                           "batch_extrapolated": True, "wall_s": {}, "cpu_s": 0.0,
                           "commits": sorted({str(v.get("commit")) for v in pieces.values()})}
    for path in ("ref", "fast"):
        one = combine_depths(pieces[path, 1], pieces[path, 2], depths)
        one["path"] = path
        bs = list(batches) + (list(extra_ref_batches) if path == "ref" else [])
        out[path] = {b: (one if b == 1 else at_batch(one, b)) for b in bs}
        out["wall_s"][path] = sum(pieces[path, d].get("job_wall_s", pieces[path, d]["wall_s"]) for d in (1, 2))
        out["cpu_s"] += pieces[path, 1]["cpu_s"] + pieces[path, 2]["cpu_s"]
    out["wall_s"]["total"] = out["wall_s"]["ref"] + out["wall_s"]["fast"]
    return out
