"""Prewarm Triton's on-disk cache: compile every specialization the library's launchers will launch, in parallel.

    python -m benchmarks.prewarm --arch 90 -j 16 --cache-dir $TRITON_CACHE_DIR --json prewarm.json
    python -m benchmarks.prewarm --arch 90 --limit 3 --check-hit           # the dry run: a few, then a hit check
    python3.12 -m benchmarks.prewarm --arch 90 --cache-dir c --archive triton-cache-sm90.tgz   # to bring along

What is compiled: the AOT capture list (:func:`benchmarks.aot.capture`: every case of ``benchmarks.aot``, the
published configs' training and sampling launches, bound by Triton's own binder for ``GPUTarget("cuda", arch,
32)``), deduplicated. Each specialization is compiled with ``triton.compile(ASTSource(...))`` into the shared
``TRITON_CACHE_DIR`` -- the same call, source hash, options and cache key as a GPU launch's ``JITFunction.run``
miss -- so the launches that follow find their cubins on disk. What cannot be listed ahead: the shapes the
tests make up (odd lengths, edge cases): those still compile at their first launch.

``--check-hit``: after the prewarm, a *fresh* process (it wrote nothing of the cache) compiles the same
specializations again and must hit the cache for each: no new file appears in the cache directory and the
call returns in a fraction of the cold time. Then it replays their cases through the launch path itself,
``JITFunction.run(warmup=True)`` with a stand-in driver that reports an sm_90 device: every prewarmed
specialization must get the same hash (the same cache key a GPU launch computes), again adding no file. This is what a cache compiled elsewhere and brought along needs;
the key includes Triton's version, the sha256 of its ``libtriton`` (so the same wheel, hence the same Python
minor version), the ptxas version of the wheel and the target (sm_90 -> sm_90a).

Reports the wall time against the serial sum of the per-specialization compile times (both in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple


def specializations(arch: int, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The unique specializations of the AOT capture list for ``arch`` (slowest kinds first)."""
    from . import aot
    seen, out = set(), []
    for launch in aot.capture([arch]):
        if launch.get("capture_error"):
            raise RuntimeError(f"{launch['case']}: launcher replay failed: {launch['capture_error']}")
        ident = aot._spec_id(launch)
        if ident not in seen:
            seen.add(ident)
            out.append(launch)
    out.sort(key=lambda s: (s["kernel"] not in ("_pixel_head_kernel", "_mar_stack_kernel", "_ar_stack_decode_kernel"),
                            "fp32" not in s["case"]))
    return out[:limit] if limit else out


def _source(spec: Dict[str, Any]):
    import importlib
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    # attrs as the launch path builds them: {(i,): [["tt.divisibility", 16]]}, lists inside. ASTSource.hash()
    # hashes str(attrs), so tuples there (as benchmarks.aot passes) give another cache key: every GPU launch
    # would miss the prewarmed cache (check_runtime_hits caught exactly that)
    return ASTSource(fn, dict(spec["signature"]), {tuple(p): v for p, v in spec["constexprs"]},
                     {tuple(p): [list(a) for a in v] for p, v in spec["attrs"]})


def compile_one(job: Tuple[Dict[str, Any], int, str]) -> Dict[str, Any]:
    """Compile one specialization into ``cache_dir`` (worker process); seconds and status."""
    spec, arch, cache_dir = job
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import contextlib
    import io
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    triton.knobs.cache.dir = cache_dir
    rec = {"kernel": spec["kernel"], "case": spec["case"], "status": "error"}
    t0 = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        opts = make_backend(target).parse_options(dict(spec["options"])).__dict__
        with contextlib.redirect_stdout(io.StringIO()):
            kernel = triton.compile(_source(spec), target=target, options=opts)
        rec.update(status="ok", hash=kernel.hash)
    except Exception as e:  # reported per specialization; the GPU launch would compile it again
        rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _init_worker() -> None:
    """Imports before the first job, so that their seconds are not billed to the first specialization."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # noqa: F401
    import fractal_kernels  # noqa: F401


def _files(cache_dir: str) -> set:
    out = set()
    for root, _, names in os.walk(cache_dir):
        out.update(os.path.join(root, n) for n in names)
    return out


def check_hits(specs: Sequence[Dict[str, Any]], arch: int, cache_dir: str) -> Dict[str, Any]:
    """In this process (which wrote none of the cache): compile each again; a hit writes no new file."""
    before = _files(cache_dir)
    rows = [compile_one((s, arch, cache_dir)) for s in specs]
    new = sorted(_files(cache_dir) - before)
    hits = sum(1 for r in rows if r["status"] == "ok") if not new else 0
    return {"specializations": len(rows), "hits": hits, "new_files": new[:10], "pid": os.getpid(),
            "seconds": round(sum(r["seconds"] for r in rows), 3), "ok": not new and all(r["status"] == "ok" for r in rows)}


def check_runtime_hits(specs: Sequence[Dict[str, Any]], arch: int, cache_dir: str) -> Dict[str, Any]:
    """The launch path itself: each case that produced ``specs`` is replayed through Triton's real
    ``JITFunction.run(warmup=True)`` (binder, cache key, ``compile``; nothing launched) with a stand-in driver
    that only answers device 0 / stream 0 / ``GPUTarget("cuda", arch, 32)``, as an sm_90 GPU's would. Each
    prewarmed specialization must come back with the prewarm's hash, and no cache file may be added."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    from . import aot
    from .aot_capture import bind_launch, capturing
    triton.knobs.cache.dir = cache_dir

    class _Sm90:  # what JITFunction.run asks a driver for before it compiles
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    want = {aot._spec_id(s): s.get("hash") for s in specs}
    got: Dict[str, str] = {}
    real_run = JITFunction.run

    def warm(self, *args, grid, warmup, **kwargs):
        ident = aot._spec_id(bind_launch(self, args, kwargs, arch))
        if ident in want and ident not in got:
            got[ident] = real_run(self, *args, grid=grid, warmup=True, **kwargs).hash
        return None

    before = _files(cache_dir)
    saved = getattr(driver, "_active", None)  # not .active: that would create the default (CUDA) driver
    driver.set_active(_Sm90())
    try:
        for case in aot.cases():
            if case.label in {s["case"] for s in specs}:
                with capturing(arch, []):
                    JITFunction.run = warm  # capturing restores the real run on exit
                    case.run()
    finally:
        driver._active = saved
    new = sorted(_files(cache_dir) - before)
    same = sum(1 for k, h in got.items() if h == want[k])
    return {"specializations": len(want), "reached": len(got), "same_hash": same, "new_files": new[:10],
            "ok": not new and same == len(want)}


