"""The terminal summary of a ``fractal-bench`` run: what this machine measured, in one screen.

Device and versions; which backends ran (the ``fractal_kernels`` backends the rows recorded, and the
baselines); the headline ratios of this run (fast engine vs the reference loop: images/s and operator calls
per image; fused ops vs their reference); the checks (failed rows listed, one line each); the rows that could
not run here, counted by reason in one line; on a machine without a GPU, what the GPU rows would measure and
how to run them. The full table goes to the results file only.
"""
from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import Any, Dict, List, Optional

from .harness import failed

MAX_FAILED_LISTED = 6


def _rows(doc, suite=None, name=None, measured=True):
    out = []
    for r in doc["rows"]:
        if suite and r["suite"] != suite or name and r["name"] != name:
            continue
        if measured and r["skipped"]:
            continue
        out.append(r)
    return out


def _x(v: float) -> str:
    return f"{v:.2g}x" if v < 10 else f"{v:.0f}x"


def _n(v: float) -> str:
    return f"{v:,.0f}".replace(",", " ") if v >= 100 else f"{v:.3g}"


def _geomean(xs: List[float]) -> float:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _skip_reason(text: str) -> str:
    t = text.lower()
    if "interpreter" in t and "gpu-only" not in t:
        return "Triton-interpreter only (tested, not timed)"
    if "gpu" in t or "cuda" in t or "h100" in t:
        return "need a GPU"
    if "not importable" in t or "not installed" in t:
        return "optional library missing"
    if t.startswith("quick mode"):
        return "left to --full (quick mode)"
    if t.startswith("refused"):
        return "refused by the backend"
    if "memory" in t:
        return "too big for this device"
    return "other"


def _generate_lines(doc) -> List[str]:
    """Per tiny config: faithful images/s and each fast variant's, plus operator calls per image."""
    lines = []
    e2e = _rows(doc, "e2e")
    ops = _rows(doc, "opcount")
    configs = list(OrderedDict.fromkeys(r["shape"].get("config") for r in e2e if r["name"].startswith("generate")))
    for config in configs:
        base = [r for r in e2e if r["name"] == "generate[faithful]" and r["shape"].get("config") == config]
        if not base or not base[0]["timing"]:
            continue
        parts = [f"faithful {base[0]['metrics']['images_per_s']:.3g}"]
        for r in e2e:
            if r["name"] == "generate[fast]" and r["shape"].get("config") == config and r["timing"]:
                sp = r["metrics"].get("speedup_vs_faithful")
                parts.append(f"fast[{r['backend']}] {r['metrics']['images_per_s']:.3g}" + (f" ({_x(sp)})" if sp else ""))
        batch = base[0]["shape"].get("batch")
        lines.append(f"  {config:<12} images/s (batch {batch}): " + ", ".join(parts))
        for r in e2e:
            paths = r["metrics"].get("level_paths") if r["name"] == "generate[fast]" else None
            if r["shape"].get("config") == config and isinstance(paths, list):
                lines.append(" " * 15 + f"level paths [{r['backend']}]: " + "; ".join(
                    f"L{p['level']} {p['path']}" + ("" if p["path"] == "pixel_head" else f" ({p['why'].split(' (')[0]})")
                    for p in paths))
        oc = {r["name"]: r for r in ops if r["shape"].get("config") == config}
        if "generate[faithful]" in oc:
            f = oc["generate[faithful]"]["metrics"]["ops_per_image"]
            counted = [f"faithful {_n(f)}"]
            for name, label in (("generate[fast]", "torch"), ("generate[fast,auto]", "auto"),
                                ("generate[fast,kernels]", "kernels")):
                if name in oc:
                    m = oc[name]["metrics"]
                    counted.append(f"{label} {_n(m['ops_per_image'])} ({_x(m['ops_ratio_faithful_over_fast'])} fewer)")
            lines.append(" " * 15 + "operator calls/image: " + ", ".join(counted))
    return lines


def _kernel_lines(doc) -> List[str]:
    """Fused/our ops against their reference, at the largest measured size of each family."""
    out = []
    for name, label in (("sampler", "pixel sampler"), ("cross_entropy_fwd_bwd", "cross-entropy fwd+bwd")):
        rows = [r for r in _rows(doc, "pixel", name) if "speedup_vs_reference" in r["metrics"]
                and r["backend"] not in ("reference", "reference-seq")]
        if not rows:
            continue
        big = max(r["shape"]["N"] for r in rows)
        best: Dict[str, float] = {}
        for r in rows:
            if r["shape"]["N"] == big:
                best[r["backend"]] = max(best.get(r["backend"], 0.0), r["metrics"]["speedup_vs_reference"])
        out.append(f"{label} (N={big}): " + ", ".join(f"{b} {_x(v)}" for b, v in best.items()))
    attn = [r for r in _rows(doc, "attention") if "speedup_vs_reference" in r["metrics"]
            and r["name"] in ("attn_fwd", "attn_fwd_bwd")]
    if attn:
        groups = len({(r["name"], r["shape"].get("tag"), r["shape"].get("N")) for r in attn})
        per: Dict[str, List[float]] = OrderedDict()
        for r in attn:
            if r["backend"] != "reference":
                per.setdefault(r["backend"], []).append(r["metrics"]["speedup_vs_reference"])
        out.append(f"attention vs reference ({groups} shape groups, geomean): "
                   + ", ".join(f"{b} {_x(_geomean(v))}" for b, v in per.items()))
    return out


