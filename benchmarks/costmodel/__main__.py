"""``python -m benchmarks.costmodel``: the per-launch cost MODEL of every published config (or ``--tiny``).

Writes the markdown table (stdout, or ``--md``), ``--json PATH`` (``{"records": [...]}``), ``--png PATH``;
``--out DIR`` writes all three as ``DIR/costmodel.{md,json,png}``; ``--write-policy`` regenerates the package
data ``fractal_kernels/data/block_stack_model.json`` (the modeled crossovers the dispatch reads: fused stacks, the
step alternatives, the pixel-head schedules, PyTorch SDPA vs tiny_attention).
Everything is a MODEL: nothing here runs on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from . import constants as C
from . import crossover, report

TINY = ("tiny_mar", "tiny_ar", "tiny_mar_gp")
POLICY_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "fractal_kernels", "data", "block_stack_model.json")


def _round(x):
    return float(f"{x:.6g}") if isinstance(x, float) else x


def run(configs, batches, doc, hw: str = "H100"):
    records: List[dict] = []
    for config in configs:
        for batch in batches:
            records += report.config_records(config, batch, doc, hw)
    return records


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.costmodel", description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=None, help="configs (default: the five published ones)")
    ap.add_argument("--tiny", action="store_true", help="the tiny configs (CI; counts them on the fly)")
    ap.add_argument("--batches", nargs="*", type=int, default=list(C.BATCHES))
    ap.add_argument("--hardware", default="H100", choices=sorted(C.HARDWARE))
    ap.add_argument("--json", default=None, help="write {'records': [...]} here")
    ap.add_argument("--md", default=None, help="write the markdown here (default: stdout)")
    ap.add_argument("--png", default=None, help="write the plot here")
    ap.add_argument("--out", default=None, help="write DIR/costmodel.{json,md,png}")
    ap.add_argument("--write-policy", action="store_true",
                    help=f"regenerate {os.path.relpath(POLICY_PATH)} (the modeled crossovers of the fused stacks)")
    ap.add_argument("--no-upstream", action="store_true", help="skip the reference-loop vs upstream rows")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    configs = a.configs or (list(TINY) if a.tiny else list(crossover.PUBLISHED))
    doc = crossover.sweep()
    if a.write_policy:
        with open(POLICY_PATH, "w", encoding="utf-8") as f:
            f.write(crossover.dumps(doc))
        print(f"wrote {POLICY_PATH}", file=sys.stderr)
    records = run(configs, a.batches, doc, a.hardware)
    tot = report.totals(records)
    head = report.headline(tot)
    upstream = [] if (a.no_upstream or a.tiny) else report.upstream_rows(doc, a.hardware)
    violations = report.target_violations(records, a.hardware)
    md = report.markdown(records, head, upstream, violations, a.hardware,
                         doc["entries"].get(crossover.attention.OP, {}).get(crossover.DTYPE))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        a.json = a.json or os.path.join(a.out, "costmodel.json")
        a.md = a.md or os.path.join(a.out, "costmodel.md")
        a.png = a.png or os.path.join(a.out, "costmodel.png")
    if a.json:
        keep = report.KEYS + ("level_path", "items_per_cta", "in_flight_bytes", "launch_kind", "n")
        out = {"kind": "MODEL", "hardware": C.HARDWARE[a.hardware]._asdict(), "sources": C.SOURCES,
               "batches": a.batches, "configs": configs, "headline": head, "upstream": upstream,
               "violations_8mb": [{k: r[k] for k in report.KEYS} for r in violations],
               "records": [{k: _round(r[k]) for k in keep} for r in records]}
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, sort_keys=False)
            f.write("\n")
    if a.md:
        with open(a.md, "w", encoding="utf-8") as f:
            f.write(md)
    else:
        print(md)
    if a.png:
        report.plot(records, a.png)
    print(f"costmodel: {len(records)} records, {len(configs)} configs x {len(a.batches)} batches in "
          f"{time.perf_counter() - t0:.1f} s (a MODEL)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
