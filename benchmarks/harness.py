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
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from fractal_kernels._io import atomic_write  # noqa: F401  (the suite writes its files through it)

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
    from .paths import in_checkout
    if not in_checkout():  # installed: git here would describe whatever repository holds site-packages
        return "unknown (installed package)"
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


def median_time(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 5) -> float:
    """The middle (upper middle for an even count) of :func:`time_fn`'s timings, in seconds."""
    times = sorted(time_fn(fn, device, warmup=warmup, repeats=repeats))
    return times[len(times) // 2]


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


def failed(row: Dict[str, Any]) -> bool:
    """A row that must fail the run: an upper-case check (a wrong output, a fallback) or an error."""
    return bool((row.get("check") or "").isupper() or (row.get("skipped") or "").startswith("error"))


def failure(text: str) -> str:
    """A check that fails its row (the convention: the whole check string is upper-case)."""
    return text.upper()


# ------------------------------------------------------------------------- which backend ran (no silent fallback)
KERNEL_OPS = ("sample_logits", "pixel_cross_entropy", "pixel_head_sample", "tiny_attention", "tiny_attention_decode")
_FALLBACK = re.compile(r"fall(s|ing)? back|fallback", re.IGNORECASE)


class Dispatched:
    """Which backend every ``fractal_kernels`` op ran on inside a ``with`` block (``dispatch.last_backend``,
    cleared on entry), and the fallback warnings raised there (the fused pixel head's ``auto`` path warns once
    and switches to PyTorch for good: inside a measured row that is a failure, not a footnote).

    ``ran``: ``{op: backend}`` for the ops that ran; ``fallbacks``: the warning texts; ``warnings``: all of them."""

    def __init__(self, ops: Sequence[str] = KERNEL_OPS):
        self.ops = tuple(ops)
        self.ran: Dict[str, str] = {}
        self.fallbacks: List[str] = []
        self.warnings: List[str] = []

    def __enter__(self) -> "Dispatched":
        from fractal_kernels import dispatch
        for op in self.ops:
            dispatch.forget(op)
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        from fractal_kernels import dispatch
        self._catch.__exit__(*exc)
        for op in self.ops:
            b = dispatch.last_backend(op)
            if b is not None:
                self.ran[op] = b
        self.warnings = [str(w.message) for w in self._caught]
        self.fallbacks = [m for m in self.warnings if _FALLBACK.search(m)]


def allowed_backends(op: str, row_backend: str, device: torch.device) -> Sequence[str]:
    """The backends ``op`` may run on in a row that names ``row_backend`` (a model or op backend).

    A forced backend runs there, except where the library documents a substitute: a ``cuda`` row runs the
    ops without a CUDA-extension kernel (the pixel head; attention dropout) on Triton. ``auto`` on a CPU: the
    compiled CPU kernels for their ops (``dispatch.CPU_OPS``), PyTorch for the rest; ``auto`` on a GPU: never
    the PyTorch reference (SDPA for attention past the measured crossover is the dispatcher's own choice)."""
    from fractal_kernels import dispatch
    if row_backend == "cuda":
        return ("cuda",) if op in dispatch.CUDA_SYMBOLS else ("triton",)
    if row_backend == "auto":
        if device.type == "cuda":
            return ("cuda", "triton", "sdpa")
        return ("cpu",) if op in dispatch.CPU_OPS and dispatch.backend_report()["cpu"][0] else ("torch",)
    return (row_backend,)


def dispatch_failure(d: Dispatched, row_backend: str, device: torch.device, required: Iterable[str] = ()) -> Optional[str]:
    """None if every op of ``d`` ran where a ``row_backend`` row must run it and every ``required`` op ran at
    all, with no fallback warning; else the upper-case failure for the row's check."""
    problems = [f"fallback warning: {m[:160]}" for m in d.fallbacks]
    for op in required:
        if op not in d.ran:
            problems.append(f"{op} did not run (expected on {'/'.join(allowed_backends(op, row_backend, device))})")
    for op, b in d.ran.items():
        ok = allowed_backends(op, row_backend, device)
        if b not in ok:
            problems.append(f"{op} ran on {b}, not {'/'.join(ok)}")
    return failure("; ".join(problems)) if problems else None


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
            analytic = ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items())
            why = r["skipped"] + (f"; {analytic}" if analytic else "")
            lines.append(f"| {r['suite']} | {r['name']} | {r['backend']} | {shape} | skipped | | {why} | |")
            continue
        t = r["timing"]
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items())
        median, iqr = (_ms(t["median_s"]), _ms(t["iqr_s"])) if t else ("not timed", "")
        lines.append(f"| {r['suite']} | {r['name']} | {r['backend']} | {shape} | {median} | "
                     f"{iqr} | {metrics} | {r['check'] or ''} |")
    return "\n".join(lines) + "\n"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def _fmt(v: Any) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) and "path" in x for x in v):  # level_paths
        return " ".join(f"L{x['level']}:{x['path']}" for x in v)
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


