"""The report: the document written as JSON and markdown under ``benchmarks/results/aot/``, the summary table
for the docs page's aot-table block, and the ``KNOWN_OVER_BUDGET`` literal of a run."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .budgets import row_key

# benchmarks/, this package's parent: its results/ folder, and the repo root above it (the docs page)
_BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(_BENCH_DIR, "results", "aot")
# the docs page that shows the summary table between the aot-table markers (the README is a front page now)
DOCS_PAGE = os.path.join(os.path.dirname(_BENCH_DIR), "docs", "benchmarks.md")

# ---- output ----------------------------------------------------------------------------------------------

def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sig_short(r: Dict[str, Any]) -> str:
    ptrs = sorted({t for t in r["signature"].values() if t.startswith("*")})
    return " ".join(ptrs)


def markdown(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# AOT compile report ({doc['mode']})", "",
             f"triton {m['triton']} · torch {m['torch']} · commit `{m['commit']}`{' (dirty)' if m['dirty'] else ''} · "
             f"{m['date']} · host {m['host']} ({m['cpus']} CPUs, -j {m['jobs']}) · ptxas {m['ptxas']}", "",
             f"{len(doc['rows'])} rows, {doc['compiles']} compiles; wall {doc['wall_s']} s (capture "
             f"{doc['capture_s']} s, compiles {doc['compile_wall_s']} s)"
             + (f"; **seeded regression** `{doc['seed_regression']}`" if doc.get("seed_regression") else ""), "",
             "Occupancy is an estimate (64 K registers/SM in 256-register warp units; shared memory + 1 KB per CTA "
             "of 228 KB/SM H100, 164 KB/SM A100; 64 warps, 32 CTAs); `NO LAUNCH` = over the per-block limit. "
             "Compile time: CPU seconds of the compiling process and its ptxas (the budget's measure: a shared "
             "machine stretches wall time), wall seconds in brackets; each in a fresh TRITON_CACHE_DIR after a "
             "warm-up compile of a trivial kernel in that process.", "",
             "| kernel | case | sm | status | regs | spill st/ld B | stack B | smem B | warps | stages | CTAs/SM "
             "[limiter] | LDL/STL | HMMA | HGMMA | compile CPU s (wall) | over budget |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        if r.get("capture_error"):
            lines.append(f"| {r.get('kernel') or '?'} | {r['case']} | {r['arch']} | replay failed: "
                         f"{r['capture_error'][:120]} |" + " |" * 12)
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['kernel']} | {r['case']} | {r['arch']} | **error** {r['error'][:120]!s} |"
                         + " |" * 11 + " compile_error |")
            continue
        occ = "NO LAUNCH" if r["ctas_per_sm"] == 0 else f"{r['ctas_per_sm']} [{r['limiter']}]"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['arch']} | ok | {r['regs']} | {r['spill_store']}/"
                     f"{r['spill_load']} | {r['stack']} | {r['smem']} | {r['num_warps']} | {r['num_stages']} | {occ} | "
                     f"{r['ldl']}/{r['stl']} | {r['hmma']} | {r['hgmma']} | {r['compile_s']} ({r.get('compile_wall_s', '-')}) | "
                     f"{', '.join(r['violations']) or '-'} |")
    lines += ["", "## Gate", ""]
    probs = doc["gate_problems"]
    lines += [f"- {p}" for p in probs] if probs else ["No problems: every row within budget or listed in KNOWN_OVER_BUDGET."]
    lines += ["", "## Specializations (as the GPU launch binds them)", ""]
    seen = set()
    for r in doc["rows"]:
        if r.get("capture_error") or (r["kernel"], r["case"]) in seen:
            continue
        seen.add((r["kernel"], r["case"]))
        lines.append(f"- `{r['kernel']}` ← {r['case']} ({r['path']}): ptrs {_sig_short(r)}; options "
                     f"{r['options']}; grid {tuple(r['grid'])}; constexprs {r['constexpr_values']}; 16-divisible: "
                     f"{', '.join(r['divisible_16'])}")
    return "\n".join(lines) + "\n"


def write(doc: Dict[str, Any], out_dir: str = RESULTS_DIR, stem: Optional[str] = None) -> Dict[str, str]:
    stem = stem or doc["mode"]
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    _atomic_write(paths["json"], json.dumps(doc, indent=1) + "\n")
    _atomic_write(paths["md"], markdown(doc))
    return paths


# ---- docs table --------------------------------------------------------------------------------------------

TABLE_START, TABLE_END = "<!-- aot-table:start -->", "<!-- aot-table:end -->"


def summary_table(doc: Dict[str, Any]) -> str:
    """One line per (kernel, case): sm_90 and sm_80 side by side."""
    by: Dict[Tuple[str, str], Dict[int, Dict[str, Any]]] = {}
    order: List[Tuple[str, str]] = []
    for r in doc["rows"]:
        if r.get("capture_error"):
            continue
        k = (r["kernel"], r["case"])
        if k not in by:
            by[k] = {}
            order.append(k)
        by[k][r["arch"]] = r

    def cell(r: Optional[Dict[str, Any]]) -> str:
        if r is None:
            return "–"
        if r["status"] != "ok":
            return "**compile error**"
        occ = "NO LAUNCH" if r["ctas_per_sm"] == 0 else f"{r['ctas_per_sm']}"
        tc = r["hgmma"] + r["hmma"]
        spill = r["spill_store"] + r["spill_load"]
        mark = " ⚠" if r["violations"] else ""
        return (f"{r['regs']} / {spill} / {r['smem'] // 1024} KB / {occ} / {tc or '-'} / "
                f"{r['compile_s']:.0f} s{mark}")

    m = doc["machine"]
    what = "every recorded launch" if doc["mode"] == "full" else "the CI subset (one per kernel x dtype class)"
    lines = [f"AOT compile of {what}: triton {m['triton']}, commit `{m['commit']}`, "
             f"{m['date']}; `python -m benchmarks.aot --docs` regenerates this. Cells: registers / spill bytes "
             f"(st+ld) / shared memory / CTAs per SM (estimate) / tensor-core instructions (HGMMA+HMMA) / cold "
             f"compile, CPU seconds; ⚠ = over a budget (benchmarks/aot/budgets.py BUDGETS; details in "
             f"benchmarks/results/aot/{doc['mode']}.md).", "",
             "| kernel | path | sm_90a (H100) | sm_80 (A100) |", "|---|---|---|---|"]
    for k in order:
        lines.append(f"| `{k[0]}` | {k[1]} | {cell(by[k].get(90))} | {cell(by[k].get(80))} |")
    return "\n".join(lines) + "\n"


def known_literal(rows: List[Dict[str, Any]]) -> str:
    """Python source of a KNOWN_OVER_BUDGET dict that lists exactly the violations of ``rows``."""
    lines = ["KNOWN_OVER_BUDGET: Dict[str, List[str]] = {"]
    for r in rows:
        if r.get("violations"):
            lines.append(f"    {row_key(r['kernel'], r['case'], r['arch'])!r}: {r['violations']!r},")
    return "\n".join(lines + ["}"])


def latest_doc(out_dir: str = RESULTS_DIR, prefer: Sequence[str] = ("full", "ci")) -> Optional[Dict[str, Any]]:
    for stem in prefer:
        p = os.path.join(out_dir, f"{stem}.json")
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
    return None


def update_docs_table(table: str, path: str = DOCS_PAGE) -> bool:
    """Fill the docs page's aot-table marker block; False if the markers are absent (nothing written)."""
    if not os.path.exists(path):  # an installed copy (fractal_bench) has no docs/ beside it
        return False
    with open(path) as f:
        text = f.read()
    i, j = text.find(TABLE_START), text.find(TABLE_END)
    if i < 0 or j < i:
        return False
    new = text[:i + len(TABLE_START)] + "\n" + table + text[j:]
    if new != text:
        _atomic_write(path, new)
    return True
