"""The GPU session's pixel-head schedules (``benchmarks.gpu_measure`` section ``pixel_head``; issue #28 item 4).

``fractalar_in64``'s pixel head (width 128, 4 heads, depth 3, condition width 512) with random fp32 weights
(seeded), guided (cfg 3.0, filter_threshold 1e-4), fixed uniforms (a seeded ``[3, B]`` draw; the launch is given
the prewarm's seed too, only so that it binds as the prewarm's launches did and hits their compiled variants), at
B in {1, 8, 64, 512} pixels a call (rows 2B, both CFG halves):

1. ``schedule="persistent"`` first (one launch with grid barriers; never run on a GPU before: a wrong barrier, or
   programs that are not all resident, hangs the launch forever) in a child process, ``python -m
   benchmarks.gpu_pixel_head --persistent-child``. The child prints a stage line before each step and a result
   line per B (the persistent and phases medians, whether their ids are equal). The parent kills it
   :data:`HANG_S` s into a wait for a launch (a stage of :data:`HANG_STAGES`: ``"hung (killed after N s)"``, and
   the persistent schedule is not launched again in this process) or at its timeout (``"timed out ..."``, with
   the stage it was in: compiling is not hanging); the results printed before a kill are kept;
2. ``schedule="tiles"`` vs ``"phases"`` in this process per B: CUDA-event medians, ids equal, the pixels whose
   ids differ, the max abs diff of their debug logits (the launchers' ``logits`` output, a runtime switch);
3. the candidate overlay :data:`CANDIDATE` (:func:`candidate_overlay`, the form of
   ``fractal_kernels/data/block_stack_model.json``, ``"kind": "measured"``): per schedule the measured rows where
   it beat the tile kernel with equal ids (persistent: where it beat both others, only if it completed with ids
   equal at every B it ran), in the section's JSON and written into ``Ctx.files_dir`` (the session's logs, in
   ``logs.tar.gz``: ``$OUT`` holds 8 files already). Never installed here: after review, ``python -m
   benchmarks.gpu_pixel_head --install FILE`` merges it into ``$FRACTAL_HOME/block_stack_model.json``.

Capped at :data:`CAP_S` s (and the measure budget); a batch that would start past it is ``"skipped: budget"``.
On a CPU (dry run): a width-32 head at B in {1, 4}, the Triton kernels under ``TRITON_INTERPRET=1`` (else the
torch reference stands for both schedules), the child skipped, timings ``"skipped: no GPU"``, no candidate.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED = "skipped: no GPU"
CAP_S = 15.0            # of the measure phase's ~95 s
CHILD_TIMEOUT_S = 20.0  # the persistent child's limit, within the cap: at most CHILD_SHARE of what is left
CHILD_SHARE = 0.6
HANG_S = 5.0            # a launch of < 1 ms that has not completed after 5 s never will
HANG_STAGES = ("persistent wait", "persistent timing")  # the child waits on the GPU there (nothing compiles)
REPEATS = 20
CFG, FILTER = 3.0, 1e-4
GPU_SHAPE = dict(width=128, heads=4, depth=3, c_in=512, batches=(1, 8, 64, 512))
DRY_SHAPE = dict(width=32, heads=2, depth=2, c_in=64, batches=(1, 4))
CANDIDATE = "pixel_head_schedule_measured.json"

_PERSISTENT_HUNG: Optional[str] = None  # set once a child hung: the schedule is not launched again here


# ---- inputs and calls (the parent and the child build the same ones) ----------------------------------------

def _weights(shape: Dict[str, Any], device: torch.device):
    """The packed weights of a ``PixelLoss`` of ``shape`` with every parameter random (seeded): matrices
    N(0, 1 / fan-in), LayerNorm scales N(1, 0.1^2), biases N(0, 0.1^2); peaked logits, not flat ones."""
    from fractal_kernels.reference.pixel_head import pack_pixel_head_weights
    from fractal_models.pixelloss import PixelLoss
    m = PixelLoss(c_channels=shape["c_in"], width=shape["width"], depth=shape["depth"], num_heads=shape["heads"])
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r * p.shape[-1] ** -0.5 if p.dim() > 1 else 1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
    return pack_pixel_head_weights(m.eval().to(device))


def _inputs(shape: Dict[str, Any], bsz: int, device: torch.device):
    g = torch.Generator().manual_seed(1000 + bsz)
    cond = torch.randn(2 * bsz, shape["c_in"], generator=g)
    return cond.to(device), torch.rand(3, bsz, generator=g, dtype=torch.float64).to(device)


def _seed() -> int:
    from .aot.caselist import SEED_HI_LO  # the prewarm's: seed_lo binds as i64, as its launches did
    return SEED_HI_LO


def _sample(cond, w, heads: int, u, backend: str, schedule: str) -> torch.Tensor:
    from fractal_kernels import pixel_head_sample
    return pixel_head_sample(cond, w, heads, guided=True, cfg=CFG, filter_threshold=FILTER, uniforms=u, seed=_seed(),
                             backend=backend, schedule=schedule if backend == "triton" else None)


def _logits(cond, w, heads: int, u, backend: str, schedule: str) -> torch.Tensor:
    """The raw logits ``[3, rows, 256]`` of the same call (the launchers' debug output)."""
    if backend != "triton":
        from fractal_kernels.reference.pixel_head import pixel_head_sample_reference
        return pixel_head_sample_reference(cond, w, heads, guided=True, cfg=CFG, inv_temperature=1.0,
                                           filter_threshold=FILTER, top_p=1.0, uniforms=u, return_logits=True)[1]
    from fractal_kernels.ops.pixel_head.launch import _launch_triton
    from fractal_kernels.ops.pixel_head.phased import launch_phased
    rows, s = cond.shape[0], _seed()
    ids = torch.empty(rows // 2, 3, dtype=torch.int64, device=cond.device)
    logits = torch.empty(3, rows, 256, device=cond.device)
    args = (cond, w, heads, True, None, CFG, 1.0, FILTER, 1.0, False, u, s & 0xFFFFFFFF, s >> 32, 0, ids)
    if schedule == "tiles":
        _launch_triton(*args, logits=logits)
    else:
        launch_phased(*args, logits=logits, schedule=schedule)
    return logits


def _ids_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).any(dim=1).sum())


