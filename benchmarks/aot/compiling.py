"""Compiling: each captured specialization compiled cold for ``sm_<arch>`` in a worker process (ptxas report,
shared memory, SASS counts), and :func:`run`, which captures, compiles on a process pool and assembles the
document with its budget verdicts."""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .budgets import ARCHS, BUDGETS, gate_problems, occupancy, violations
from .caselist import _spec_id, capture

SCHEMA_VERSION = 1

# ---- compile one specialization (worker process) -----------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _count(pattern: str, sass: str) -> int:
    return len(re.findall(pattern, sass))


def disassemble(kernel) -> str:
    """The kernel's SASS as ``cuobjdump -sass`` prints it, read from the cubin with the wheel's own cuobjdump.

    Not ``kernel.asm["sass"]``: Triton 3.6's formatter (``triton.tools.disasm``) stops at the first
    instruction whose offset has more than four hex digits, so a kernel over 64 KB of code (the bf16 AR
    stack) came back without its tail and without its EXIT. The raw listing is the same on 3.6 and 3.9; the
    counts below only need mnemonics. Falls back to Triton's text where no cuobjdump can be run."""
    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True,
                                  timeout=120).stdout
    except (AttributeError, OSError, subprocess.SubprocessError):
        return kernel.asm["sass"]