def _hit_job(job):
    specs, arch, cache_dir = job
    doc = check_hits(specs, arch, cache_dir)
    doc["runtime_path"] = check_runtime_hits(specs, arch, cache_dir)
    doc["ok"] = doc["ok"] and doc["runtime_path"]["ok"]
    return doc


def run(arch: int, cache_dir: str, jobs: int, limit: Optional[int] = None, check_hit: bool = False) -> Dict[str, Any]:
    import multiprocessing as mp
    os.makedirs(cache_dir, exist_ok=True)
    t0 = time.perf_counter()
    specs = specializations(arch, limit)
    t_capture = time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    t1 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, initializer=_init_worker) as pool:
        rows = list(pool.map(compile_one, [(s, arch, cache_dir) for s in specs]))
    wall = time.perf_counter() - t1
    import triton
    doc: Dict[str, Any] = {
        "arch": arch, "triton": triton.__version__, "python": ".".join(map(str, sys.version_info[:3])),
        "cache_dir": os.path.abspath(cache_dir), "jobs": jobs, "cpus": os.cpu_count(),
        "specializations": len(specs), "capture_s": round(t_capture, 2), "wall_s": round(wall, 2),
        "serial_sum_s": round(sum(r["seconds"] for r in rows), 2),
        "errors": [r for r in rows if r["status"] != "ok"], "rows": rows,
    }
    doc["speedup"] = round(doc["serial_sum_s"] / wall, 2) if wall > 0 else None
    if check_hit:
        # a fresh process: it imports, captures nothing, and compiles the same specializations again
        hashes = {(r["kernel"], r["case"]): r.get("hash") for r in rows}
        specs = [dict(s, hash=hashes.get((s["kernel"], s["case"]))) for s in specs]
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            doc["hit_check"] = pool.submit(_hit_job, (specs, arch, cache_dir)).result()
        doc["hit_check"]["writer_pids_differ"] = doc["hit_check"]["pid"] != os.getpid()
    return doc


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prewarm", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability (default 90: sm_90a)")
    p.add_argument("--cache-dir", default=os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"))
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, default=None, help="only the first N specializations (the dry run)")
    p.add_argument("--check-hit", action="store_true", help="then check that a fresh process hits the cache")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--archive", default=None, metavar="TGZ", help="then tar the cache directory into this file "
                   "(gpu_session.sh --cache-archive; it hits only under the same Triton wheel and Python minor)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        os.environ.pop("TRITON_INTERPRET")  # the capture needs the GPU launch path; see benchmarks.aot_capture
        return os.execv(sys.executable, [sys.executable, "-m", "benchmarks.prewarm", *(argv or sys.argv[1:])])
    doc = run(args.arch, args.cache_dir, args.jobs, args.limit, args.check_hit)
    print(f"prewarm sm_{args.arch} (triton {doc['triton']}): {doc['specializations']} specializations, wall "
          f"{doc['wall_s']} s on {args.jobs} processes vs serial sum {doc['serial_sum_s']} s "
          f"(x{doc['speedup']}), {len(doc['errors'])} errors, capture {doc['capture_s']} s")
    for e in doc["errors"]:
        print(f"  error: {e['kernel']} | {e['case']}: {e['error']}")
    if "hit_check" in doc:
        h = doc["hit_check"]
        rt = h["runtime_path"]
        print(f"hit check (fresh process {h['pid']}): {h['hits']}/{h['specializations']} hits, "
              f"{h['seconds']} s, new files {len(h['new_files'])}; JITFunction.run(warmup) with an sm_{args.arch} "
              f"driver stand-in: {rt['same_hash']}/{rt['specializations']} same key, new files "
              f"{len(rt['new_files'])}: {'ok' if h['ok'] else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.archive:
        import tarfile
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(args.cache_dir, arcname=".")
        print(f"wrote {args.archive} ({os.path.getsize(args.archive) / 2**20:.1f} MiB)")
    return 0 if not doc["errors"] and doc.get("hit_check", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
