"""Timing, machine description and result files shared by every benchmark.

Timing: on CUDA, CUDA events around each repeat after warm-up (with an L2 flush between repeats when
asked); on CPU, ``time.perf_counter``. We report the median and the inter-quartile range of the repeats.
Result files are written to a temp file and renamed, so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

SCHEMA_VERSION = 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads visible, torch uses {torch.get_num_threads()})"


def device_slug(device: torch.device) -> str:
    """Folder name for results, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-x86_64``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["cuda"] = info["driver"] = None
    return info


def _flush_l2(device: torch.device, buf: Dict[str, torch.Tensor]) -> None:
    if "l2" not in buf:
        buf["l2"] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    buf["l2"].zero_()


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 5,
            flush_l2: bool = False) -> List[float]:
    """Seconds per call of ``fn`` for each of ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    scratch: Dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        if device.type == "cuda":
            if flush_l2:
                _flush_l2(device, scratch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: List[float]) -> Dict[str, float]:
    """Median, inter-quartile range, min and max of a list of timings (seconds)."""
    s = sorted(times)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = s[-1] - s[0]
    return {"median_s": statistics.median(s), "iqr_s": iqr, "min_s": s[0], "max_s": s[-1], "repeats": len(s)}


@dataclass
class Row:
    """One measured (or skipped) benchmark row; ``metrics`` holds derived figures (images/s, ratios)."""

    suite: str
    name: str
    backend: str
    shape: Dict[str, Any]
    timing: Optional[Dict[str, float]] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    check: Optional[str] = None  # how the output was verified against the baseline
    skipped: Optional[str] = None  # why the row was not measured


def atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def results_document(rows: List[Row], device: torch.device, mode: str) -> Dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "mode": mode, "machine": machine_info(device),
            "rows": [asdict(r) for r in rows]}


def markdown_table(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# fractal-bench results ({doc['mode']})", "",
             f"Device: **{m['device']}** · torch {m['torch']} · triton {m['triton']} · commit `{m['commit']}` · {m['date']}",
             "", "| suite | case | backend | shape | median | IQR | metrics | check |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["skipped"]:
            lines.append(f"| {r['suite']} | {r['name']} | {r['backend']} | {shape} | skipped | | {r['skipped']} | |")
            continue
        t = r["timing"]
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items())
        lines.append(f"| {r['suite']} | {r['name']} | {r['backend']} | {shape} | {_ms(t['median_s'])} | "
                     f"{_ms(t['iqr_s'])} | {metrics} | {r['check'] or ''} |")
    return "\n".join(lines) + "\n"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_results(doc: Dict[str, Any], out_dir: str, stem: str) -> Dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.md`` and (if matplotlib is installed) ``<stem>.png``; returns paths."""
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    atomic_write(paths["json"], (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write(paths["md"], markdown_table(doc).encode())
    png = plot_results(doc, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths


def plot_results(doc: Dict[str, Any], path: str) -> Optional[str]:
    """Throughput bars per case and backend (images/s or rows/s); ``None`` if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in doc["rows"] if not r["skipped"] and "images_per_s" in r["metrics"]]
    bw_rows = [r for r in doc["rows"] if not r["skipped"] and "GB_per_s" in r["metrics"]]
    if not rows and not bw_rows:
        return None
    labels = [f"{r['shape'].get('config', '')}\n{r['name']}\n[{r['backend']}]" for r in rows]
    values = [r["metrics"]["images_per_s"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(rows) + 5), 4.5),
                                  gridspec_kw={"width_ratios": [max(1, len(rows)), 4]})
    ax.bar(range(len(rows)), values, color="tab:blue")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("images / s")
    ax.set_yscale("log")
    m = doc["machine"]
    ax.set_title(f"end-to-end ({doc['mode']}): {m['device']}, {m['date'][:10]}, {m['commit']}", fontsize=8)
    series = {}
    for r in bw_rows:  # GB/s vs N per (case, backend, cfg)
        key = f"{r['name']} [{r['backend']}] cfg={r['shape'].get('cfg', '-')}"
        series.setdefault(key, []).append((r["shape"]["N"], r["metrics"]["GB_per_s"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax2.set_xscale("log")
    ax2.set_xlabel("rows N")
    ax2.set_ylabel("GB/s (bytes the op must read)")
    ax2.set_title("pixel sampler bandwidth", fontsize=8)
    if series:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