def compile_spec(spec: Dict[str, Any], arch: int) -> Dict[str, Any]:
    """Compile one captured specialization cold for ``sm_<arch>``; resource figures or the error text."""
    cache = tempfile.mkdtemp(prefix="fk-aot-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib
    import shutil
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    knobs.cache.dir = cache
    knobs.nvidia.dump_ptxas_log = True
    rec: Dict[str, Any] = {"status": "error", "error": None}
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        target = GPUTarget("cuda", arch, 32)
        opts = make_backend(target).parse_options(dict(spec["options"])).__dict__
        src = ASTSource(fn, dict(spec["signature"]), {tuple(p): v for p, v in spec["constexprs"]},
                        {tuple(p): [tuple(a) for a in v] for p, v in spec["attrs"]})
        log = io.StringIO()
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=opts)
        rec["compile_wall_s"] = round(time.perf_counter() - t0, 2)
        rec["compile_s"] = round(_cpu_seconds() - c0, 2)
        text = log.getvalue()
        regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
        if regs is None or spill is None:
            raise RuntimeError(f"no ptxas -v report in the compile log: {text[-500:]!r}")
        sass = disassemble(kernel)
        ttir = kernel.asm["ttir"]
        if not re.search(r"\b(EXIT|RET)\b", sass):
            raise RuntimeError("no SASS from cuobjdump (cannot count tensor-core / local-memory instructions)")
        md = kernel.metadata
        rec.update(status="ok", regs=int(regs.group(1)), stack=int(spill.group(1)),
                   spill_store=int(spill.group(2)), spill_load=int(spill.group(3)), smem=int(md.shared),
                   num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                   hmma=_count(r"\bHMMA\b", sass), hgmma=_count(r"\bHGMMA\b", sass),
                   ldl=_count(r"\bLDL\b", sass), stl=_count(r"\bSTL\b", sass),
                   has_dot="tt.dot" in ttir, ptx_target=f"sm_{arch}{'a' if arch >= 90 else ''}")
    except Exception as e:  # a compile error is a result, not a crash of the report
        rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rec


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas runs as a child): the compile's cost
    without the time other jobs on a shared machine take from it."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _warm_worker() -> None:
    """Pay the one-time costs of a compiling process (imports, LLVM and ptxas start-up) on a trivial kernel,
    so that they are not billed to the first real specialization."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _warm(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))
    cache = tempfile.mkdtemp(prefix="fk-aot-warm-")
    try:
        triton.knobs.cache.dir = cache
        with contextlib.redirect_stdout(io.StringIO()):
            for arch in ARCHS:
                triton.compile(ASTSource(_warm, {"x_ptr": "*fp32"}, {(1,): 16}, {}),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": 1})
    except Exception:  # warming is an optimisation; a real failure shows on the real compiles
        pass
    finally:
        import shutil
        shutil.rmtree(cache, ignore_errors=True)


def _compile_job(job):
    return job[0], compile_spec(job[1], job[2])



# ---- the run ---------------------------------------------------------------------------------------------

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def run(archs: Sequence[int], subset: Optional[List[Tuple[str, str]]], jobs: int = 1,
        progress: bool = True, case_labels: Optional[set] = None) -> Dict[str, Any]:
    t_start = time.perf_counter()
    launches = capture(archs, case_labels)  # every case even for a subset: replay is cheap, and the gate
    t_capture = time.perf_counter() - t_start  # checks that every launched kernel is recorded
    want = set(subset) if subset is not None else None
    rows: List[Dict[str, Any]] = []
    unique: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for l in launches:
        if l.get("capture_error"):
            rows.append(dict(l))
            continue
        if want is not None and (l["kernel"], l["case"]) not in want:
            continue
        ident = (_spec_id(l), l["arch"])
        unique.setdefault(ident, l)
        rows.append(dict(l, spec_id=ident))
    if want is not None:
        got = {(r["kernel"], r["case"]) for r in rows if r.get("kernel")}
        for kernel, case in sorted(want - got):
            for arch in archs:
                rows.append({"case": case, "kernel": kernel, "arch": arch, "group": "?", "path": "?",
                             "capture_error": "subset entry not produced by any launcher (renamed case or kernel?)"})
    results: Dict[Tuple[str, int], Dict[str, Any]] = {}
    jobs_list = [(ident, spec, ident[1]) for ident, spec in unique.items()]
    # the slow ones first, so a pool does not end on one long compile
    jobs_list.sort(key=lambda j: (j[1]["kernel"] != "_pixel_head_kernel", "fp32" not in j[1]["case"]))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(jobs_list), desc="aot compile", unit="kernel")
        except ImportError:
            bar = None
    t_compile = time.perf_counter()
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mp.get_context("spawn"),
                             initializer=_warm_worker) as pool:
        for ident, rec in pool.map(_compile_job, jobs_list):
            results[ident] = rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{unique[ident]['kernel']} sm_{ident[1]} {rec.get('compile_s', '-')} s")
    if bar is not None:
        bar.close()
    out_rows = []
    for r in rows:
        if "spec_id" in r:
            rec = results[r.pop("spec_id")]
            r.update(rec)
            if rec["status"] == "ok":
                ctas, limiter, limits = occupancy(rec["regs"], rec["smem"], rec["num_warps"], r["arch"])
                r.update(ctas_per_sm=ctas, limiter=limiter, occupancy_limits=limits,
                         warps_per_sm=ctas * rec["num_warps"])
            r["violations"] = violations(r)
        out_rows.append(r)
    out_rows.sort(key=lambda r: (r.get("kernel") or "", r["case"], -r["arch"]))
    import torch
    import triton
    doc = {
        "schema_version": SCHEMA_VERSION,
        "mode": "ci" if subset is not None else "full",
        "machine": {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                    "commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "jobs": jobs, "ptxas": _ptxas_versions(archs)},
        "archs": {str(a): ARCHS[a] for a in archs},
        "budgets": {k: (v if not isinstance(v, dict) else {str(a): n for a, n in v.items()})
                    for k, v in BUDGETS.items()},
        "seed_regression": os.environ.get("FRACTAL_AOT_SEED_REGRESSION") or None,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "capture_s": round(t_capture, 1),
        "compile_wall_s": round(time.perf_counter() - t_compile, 1),
        "compiles": len(jobs_list),
        "captured": sorted({(l.get("kernel") or "", l["case"], l["arch"]) for l in launches}),
        "rows": out_rows,
    }
    doc["gate_problems"] = gate_problems(out_rows)
    return doc


def _ptxas_versions(archs: Sequence[int]) -> Dict[str, str]:
    out = {}
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for a in archs:
            t = get_ptxas(a)
            out[f"sm_{a}"] = f"{os.path.basename(t.path)} {t.version}"
    except Exception as e:  # informational only
        out["error"] = str(e)[:200]
    return out