# ---- the persistent schedule in a child process --------------------------------------------------------------

def child_command(batches: Sequence[int], until: float, repeats: int = REPEATS) -> List[str]:
    """The child's command line: ``until`` (``time.time()``) is when it starts no further batch."""
    return [sys.executable, "-m", "benchmarks.gpu_pixel_head", "--persistent-child", "--batches",
            ",".join(str(b) for b in batches), "--until", f"{until:.1f}", "--repeats", str(repeats)]


def _child_main(batches: Sequence[int], until: float, repeats: int) -> int:
    say = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
    if not torch.cuda.is_available():
        say(stage="no GPU")
        return 2
    from .harness import median_time
    dev = torch.device("cuda")
    w = _weights(GPU_SHAPE, dev)
    say(stage="ready")
    for bsz in batches:
        if until - time.time() < 2:
            say(result={"B": bsz, "rows": 2 * bsz, "status": "skipped: budget"})
            continue
        cond, u = _inputs(GPU_SHAPE, bsz, dev)
        run = lambda s: _sample(cond, w, GPU_SHAPE["heads"], u, "triton", s)  # noqa: E731
        say(stage="phases", B=bsz)
        ref = run("phases")
        torch.cuda.synchronize()
        say(stage="persistent launch", B=bsz)  # the first call compiles (host), then enqueues
        got = run("persistent")
        say(stage="persistent wait", B=bsz)
        torch.cuda.synchronize()
        say(stage="persistent timing", B=bsz)
        pers = median_time(lambda: run("persistent"), dev, warmup=2, repeats=repeats)
        say(stage="phases timing", B=bsz)
        ph = median_time(lambda: run("phases"), dev, warmup=2, repeats=repeats)
        say(result={"B": bsz, "rows": 2 * bsz, "persistent_s": pers, "phases_s": ph,
                    "ids_equal": bool(torch.equal(got, ref)), "ids_differing": _ids_differing(got, ref)})
    say(stage="done")
    return 0