def _family(r: Dict[str, Any], short: bool = False) -> str:
    """Panel key of a kernel row: one op at one shape family (N varies along the x axis)."""
    sh = r["shape"]
    if r["suite"] == "attention":
        case = {"attn_fwd": "attn fwd", "attn_fwd_bwd": "attn fwd+bwd"}.get(r["name"], r["name"])
        if short:
            return f"{case}\n{sh.get('tag', '')}"
        return (f"{case} {sh.get('tag', '')}: L={sh['L']} H={sh['H']} D={sh['D']}"
                + (" causal" if sh.get("causal") else "") + f" {sh.get('dtype', '')}")
    if r["name"] == "sampler":
        return f"sampler\ncfg={sh.get('cfg')}" if short else f"pixel sampler V={sh.get('V')} cfg={sh.get('cfg')} {sh.get('dtype', '')}"
    rest = " ".join(f"{k}={v}" for k, v in sh.items() if k not in ("N", "V"))
    name = {"cross_entropy_fwd_bwd": "cross-entropy fwd+bwd"}.get(r["name"], r["name"])
    return f"{name}\n{rest}" if short else f"{name} {rest}"


def plot_results(doc: Dict[str, Any], path: str) -> Optional[str]:
    """One PNG: GB/s vs N per backend (one panel per op/shape family, log-x, with the copy bandwidth of the
    same run), speedup bars vs each family's baseline at its largest N, and end-to-end images/s.
    ``None`` if matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.gridspec import GridSpec
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return None
    done = [r for r in doc["rows"] if not r["skipped"] and r["timing"]]
    e2e = [r for r in done if "images_per_s" in r["metrics"]]
    if any(r["suite"] == "e2e" for r in e2e):  # the opcount suite times the same cases: plot them once
        e2e = [r for r in e2e if r["suite"] == "e2e"]
    bw_rows = [r for r in done if "GB_per_s" in r["metrics"] and "N" in r["shape"]]
    sp_rows = [r for r in done if "speedup_vs_reference" in r["metrics"] and "N" in r["shape"]]
    oc_rows = [r for r in doc["rows"] if not r["skipped"] and "ops" in r["metrics"]]  # counted, maybe untimed
    if not e2e and not bw_rows and not sp_rows and not oc_rows:
        return None

    families: Dict[str, Dict[str, List[Any]]] = {}
    for r in bw_rows:
        families.setdefault(_family(r), {}).setdefault(r["backend"], []).append(r)
    backends = sorted({r["backend"] for r in bw_rows + sp_rows})
    cmap = plt.get_cmap("tab20")
    color = {b: cmap(i % 20) for i, b in enumerate(backends)}
    copy_gbps = [r["metrics"]["GB_per_s"] * 100 / r["metrics"]["pct_copy_bw"] for r in bw_rows
                 if r["metrics"].get("pct_copy_bw")]

    ncols = 4
    nfam_rows = -(-len(families) // ncols)
    heights = [3.0] * nfam_rows + ([3.6] if sp_rows else []) + ([3.2] if e2e else []) + ([3.2] if oc_rows else [])
    fig = plt.figure(figsize=(20, sum(heights) + 1.6))
    gs = GridSpec(len(heights), ncols, figure=fig, height_ratios=heights, hspace=0.75, wspace=0.25)
    m = doc["machine"]
    fig.suptitle(f"fractal-bench {doc['mode']} - {m['device']} - {m['date'][:10]} - torch {m['torch']} - "
                 f"commit {m['commit']}", fontsize=12)

    for i, (fam, series) in enumerate(families.items()):  # run order: each shape's fwd beside its fwd+bwd
        ax = fig.add_subplot(gs[i // ncols, i % ncols])
        for b, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["shape"]["N"])
            ax.plot([r["shape"]["N"] for r in rs], [r["metrics"]["GB_per_s"] for r in rs], marker="o", ms=4,
                    color=color[b], label=b)
        if copy_gbps:
            cb = statistics.median(copy_gbps)
            ax.axhline(cb, color="k", ls="--", lw=0.8)
            if fam.startswith("attn_fwd "):
                ax.axhline(0.85 * cb, color="k", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(fam, fontsize=8)
        ax.set_xlabel("N (sequences / rows)", fontsize=7)
        ax.set_ylabel("effective GB/s", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)

    row = nfam_rows
    if sp_rows:  # speedup vs the family's baseline (reference) at the largest N of each family
        ax = fig.add_subplot(gs[row, :])
        row += 1
        groups: Dict[str, Dict[str, float]] = {}
        largest: Dict[str, int] = {}
        for r in sp_rows:
            fam = _family(r, short=True)
            largest[fam] = max(largest.get(fam, 0), r["shape"]["N"])
        for r in sp_rows:
            fam = _family(r, short=True)
            if r["shape"]["N"] == largest[fam]:
                groups.setdefault(f"{fam}\nN={largest[fam]}", {})[r["backend"]] = r["metrics"]["speedup_vs_reference"]
        names = list(groups)
        used = sorted({b for g in groups.values() for b in g})
        width = 0.8 / max(1, len(used))
        for j, b in enumerate(used):
            xs = [i + (j - (len(used) - 1) / 2) * width for i, n in enumerate(names) if b in groups[n]]
            ys = [groups[n][b] for n in names if b in groups[n]]
            ax.bar(xs, ys, width=width, color=color[b], label=b)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel("speedup vs reference (x)", fontsize=8)
        ax.set_title("speedup over each family's baseline (reference = 1x) at the largest N measured", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    handles = {}
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if copy_gbps:
        from matplotlib.lines import Line2D
        handles["copy bandwidth (same run)"] = Line2D([], [], color="k", ls="--", lw=0.8)
        handles["85% of copy (attn fwd target)"] = Line2D([], [], color="k", ls=":", lw=0.8)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=min(7, len(handles)),
                   fontsize=8, bbox_to_anchor=(0.5, 1 - 0.45 / (sum(heights) + 1.6)), frameon=False)

    if e2e:  # images/s per config, one bar per e2e case
        ax = fig.add_subplot(gs[row, :])
        configs = sorted({r["shape"].get("config", "?") for r in e2e})
        cases = sorted({r["name"] for r in e2e})
        width = 0.8 / max(1, len(cases))
        for j, c in enumerate(cases):
            pts = [(configs.index(r["shape"].get("config", "?")), r["metrics"]["images_per_s"]) for r in e2e
                   if r["name"] == c]
            xs = [p[0] + (j - (len(cases) - 1) / 2) * width for p in pts]
            bars = ax.bar(xs, [p[1] for p in pts], width=width, label=c, color=plt.get_cmap("Set2")(j))
            ax.bar_label(bars, labels=[f"{p[1]:.3g}" for p in pts], fontsize=6)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("images / s", fontsize=8)
        ax.set_title(f"end-to-end images/s (batch per row: see table) - {m['device']}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(True, axis="y", which="both", alpha=0.3)

    if oc_rows:  # operator calls per generate batch, one bar per variant (fewer is better)
        row += 1 if e2e else 0
        ax = fig.add_subplot(gs[row, :])
        configs = sorted({r["shape"].get("config", "?") for r in oc_rows})
        cases = list(dict.fromkeys(r["name"] for r in oc_rows))
        width = 0.8 / max(1, len(cases))
        for j, c in enumerate(cases):
            rs = [r for r in oc_rows if r["name"] == c]
            xs = [configs.index(r["shape"].get("config", "?")) + (j - (len(cases) - 1) / 2) * width for r in rs]
            bars = ax.bar(xs, [r["metrics"]["ops"] for r in rs], width=width, label=c, color=plt.get_cmap("Set1")(j))
            ax.bar_label(bars, fontsize=6, labels=[
                f"{r['metrics']['ops']}" + (f" ({r['metrics']['ops_ratio_faithful_over_fast']:.3g}x fewer)"
                                            if "ops_ratio_faithful_over_fast" in r["metrics"] else "") for r in rs])
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("operator calls / batch", fontsize=8)
        ax.set_title("generate: top-level aten/fractal_kernels operator calls per batch (torch.profiler)", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(True, axis="y", which="both", alpha=0.3)

    fig.subplots_adjust(top=1 - 1.25 / (sum(heights) + 1.6), bottom=0.04, left=0.05, right=0.99)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
