"""The GPU session's driver (``bash benchmarks/gpu_session.sh [--dry-run] [--out DIR] [--cache-archive F]``).

One short GPU window, spent in priority order: each phase has its own budget (:data:`PHASES`, at most
:data:`TOTAL_BUDGET_S` = 540 s in all, a test checks it) and runs as its own process group, killed at its
budget; a phase that fails, times out or is skipped does not stop the next. ``$OUT/phases.json`` is rewritten
as each phase ends: ``name``, ``status`` (ok / failed / skipped / timed_out), ``seconds``, ``budget_s``,
``wrote``, ``note``. The results are at most 8 files in ``$OUT`` (no folders): phases.json, env.json,
prewarm.json, tests.json, microbench.json, sanitizer.json, measure.json and logs.tar.gz (every log, the
test outcomes, the dispatch overlay ``fractal_home/``, the pixel-head candidate overlay
``logs/pixel_head_schedule_measured.json``, not installed), the archive refreshed after every phase.

``--dry-run`` (CI, no GPU): every phase through its real entry point on the CPU -- the test selection with
``pytest --collect-only``, ``fractal-bench --smoke``, a prewarm of a few specializations for sm_90 with a
fresh-process cache-hit check, the microbenchmark, sanitizer launches and measurements on tiny sizes through
the interpreter / reference path; GPU-only steps are recorded ``skipped`` with ``note: "no GPU"``. Exits 1
if any phase failed or timed out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 540
#: --dry-run kills a phase at this multiple of its budget: the CPU run checks the entry points, not the timing,
#: and a shared 2-core CI machine is several times slower than the GPU machine's 16 cores (budget_s is recorded)
DRY_RUN_SLACK = 3
MAX_RESULT_FILES = 8
#: the GPU tests: the kernels (Triton on the GPU, CUDA where built) and the models on the kernel backends
GPU_TESTS = ["tests/fractal_kernels", "tests/models/test_kernel_backends.py", "tests/models/test_fused_stack_mar.py",
             "tests/models/test_fused_stack_ar.py", "tests/models/test_step_graphs.py",
             "tests/models/test_sampling.py::test_cuda_generate_bf16_autocast"]
PER_TEST_TIMEOUT_S = 60
TEST_WORKERS = 8  # xdist processes, files kept together (--dist loadfile): compiles in parallel, one GPU shared


@dataclass
class Phase:
    name: str
    budget_s: int
    wrote: List[str]          # files it promises in $OUT (the archive aside)
    run: Callable[["Session"], Optional[str]] = field(repr=False, default=None)  # returns a note, raises on failure


class Skip(Exception):
    """The phase does not apply here (``note``)."""


class Failed(Exception):
    pass


class Session:
    def __init__(self, out: str, dry_run: bool, cache_archive: Optional[str]):
        self.out, self.dry, self.cache_archive = os.path.abspath(out), dry_run, cache_archive
        os.makedirs(self.out, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="fk-gpu-session-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.home = os.path.join(self.work, "fractal_home")
        self.cache = os.path.join(self.work, "triton_cache")
        self.py = sys.executable
        self.gpu = False
        self.arch = 90
        self.deadline = 0.0       # of the running phase
        self.records: List[Dict] = []
        self.env = dict(os.environ, FRACTAL_HOME=self.home, TRITON_CACHE_DIR=self.cache,
                        PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        self.env.pop("TRITON_INTERPRET", None)

    def sh(self, name: str, cmd: List[str], env: Optional[Dict[str, str]] = None, check: bool = True,
           timeout: Optional[float] = None) -> int:
        """Run ``cmd`` (its own process group) into ``logs/<name>.txt`` until the phase's deadline."""
        left = self.deadline - time.monotonic() if timeout is None else min(timeout, self.deadline - time.monotonic())
        if left <= 1:
            raise subprocess.TimeoutExpired(cmd, 0)
        with open(os.path.join(self.logs, f"{name}.txt"), "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            p = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                kill_group(p)
                log.write("\n[killed at the phase budget]\n")
                raise
            log.write(f"[rc={rc}]\n")
        if check and rc != 0:
            raise Failed(f"{name}: exit {rc} (logs/{name}.txt)")
        return rc

    def out_path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def write_json(self, name: str, doc) -> None:
        tmp = self.out_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, self.out_path(name))

    def pack(self) -> None:
        """logs.tar.gz: logs/, fractal_home/ (the overlay to promote); rewritten after every phase."""
        tmp = self.out_path("logs.tar.gz.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for sub in ("logs", "fractal_home"):
                if os.path.isdir(os.path.join(self.work, sub)):
                    tar.add(os.path.join(self.work, sub), arcname=sub)
        os.replace(tmp, self.out_path("logs.tar.gz"))


def kill_group(p: subprocess.Popen) -> None:
    """SIGTERM the process group of ``p``, then SIGKILL what is left after 3 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- the phases ------------------------------------------------------------------------------------------

def env_phase(s: Session) -> str:
    s.sh("env", [s.py, "-c", "import torch; print(torch.cuda.is_available())"])
    info: Dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "dry_run": s.dry, "cpus": os.cpu_count()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    probe = ("import json, sys, torch, triton; d = {'python': sys.version.split()[0], 'torch': torch.__version__, "
             "'triton': triton.__version__, 'cuda_runtime': torch.version.cuda, 'gpu': torch.cuda.is_available()}\n"
             "if d['gpu']:\n p = torch.cuda.get_device_properties(0)\n"
             " d.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,"
             " l2_bytes=getattr(p, 'L2_cache_size', None), memory_bytes=p.total_memory)\n"
             "print(json.dumps(d))")
    r = subprocess.run([s.py, "-c", probe], cwd=REPO, env=s.env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise Failed(f"torch/triton probe failed: {r.stderr[-500:]}")
    info.update(json.loads(r.stdout.strip().splitlines()[-1]))
    s.gpu = bool(info["gpu"]) and not s.dry
    if s.gpu:
        s.arch = 10 * info["capability"][0] + info["capability"][1]
    for key, cmd in (("nvidia_smi", ["nvidia-smi"]),
                     ("clocks", ["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
                                 "power.limit,memory.total,driver_version", "--format=csv"]),
                     ("nvcc", ["nvcc", "--version"]), ("compute_sanitizer", ["compute-sanitizer", "--version"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            info[key] = (r.stdout + r.stderr).strip()[-3000:]
        except (OSError, subprocess.SubprocessError) as e:
            info[key] = f"unavailable: {type(e).__name__}: {e}"
    for mod in ("xdist", "pytest_timeout", "flash_attn"):
        r = subprocess.run([s.py, "-c", f"import {mod}"], env=s.env, capture_output=True, timeout=60)
        info[f"has_{mod}"] = r.returncode == 0
    s.plugins = info["has_xdist"], info["has_pytest_timeout"]
    s.write_json("env.json", info)
    return f"{info.get('device', 'no GPU')}, torch {info['torch']}, triton {info['triton']}"


def start_build(s: Session) -> None:
    """The CUDA extension's build, started in the background as the prewarm starts: 3 translation units (nvcc and
    torch's headers) beside the prewarm's compiles; the build_ext phase waits for it within its own budget."""
    if not s.gpu or getattr(s, "build_proc", None) is not None:
        return
    env = dict(s.env, FRACTAL_KERNELS_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 1))
    log = open(os.path.join(s.logs, "build_ext.txt"), "a")
    s.build_proc = subprocess.Popen([s.py, "setup.py", "build_ext", "--inplace"], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    s.build_started = time.monotonic()


def prewarm_phase(s: Session) -> str:
    start_build(s)
    os.makedirs(s.cache, exist_ok=True)
    note = ""
    if s.cache_archive:
        with tarfile.open(s.cache_archive) as tar:
            tar.extractall(s.cache)
        note = f"cache from {os.path.basename(s.cache_archive)}; "
    cmd = [s.py, "-m", "benchmarks.prewarm", "--arch", str(s.arch), "--cache-dir", s.cache,
           "--json", s.out_path("prewarm.json")]
    cmd += ["-j", "2", "--limit", "3", "--check-hit"] if s.dry else ["-j", str(os.cpu_count() or 1)]
    s.sh("prewarm", cmd)
    doc = json.load(open(s.out_path("prewarm.json")))
    return (note + f"{doc['specializations']} specializations sm_{s.arch}: wall {doc['wall_s']} s vs serial "
            f"{doc['serial_sum_s']} s" + (f", fresh-process hits {doc['hit_check']['hits']}" if "hit_check" in doc else ""))


def build_phase(s: Session) -> str:
    if not s.gpu:
        raise Skip("no GPU")
    start_build(s)  # normally already running since the prewarm began
    p = s.build_proc
    try:
        rc = p.wait(timeout=max(1.0, s.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_group(p)
        raise
    if rc != 0:
        raise Failed(f"setup.py build_ext: exit {rc} (logs/build_ext.txt)")
    r = subprocess.run([s.py, "-c", "from fractal_kernels import dispatch; print(dispatch._cuda_ext() is not None)"],
                       cwd=REPO, env=s.env, capture_output=True, text=True, timeout=120)
    if r.stdout.strip().endswith("True"):
        return f"fractal_kernels._C built ({time.monotonic() - s.build_started:.0f} s since its start) and loads"
    raise Failed(f"built, but fractal_kernels._C does not load: {r.stderr[-300:]}")


def tests_phase(s: Session) -> str:
    outcomes = os.path.join(s.logs, "test-outcomes.jsonl")
    has_xdist, has_timeout = getattr(s, "plugins", (False, False))
    cmd = [s.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_outcomes", "-rfE"]
    if has_timeout:
        cmd += ["--timeout", str(PER_TEST_TIMEOUT_S)]
    if has_xdist and s.gpu:
        cmd += ["-n", str(TEST_WORKERS), "--dist", "loadfile"]
    if not s.gpu:
        cmd += ["--collect-only"]
    env = dict(s.env, FRACTAL_OUTCOMES=outcomes)
    if not s.gpu:
        env["TRITON_INTERPRET"] = "1"
    timed_out = None
    entries = lambda: len(os.listdir(s.cache)) if os.path.isdir(s.cache) else 0  # noqa: E731
    before = entries()
    try:
        rc = s.sh("gpu_tests", cmd + GPU_TESTS, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        timed_out, rc = e, None
    from .pytest_outcomes import read_lines, summarize
    doc = summarize(read_lines(outcomes))
    doc.update(selection=GPU_TESTS, command=" ".join(cmd[1:]), rc=rc, cut_off=timed_out is not None,
               plugins={"xdist": has_xdist, "pytest_timeout": has_timeout},
               # compiles the prewarm did not foresee (each a new entry of the session's TRITON_CACHE_DIR)
               triton_cache_entries={"before": before, "after": entries()})
    if not s.gpu:
        log = open(os.path.join(s.logs, "gpu_tests.txt")).read()
        doc["collected"] = [l.strip() for l in log.splitlines() if "collected" in l or "tests collected" in l][-1:]
        doc["note"] = "no GPU: --collect-only of the selection"
    s.write_json("tests.json", doc)
    if s.gpu:
        record_verified(s, doc)
    if timed_out is not None:
        raise timed_out
    if not s.gpu:
        if rc != 0:
            raise Failed(f"pytest --collect-only of the GPU selection: exit {rc}")
        # the collect-only path of fractal-bench's smoke run is the CPU check of the benchmark entry point
        s.sh("bench_smoke", [s.py, "-m", "benchmarks.cli", "--smoke", "--no-progress", "--output",
                             os.path.join(s.work, "bench-smoke")], env=dict(s.env, TRITON_INTERPRET="1"))
        return f"collected: {doc['collected']}; fractal-bench --smoke ok"
    t = doc["totals"]
    if rc not in (0, 1):  # 1 = some tests failed: a result (tests.json), not a broken phase
        raise Failed(f"pytest exit {rc}")
    return f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['timed_out']} timed out"


def record_verified(s: Session, doc: Dict) -> None:
    """The overlay's cuda_verified.json from this run's outcomes (``benchmarks.verify_cuda``'s rule: an op is
    verified when every test of its files passed with the extension loaded), without running them again."""
    r = subprocess.run([s.py, "-c", "from benchmarks import verify_cuda, harness; import json, torch; "
                        "from fractal_kernels import dispatch; print(json.dumps([verify_cuda.OP_TESTS, "
                        "dispatch._cuda_ext() is not None, torch.cuda.get_device_name(), harness.git_commit()]))"],
                       cwd=REPO, env=s.env, capture_output=True, text=True, timeout=120)
    op_tests, ext, device, commit = json.loads(r.stdout.strip().splitlines()[-1])
    from .pytest_outcomes import kernel_of
    path = os.path.join(s.home, "cuda_verified.json")
    ops, runs = set(), {}
    for op, files in op_tests.items():
        k = doc["kernels"].get(kernel_of(files[0]), {})
        ok = ext and all(kernel_of(f) in doc["kernels"] for f in files) and k.get("passed", 0) > 0 and not (
            k.get("failed", 0) + k.get("error", 0) + k.get("timed_out", 0))
        if ok:
            ops.add(op)
        runs[op] = {"passed": bool(ok), "summary": {x: k.get(x, 0) for x in ("passed", "failed", "error", "skipped")},
                    "device": device, "commit": commit, "source": "benchmarks/gpu_session.py",
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(s.home, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"ops": sorted(ops), "runs": runs}, f, indent=1, sort_keys=True)


def microbench_phase(s: Session) -> str:
    cmd = [s.py, "-m", "benchmarks.microbench", "--json", s.out_path("microbench.json")]
    env = s.env if s.gpu else dict(s.env, TRITON_INTERPRET="1")
    s.sh("microbench", cmd + ([] if s.gpu else ["--dry-run"]), env=env)
    return "figures beside the constants" if s.gpu else "interpreter, tiny sizes: sums checked, timings skipped: no GPU"


def sanitizer_phase(s: Session) -> str:
    launch = [s.py, "-m", "benchmarks.sanitize_launches"]
    doc: Dict = {"tools": {}}
    if not s.gpu:
        s.sh("sanitizer", launch + ["--dry-run"], env=dict(s.env, TRITON_INTERPRET="1"))
        doc["tools"] = {t: "skipped: no GPU" for t in ("memcheck", "initcheck")}
        doc["launches"] = "dry run: the launches ran on the CPU (Triton interpreter / reference)"
        s.write_json("sanitizer.json", doc)
        return "launch code ran on CPU; compute-sanitizer skipped: no GPU"
    if shutil.which("compute-sanitizer") is None:
        doc["tools"] = {t: "unavailable: no compute-sanitizer on PATH" for t in ("memcheck", "initcheck")}
        s.write_json("sanitizer.json", doc)
        raise Skip("compute-sanitizer not installed")
    each = max(10.0, (s.deadline - time.monotonic()) / 2 - 2)
    for tool in ("memcheck", "initcheck"):
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", "--print-limit", "20", *launch]
        try:
            rc = s.sh(f"sanitizer-{tool}", cmd, check=False, timeout=each)
            text = open(os.path.join(s.logs, f"sanitizer-{tool}.txt")).read()
            refused = "not supported" in text or "Unable to" in text or "permission" in text.lower()
            doc["tools"][tool] = {"rc": rc, "clean": rc == 0, "refused": refused and rc != 0,
                                  "launches": [l for l in text.splitlines() if l.startswith("launch ")],
                                  "errors": [l for l in text.splitlines() if "========= " in l][:40]}
        except subprocess.TimeoutExpired:
            doc["tools"][tool] = "timed_out"
        s.write_json("sanitizer.json", doc)
    bad = [t for t, v in doc["tools"].items() if isinstance(v, dict) and not v["clean"] and not v["refused"]]
    if bad:
        raise Failed(f"sanitizer errors or failed launches: {bad} (sanitizer.json)")
    return "; ".join(f"{t}: {'clean' if isinstance(v, dict) and v['clean'] else v if isinstance(v, str) else 'refused'}"
                     for t, v in doc["tools"].items())


def measure_phase(s: Session) -> str:
    budget = max(5, int(s.deadline - time.monotonic()) - 15)
    # --files-dir: the logs (logs.tar.gz): $OUT holds its 8 files already (the pixel-head candidate overlay)
    cmd = [s.py, "-m", "benchmarks.gpu_measure", "--json", s.out_path("measure.json"), "--budget-s", str(budget),
           "--files-dir", s.logs]
    s.sh("measure", cmd + ([] if s.gpu else ["--dry-run"]))
    doc = json.load(open(s.out_path("measure.json")))
    return ", ".join(f"{k}: {v['status']}" for k, v in doc["sections"].items())


def dispatch_phase(s: Session) -> str:
    s.sh("dispatch", [s.py, "-m", "benchmarks.policy_data", "show"])
    have = sorted(os.listdir(s.home)) if os.path.isdir(s.home) else []
    if not s.gpu:
        return f"policy shown; overlay {have or 'empty'} (verified ops and crossovers: skipped: no GPU)"
    return f"overlay fractal_home/ in logs.tar.gz: {have}; promote: see docs/first-gpu-run.md"


PHASES: List[Phase] = [
    Phase("env", 15, ["env.json"], env_phase),
    Phase("prewarm", 75, ["prewarm.json"], prewarm_phase),
    Phase("build_ext", 60, [], build_phase),
    Phase("gpu_tests", 160, ["tests.json"], tests_phase),
    Phase("microbench", 35, ["microbench.json"], microbench_phase),
    Phase("sanitizer", 60, ["sanitizer.json"], sanitizer_phase),
    Phase("measure", 110, ["measure.json"], measure_phase),
    Phase("dispatch", 20, [], dispatch_phase),
]
RESULT_FILES = ["phases.json", "logs.tar.gz"] + [f for p in PHASES for f in p.wrote]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bash benchmarks/gpu_session.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: every phase's entry point on tiny sizes (CI)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "gpu-session-out"))
    p.add_argument("--cache-archive", default=os.environ.get("FRACTAL_TRITON_CACHE_ARCHIVE"),
                   help="a tar of a TRITON_CACHE_DIR compiled elsewhere (same Triton wheel and Python) to start from")
    p.add_argument("--only", action="append", default=None, help="run only these phases (env always runs)")
    args = p.parse_args(argv)
    s = Session(args.out, args.dry_run, args.cache_archive)
    start = time.monotonic()
    for ph in PHASES:
        rec = {"name": ph.name, "budget_s": ph.budget_s, "status": "ok", "wrote": [], "note": ""}
        t0 = time.monotonic()
        slack = DRY_RUN_SLACK if s.dry else 1
        s.deadline = t0 + max(0.0, min(ph.budget_s * slack, start + TOTAL_BUDGET_S * slack - t0))
        try:
            if args.only and ph.name != "env" and ph.name not in args.only:
                raise Skip("not selected (--only)")
            rec["note"] = ph.run(s) or ""
        except Skip as e:
            rec.update(status="skipped", note=str(e))
        except subprocess.TimeoutExpired:
            rec.update(status="timed_out", note=f"killed at its budget ({ph.budget_s} s)")
        except Exception as e:  # noqa: BLE001 - recorded; the next phase still runs
            rec.update(status="failed", note=f"{type(e).__name__}: {str(e)[:500]}")
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["wrote"] = [f for f in ph.wrote if os.path.exists(s.out_path(f))]
        s.records.append(rec)
        s.write_json("phases.json", {"dry_run": s.dry, "total_budget_s": TOTAL_BUDGET_S, "phases": s.records,
                                     "seconds": round(time.monotonic() - start, 1)})
        s.pack()
        print(f"[gpu_session] {ph.name}: {rec['status']} in {rec['seconds']} s / {ph.budget_s} s -- {rec['note']}",
              flush=True)
    if getattr(s, "build_proc", None) is not None and s.build_proc.poll() is None:
        kill_group(s.build_proc)  # started by the prewarm, its phase not run (--only)
    stray = sorted(set(os.listdir(s.out)) - set(RESULT_FILES))
    if stray:
        print(f"[gpu_session] note: files in {s.out} that this run did not write: {stray}")
    shutil.rmtree(s.work, ignore_errors=True)
    bad = [r["name"] for r in s.records if r["status"] in ("failed", "timed_out")]
    print(f"[gpu_session] done in {round(time.monotonic() - start, 1)} s; results in {s.out}"
          + (f"; FAILED: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