def _lines(f) -> List[Dict[str, Any]]:
    f.seek(0)
    out = []
    for line in f.read().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            out.append(d)
    return out


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the measuring process dies, e.g. killed at the measure phase's
    budget (the child's own process group is not the phase's, so the phase's kill would miss a hung child)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(cmd: Sequence[str], timeout_s: float, hang_s: float = HANG_S) -> Dict[str, Any]:
    """Run ``cmd`` (its own process group, killed if this process dies) until it exits, has waited ``hang_s`` s in
    a stage of :data:`HANG_STAGES`, or ``timeout_s`` s have passed; the status and the result lines it printed."""
    from .gpu_session import kill_group
    env = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""))
    t0 = time.monotonic()
    stage, since, killed, rc = None, t0, False, None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             start_new_session=True, preexec_fn=_die_with_parent)
        while rc is None:
            time.sleep(0.05)
            rc = p.poll()
            stages = [(d["stage"], d.get("B")) for d in _lines(out) if "stage" in d]
            if stages and stages[-1] != stage:
                stage, since = stages[-1], time.monotonic()
            now = time.monotonic()
            if rc is None and ((stage and stage[0] in HANG_STAGES and now - since > hang_s) or now - t0 > timeout_s):
                kill_group(p)
                killed = True
                break
        lines = _lines(out)
        err.seek(0)
        err_tail = err.read()[-1500:]
    secs = round(time.monotonic() - t0, 1)
    where = None if stage is None else f"{stage[0]}" + (f" (B={stage[1]})" if stage[1] is not None else "")
    if killed and stage and stage[0] in HANG_STAGES:
        status = f"hung (killed after {secs} s)"
    elif killed:
        status = (f"timed out (killed after {secs} s) in stage {where or 'start-up (nothing printed)'}: not "
                  "waiting on a launch (start-up or compiling)")
    else:
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    rec = {"status": status, "stage": where, "seconds": secs, "timeout_s": round(timeout_s, 1), "hang_s": hang_s,
           "by_batch": [d["result"] for d in lines if "result" in d]}
    if status != "ok":
        rec["stderr_tail"] = err_tail
    return rec


# ---- the section ---------------------------------------------------------------------------------------------

def pixel_head(c, *, child_cmd: Optional[Sequence[str]] = None, child_timeout_s: float = CHILD_TIMEOUT_S,
               hang_s: float = HANG_S) -> Dict[str, Any]:
    """The section (``c``: ``gpu_measure.Ctx``); ``child_cmd`` / ``child_timeout_s`` / ``hang_s`` replace the
    persistent child's command and limits (tests: a ``child_cmd`` runs even without a GPU)."""
    global _PERSISTENT_HUNG
    from fractal_kernels.dispatch import triton_interpreting
    stop = time.perf_counter() + min(CAP_S, c.left() - 5)
    left = lambda: stop - time.perf_counter()  # noqa: E731
    shape = GPU_SHAPE if c.gpu else DRY_SHAPE
    backend = "triton" if c.gpu or triton_interpreting() else "torch"
    out: Dict[str, Any] = {
        "config": "fractalar_in64 pixel head" if c.gpu else "a width-32 head (dry run)",
        **{k: v for k, v in shape.items() if k != "batches"}, "batches": list(shape["batches"]),
        "weights": "float32, random (seeded)", "cfg": CFG, "filter_threshold": FILTER,
        "uniforms": "fixed: a seeded [3, B] float64 draw", "backend": backend,
        "schedules": ["tiles", "phases"] if backend == "triton" else "the torch reference stands for both"}
    if _PERSISTENT_HUNG:
        out["persistent"] = {"status": f"skipped: it hung earlier in this process ({_PERSISTENT_HUNG})"}
    elif child_cmd is None and not c.gpu:
        out["persistent"] = {"status": SKIPPED}
    else:
        timeout = min(child_timeout_s, max(hang_s + 1, CHILD_SHARE * left()))
        cmd = child_cmd or child_command(shape["batches"], time.time() + timeout - 1)
        out["persistent"] = rec = run_child(cmd, timeout, hang_s)
        if rec["status"].startswith("hung"):
            _PERSISTENT_HUNG = rec["status"]
    w = _weights(shape, c.device)
    rows: List[Dict[str, Any]] = []
    for bsz in shape["batches"]:
        if left() < 2:
            rows.append({"B": bsz, "rows": 2 * bsz, "status": "skipped: budget"})
            continue
        rows.append(_compare(c, w, shape, bsz, backend))
    out["by_batch"] = rows
    if not c.gpu:
        out["candidate_overlay"] = SKIPPED
        return out
    cap = torch.cuda.get_device_capability()
    doc = candidate_overlay(rows, out["persistent"], device=torch.cuda.get_device_name(), arch=10 * cap[0] + cap[1],
                            width=shape["width"])
    out["candidate_overlay"] = doc
    out["candidate_file"] = write_candidate(doc, c.files_dir) if getattr(c, "files_dir", None) else None
    return out