def _gpu_lines(doc, skipped: List[Dict[str, Any]]) -> List[str]:
    """What the GPU rows would measure (from the analytic figures the skipped rows carry) and how to run them."""
    lines = ["on a GPU the skipped rows measure:"]
    target = [r for r in skipped if r["suite"] == "attention" and "target_pct_copy_bw" in r["metrics"]]
    if target:
        m, sh = target[0]["metrics"], target[0]["shape"]
        lines.append(f"  attention kernels (Triton, CUDA), bf16; target L={sh['L']} D={sh['D']} "
                     f"N*H=2^{int(math.log2(sh['NH']))}: {m['bytes_min_bf16'] / 1e6:.0f} MB fwd in "
                     f"{m['target_s_at_85pct_of_3.0TBps'] * 1e6:.0f} us (85% of 3.0 TB/s), >= 3x best SDPA")
    samp = [r for r in skipped if r["name"] == "sampler" and "target_s_at_70pct_of_3.0TBps" in r["metrics"]]
    if samp:
        r = max(samp, key=lambda r: r["metrics"]["bytes_min"])
        lines.append(f"  fused sampler + cross-entropy (Triton, CUDA): sampler N={r['shape']['N']} cfg "
                     f"{r['shape']['cfg']} reads {r['metrics']['bytes_min'] / 1e6:.1f} MB: "
                     f"{r['metrics']['target_s_at_70pct_of_3.0TBps'] * 1e6:.1f} us at 70% of 3.0 TB/s")
    if any(r["suite"] in ("e2e", "opcount") for r in skipped):
        lines.append("  generate/train on the fused kernels; --full: published configs (fractalmar_in64 batch 256, "
                     "fractalmar_large_in256 batch 64)")
    lines.append("  run them with a CUDA torch on an NVIDIA GPU: fractal-bench --full "
                 "(bash benchmarks/gpu_session.sh also builds and verifies the CUDA extension)")
    return lines


def summary_lines(doc: Dict[str, Any], files: Optional[Dict[str, str]] = None) -> List[str]:
    """The summary of a results document, one screen (about 20 lines on a CPU machine)."""
    m = doc["machine"]
    rows = doc["rows"]
    lines = [f"fractal-bench {doc['mode']} on {m['device']} · torch {m['torch']} · triton {m['triton']} · "
             f"commit {m['commit']}"]
    ran: Counter = Counter()
    for r in rows:
        for b in (r["metrics"].get("ran_on") or {}).values():
            ran[b] += 1
    kinds = {"torch": "torch (PyTorch math)", "cpu": "cpu (compiled C++ pixel head)", "triton": "triton",
             "cuda": "cuda (extension)", "sdpa": "sdpa"}
    baselines = sorted({r["backend"] for r in rows if r["timing"] and not r["metrics"].get("ran_on")
                        and (r["backend"].startswith(("sdpa[", "reference", "flash", "flex", "torch.compile")))})
    lines.append("backends that ran: fractal_kernels ops on " + (", ".join(kinds.get(b, b) for b in ran) or "none")
                 + ("; baselines " + ", ".join(baselines) if baselines else ""))
    gen = _generate_lines(doc)
    if gen:
        lines.append("fast generation engine vs the reference loop (same weights, seed, batch):")
        lines += gen
    ker = _kernel_lines(doc)
    if ker:
        lines.append("ops vs their reference, same run: " + ker[0])
        lines += ["  " + k for k in ker[1:]]
    measured = [r for r in rows if not r["skipped"]]
    bad = [r for r in rows if failed(r)]
    if bad:
        lines.append(f"checks: {len(bad)} of {len(measured) + sum(1 for r in rows if failed(r) and r['skipped'])} "
                     f"rows FAILED:")
        for r in bad[:MAX_FAILED_LISTED]:
            why = r["check"] if not r["skipped"] else r["skipped"]
            shape = ",".join(f"{k}={v}" for k, v in r["shape"].items() if k in ("config", "tag", "N", "cfg", "C"))
            lines.append(f"  FAILED {r['suite']}/{r['name']}[{r['backend']}] {shape}: {why[:200]}")
        if len(bad) > MAX_FAILED_LISTED:
            lines.append(f"  ... and {len(bad) - MAX_FAILED_LISTED} more (see the results file)")
    else:
        lines.append(f"checks: all {len(measured)} measured rows passed (outputs against the reference of this run, "
                     f"backends as named, no fallback)")
    skipped = [r for r in rows if r["skipped"] and not r["skipped"].startswith("error")]
    if skipped:
        why = Counter(_skip_reason(r["skipped"]) for r in skipped)
        lines.append(f"not run here: {len(skipped)} rows (" + ", ".join(f"{n} {k}" for k, n in why.most_common())
                     + "); listed in the results file")
    if m.get("device_type") != "cuda":
        lines += _gpu_lines(doc, skipped)
    if files:
        main = files.get("md") or next(iter(files.values()))
        rest = [p.rsplit(".", 1)[-1] for k, p in files.items() if p != main]
        lines.append(f"full table: {main}" + (f" (+ {', '.join(rest)})" if rest else ""))
    return lines
