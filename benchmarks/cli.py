"""``fractal-bench``: run the benchmark suite, print a short summary, write the table + JSON + plot.

    fractal-bench              # --quick: tiny configs, minutes on a CPU
    fractal-bench --full       # + published configs (GPU rows; skipped with the reason on CPU)
    fractal-bench --smoke      # CI: tiny shapes, one repeat
    fractal-bench --aot [...]  # the ahead-of-time compile report/gate (python -m benchmarks.aot; --help there)

The terminal gets a summary of this run (device, backends that ran, headline ratios, checks, what could not
run here and, without a GPU, what the GPU rows measure); the full table goes to the results files:
``./fractal-bench-results/<device-slug>/<mode>.{md,json,png}`` (``--output DIR`` for another folder). The
committed reference results under ``benchmarks/results/<device-slug>/`` are written only with
``--update-committed`` (a GPU session that is to commit its figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from typing import List, Optional

import torch

from . import attention, kernels, opcount
from .cases import MODES, plan
from .harness import Row, atomic_write, device_slug, failed, markdown_table, results_document, write_results
from .paths import results_root
from .summary import summary_lines

DEFAULT_ROOT = results_root()  # committed results in a checkout (written only with --update-committed)
USER_ROOT = "fractal-bench-results"  # a user's runs, relative to the working directory


def output_dir(device: torch.device, output: Optional[str] = None, update_committed: bool = False) -> str:
    """Where a run writes: ``output`` as given, else the committed folder with ``update_committed``, else
    ``./fractal-bench-results/<device-slug>``."""
    if output:
        return output
    root = DEFAULT_ROOT if update_committed else os.path.abspath(USER_ROOT)
    return os.path.join(root, device_slug(device))


def run(mode_name: str, device: torch.device, out_dir: Optional[str], progress: bool = True,
        update_committed: bool = False) -> dict:
    out_dir = out_dir or output_dir(device, None, update_committed)
    # the measured Triton/SDPA crossover goes to the policy overlay ($FRACTAL_HOME) that auto-dispatch reads
    mode = dataclasses.replace(MODES[mode_name], crossover_path=None)
    thunks = (list(kernels.plan(mode, device)) + list(attention.plan(mode, device)) + list(plan(mode, device))
              + list(opcount.plan(mode, device)))
    rows: List[Row] = []
    errors: List[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(thunks), desc=f"fractal-bench {mode_name}", unit="row", leave=False)
    for thunk in thunks:
        try:
            out = thunk()
            rows.extend(out if isinstance(out, list) else [out])
        except Exception as e:  # one broken row must not hide the others; it is reported, not timed
            name = getattr(thunk, "__name__", "row")
            errors.append(f"--- {name}\n{traceback.format_exc()}")
            rows.append(Row("error", name, "?", {}, skipped=f"error: {type(e).__name__}: {e}"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    doc = results_document(rows, device, mode_name)
    doc["files"] = write_results(doc, out_dir, mode_name)
    if errors:  # the tracebacks go beside the table, not to the terminal
        log = os.path.join(out_dir, f"{mode_name}.errors.log")
        atomic_write(log, "\n".join(errors).encode())
        doc["files"]["errors"] = log
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
    p.add_argument("--output", "--out-dir", dest="out_dir", default=None, metavar="DIR",
                   help=f"folder for the results files (default ./{USER_ROOT}/<device>)")
    p.add_argument("--update-committed", action="store_true",
                   help="write the committed reference results, benchmarks/results/<device>/ (the measured "
                        "attention crossover always goes to the $FRACTAL_HOME policy overlay)")
    p.add_argument("--table", action="store_true", help="also print the full table")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out_dir = output_dir(device, args.out_dir, args.update_committed)
    doc = run(args.mode or "quick", device, out_dir, progress=not args.no_progress,
              update_committed=args.update_committed)
    if args.table:
        print(markdown_table(doc))
    print("\n".join(summary_lines(doc, {k: os.path.relpath(v) if not os.path.relpath(v).startswith("..") else v
                                        for k, v in doc["files"].items()})))
    return 1 if any(failed(r) for r in doc["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