def _compare(c, w, shape: Dict[str, Any], bsz: int, backend: str) -> Dict[str, Any]:
    cond, u = _inputs(shape, bsz, c.device)
    heads = shape["heads"]
    row: Dict[str, Any] = {"B": bsz, "rows": 2 * bsz}
    ids = {s: _sample(cond, w, heads, u, backend, s) for s in ("tiles", "phases")}  # (first calls compile)
    for s in ("tiles", "phases"):
        row[f"{s}_s"] = c.time(lambda s=s: _sample(cond, w, heads, u, backend, s), repeats=REPEATS, warmup=2)
    row["ids_equal"] = bool(torch.equal(ids["tiles"], ids["phases"]))
    row["ids_differing"] = _ids_differing(ids["tiles"], ids["phases"])
    la, lb = (_logits(cond, w, heads, u, backend, s) for s in ("tiles", "phases"))
    row["logits_max_abs_diff"] = float((la - lb).abs().max())
    t, p = row["tiles_s"], row["phases_s"]
    if isinstance(t, float) and isinstance(p, float) and p > 0:
        row["tiles_over_phases"] = round(t / p, 3)
    return row


# ---- the candidate overlay -----------------------------------------------------------------------------------

def _ranges(points: Sequence[tuple]) -> List[List[int]]:
    """Inclusive ``[lo, hi]`` runs of consecutive points ``(n, wins)`` (sorted by n) where ``wins``: the cost
    model's crossover ranges, so a measured file has the MODEL's form."""
    from .costmodel.crossover import ranges
    return ranges([w for _, w in points], [n for n, _ in points])


def candidate_overlay(by_batch: Sequence[Dict[str, Any]], persistent: Dict[str, Any], *, device: str, arch: int,
                      width: int = 128, date: Optional[str] = None) -> Dict[str, Any]:
    """The measured crossover document (``block_stack_model.json``'s form) from the section's ``by_batch`` rows
    and the persistent child's record: ``fused_n`` of ``pixel_head_phases`` = runs of measured rows where phases
    beat tiles with equal ids; of ``pixel_head_persistent`` = where persistent beat tiles and phases (written only
    when the child exited cleanly with equal ids at every B it ran). Rows not measured break a run; no phases
    entry when no row was measured."""
    from fractal_kernels.policy import PIXEL_PERSISTENT_OP, PIXEL_PHASES_OP
    date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    points = sorted(r["rows"] for r in by_batch)
    tiles = {r["rows"]: r["tiles_s"] for r in by_batch if isinstance(r.get("tiles_s"), float)}
    phases = {r["rows"]: r for r in by_batch if r["rows"] in tiles and isinstance(r.get("phases_s"), float)}
    won = {n: r["ids_equal"] and r["phases_s"] < tiles[n] for n, r in phases.items()}

    def entry(fused, medians):
        return {"float32": {f"sm_{arch}": {str(width): {"fused_n": fused, "medians_s": medians}}}}

    entries = {}
    if phases:  # nothing measured: no entry (an empty one would override the MODEL with "never")
        medians = {str(n): {"tiles": tiles[n], "phases": r["phases_s"]} for n, r in phases.items()}
        entries[PIXEL_PHASES_OP] = entry(_ranges([(n, won.get(n, False)) for n in points]), medians)
    ran = {r["rows"]: r for r in persistent.get("by_batch", ()) if isinstance(r.get("persistent_s"), float)}
    if persistent.get("status") != "ok" or not ran:
        why = f"not written: the persistent child's status is {persistent.get('status')!r}" + (
            "" if ran else ", no batch measured")
    elif not all(r["ids_equal"] for r in ran.values()):
        why = "not written: its ids differ from the phases' at B = " + str([r["B"] for r in ran.values()
                                                                            if not r["ids_equal"]])
    else:
        why = "written: completed with ids equal to the phases' at every B it ran"
        pwin = {n: n in tiles and r["persistent_s"] < min(tiles[n], r["phases_s"]) for n, r in ran.items()}
        entries[PIXEL_PERSISTENT_OP] = entry(
            _ranges([(n, pwin.get(n, False)) for n in points]),
            {str(n): {"tiles": tiles.get(n), "phases (child)": r["phases_s"], "persistent": r["persistent_s"]}
             for n, r in ran.items()})
    return {"schema": 1, "kind": "measured", "source": f"{device}, {date}: benchmarks.gpu_measure section pixel_head",
            "note": ("CANDIDATE, not installed: a human reviews it, then `python -m benchmarks.gpu_pixel_head "
                     "--install FILE` merges it into $FRACTAL_HOME/block_stack_model.json (docs/first-gpu-run.md). "
                     "fused_n: inclusive [lo, hi] runs of the measured rows per call (both CFG halves; random fp32 "
                     "weights, cfg 3) where the schedule's CUDA-event median beat the tile kernel's with equal ids "
                     "(persistent: beat tiles and phases); rows between or outside the measured ones are not claimed"),
            "measured_rows": sorted(phases), "persistent_entry": why, "entries": entries}


