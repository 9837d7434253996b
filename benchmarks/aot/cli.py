"""``python -m benchmarks.aot`` / ``fractal-bench --aot``: the command line (replays itself in a clean process
where ``TRITON_INTERPRET=1`` is set)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import List, Optional

from .budgets import ARCHS, CI_SUBSET
from .caselist import capture
from .compiling import run
from .report import (DOCS_PAGE, RESULTS_DIR, _BENCH_DIR, _atomic_write, known_literal, latest_doc, markdown,
                     summary_table, update_docs_table, write)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # triton.jit has made interpreter objects in this process (or will): replay in a clean one
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(_BENCH_DIR)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        module = __spec__.parent if __spec__ is not None else "benchmarks.aot"  # the package: its __main__
        return subprocess.call([sys.executable, "-m", module, *argv], env=env, cwd=root)
    description = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package docstring's first paragraph
    p = argparse.ArgumentParser(prog="python -m benchmarks.aot", description=description)
    p.add_argument("--ci", action="store_true", help="compile the CI subset (CI_SUBSET) only")
    p.add_argument("--check", action="store_true", help="exit 1 listing every gate problem")
    p.add_argument("--docs", "--readme", dest="docs", action="store_true",
                   help="write summary.md and fill the aot-table block of docs/benchmarks.md from the latest "
                        "results (nothing compiled; --readme is the old name)")
    p.add_argument("--list", action="store_true", help="print the captured specializations and exit")
    p.add_argument("--list-json", default=None, metavar="PATH", help="write the captured launches as JSON and exit")
    p.add_argument("--case", action="append", default=None, help="only this case label (repeatable)")
    p.add_argument("--print-known", action="store_true", help="print a KNOWN_OVER_BUDGET literal for the "
                                                              "violations of the latest results (nothing compiled)")
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="compile processes (default 1: shared machine)")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--stem", default=None, help="output file stem (default: ci or full)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            p.error(f"--arch: {a} not in {sorted(ARCHS)}")
    if args.print_known:
        doc = latest_doc(args.out_dir, prefer=("ci", "full"))
        if doc is None:
            print(f"no results under {args.out_dir}", file=sys.stderr)
            return 2
        print(known_literal(doc["rows"]))
        return 0
    if args.docs:
        doc = latest_doc(args.out_dir)
        if doc is None:
            print(f"no results under {args.out_dir}; run python -m benchmarks.aot first", file=sys.stderr)
            return 2
        table = summary_table(doc)
        _atomic_write(os.path.join(args.out_dir, "summary.md"), "# AOT summary\n\n" + table)
        print(table)
        page = os.path.relpath(DOCS_PAGE)
        print(f"{page} updated" if update_docs_table(table) else f"{page} not found or without aot-table markers; not changed")
        return 0
    subset = CI_SUBSET if args.ci else None
    labels = set(args.case) if args.case else None
    if args.list_json:
        _atomic_write(args.list_json, json.dumps(capture(archs, labels), indent=1) + "\n")
        return 0
    if args.list:
        for l in capture(archs, labels):
            if l.get("capture_error"):
                print(f"REPLAY FAILED sm_{l['arch']} {l['case']}: {l['capture_error']}")
            else:
                print(f"sm_{l['arch']} {l['kernel']:24s} {l['case']:55s} {l['options']} {l['constexpr_values']}")
        return 0
    if labels is not None and subset is not None:
        subset = [(k, c) for k, c in subset if c in labels]
    doc = run(archs, subset, jobs=args.jobs, progress=not args.no_progress, case_labels=labels)
    paths = write(doc, args.out_dir, args.stem)
    print(markdown(doc).split("\n## Specializations")[0])
    print("wrote " + ", ".join(paths.values()))
    if args.check and doc["gate_problems"]:
        print(f"\n{len(doc['gate_problems'])} gate problem(s):", file=sys.stderr)
        for prob in doc["gate_problems"]:
            print("  " + prob, file=sys.stderr)
        return 1
    return 0
