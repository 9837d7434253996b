"""``fractal-bench``: run the benchmark suite, print a table, write JSON + markdown + plot.

    fractal-bench              # --quick: tiny configs, minutes on a CPU
    fractal-bench --full       # + published configs (GPU rows; skipped with the reason on CPU)
    fractal-bench --smoke      # CI: tiny shapes, one repeat
    fractal-bench --aot [...]  # the ahead-of-time compile report/gate (python -m benchmarks.aot; --help there)

Results go to ``benchmarks/results/<device-slug>/<mode>.{json,md,png}`` (``--out-dir`` to change).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import List, Optional

import torch

from benchmarks import attention, kernels, opcount
from benchmarks.cases import MODES, plan
from benchmarks.harness import Row, device_slug, markdown_table, results_document, write_results

DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(mode_name: str, device: torch.device, out_dir: Optional[str], progress: bool = True) -> dict:
    mode = MODES[mode_name]
    thunks = (list(kernels.plan(mode, device)) + list(attention.plan(mode, device)) + list(plan(mode, device))
              + list(opcount.plan(mode, device)))
    rows: List[Row] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(thunks), desc=f"fractal-bench {mode_name}", unit="row")
    for thunk in thunks:
        try:
            out = thunk()
            rows.extend(out if isinstance(out, list) else [out])
        except Exception as e:  # one broken row must not hide the others; it is reported, not timed
            traceback.print_exc()
            rows.append(Row("error", getattr(thunk, "__name__", "row"), "?", {}, skipped=f"error: {e}"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    doc = results_document(rows, device, mode_name)
    out_dir = out_dir or os.path.join(DEFAULT_ROOT, device_slug(device))
    doc["files"] = write_results(doc, out_dir, mode_name)
    return doc


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--aot" in argv:  # everything else on the line goes to benchmarks.aot
        from . import aot
        return aot.main([a for a in argv if a != "--aot"])
    p = argparse.ArgumentParser(prog="fractal-bench", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", dest="mode", const="quick", help="default")
    g.add_argument("--full", action="store_const", dest="mode", const="full")
    g.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="CI: tiny, one repeat")
    g.add_argument("--aot", action="store_true", help="ahead-of-time compile report (python -m benchmarks.aot)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    doc = run(args.mode or "quick", device, args.out_dir, progress=not args.no_progress)
    print(markdown_table(doc))
    skipped = [r for r in doc["rows"] if r["skipped"]]
    if device.type != "cuda":
        print("No GPU here: kernel and published-config rows are GPU-only; CPU rows time the PyTorch paths.")
    for r in skipped:
        print(f"skipped {r['suite']}/{r['name']} {r['shape']}: {r['skipped']}")
    print("wrote " + ", ".join(doc["files"].values()))
    failed = [r for r in doc["rows"] if (r["check"] or "").isupper() or (r["skipped"] or "").startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