def write_candidate(doc: Dict[str, Any], folder: str) -> str:
    from fractal_kernels import policy
    os.makedirs(folder, exist_ok=True)
    return policy.write_document(os.path.join(folder, CANDIDATE), doc)


def merge_block_stack(base: Optional[Dict[str, Any]], top: Dict[str, Any]) -> Dict[str, Any]:
    """``top``'s entries over ``base``'s, per (op, dtype, arch, width), as the loader applies an overlay."""
    out = copy.deepcopy(base or {})
    entries = out.setdefault("entries", {})
    for op, by_dtype in (top.get("entries") or {}).items():
        for dtype, by_arch in by_dtype.items():
            for arch, by_width in by_arch.items():
                for width, e in by_width.items():
                    entries.setdefault(op, {}).setdefault(dtype, {}).setdefault(arch, {})[width] = e
    out.update(schema=1, kind="measured", sources=list(out.get("sources", [])) + [top.get("source")])
    return out


def install(candidate: str) -> str:
    """Merge a reviewed candidate into ``$FRACTAL_HOME/block_stack_model.json`` (created if absent)."""
    from fractal_kernels import dispatch, policy
    top, status = policy.read_document(candidate)
    if top is None or top.get("kind") != "measured":
        raise SystemExit(f"{candidate}: {status if top is None else 'not a measured document'}; nothing installed")
    dest = policy.overlay_path(policy.BLOCK_STACK)
    base, status = policy.read_document(dest)
    if status.startswith("unreadable"):
        raise SystemExit(f"{dest} is {status}; fix or move it first")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    path = policy.write_document(dest, merge_block_stack(base, top))
    dispatch.reload()
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pixel_head", description=__doc__.split("\n\n")[0])
    p.add_argument("--install", metavar="CANDIDATE", help="merge a reviewed candidate into the overlay")
    p.add_argument("--persistent-child", action="store_true", help="the section's child (GPU)")
    p.add_argument("--batches", default=",".join(str(b) for b in GPU_SHAPE["batches"]))
    p.add_argument("--until", type=float, default=None, help="time.time() after which no batch starts")
    p.add_argument("--repeats", type=int, default=REPEATS)
    args = p.parse_args(argv)
    if args.install:
        print(f"wrote {install(args.install)}")
        return 0
    if args.persistent_child:
        until = args.until if args.until is not None else time.time() + CHILD_TIMEOUT_S
        return _child_main([int(b) for b in args.batches.split(",")], until, args.repeats)
    p.error("give --install CANDIDATE (the section itself runs from python -m benchmarks.gpu_measure)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
