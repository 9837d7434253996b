"""Run each op's tests on a real GPU and record the ops whose CUDA kernels passed in ``cuda_verified.json``
(read by ``fractal_kernels.dispatch``: only listed ops get the CUDA path under ``backend="auto"``).

    FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . --no-deps --no-build-isolation   # build fractal_kernels._C
    python -m benchmarks.verify_cuda              # record into the overlay ($FRACTAL_HOME/cuda_verified.json)
    python -m benchmarks.verify_cuda --package    # record into the package data (fractal_kernels/data/, to commit)

Needs a source checkout (it runs ``tests/``). An op is listed only when all of its test files pass with CUDA
visible and the extension loaded; a failing op is withdrawn (in the overlay that overrides a packaged claim).
The file records device, date, commit and the pytest summary of each op.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from .harness import git_commit
from fractal_kernels import dispatch, policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_TESTS: Dict[str, List[str]] = {
    "sample_logits": ["tests/fractal_kernels/ops/test_sample_logits.py"],
    "pixel_cross_entropy": ["tests/fractal_kernels/ops/test_pixel_cross_entropy.py"],
    "tiny_attention": ["tests/fractal_kernels/ops/test_tiny_attention_cuda.py"],
}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.verify_cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--package", action="store_true",
                   help=f"write the package data ({policy.package_path(policy.VERIFIED)}) instead of the overlay")
    args = p.parse_args(argv)
    target = policy.package_path(policy.VERIFIED) if args.package else policy.overlay_path(policy.VERIFIED)
    missing = [f for files in OP_TESTS.values() for f in files if not os.path.isfile(os.path.join(REPO, f))]
    if missing:
        print(f"verify_cuda: needs a source checkout with the tests ({missing[0]} not under {REPO})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("verify_cuda: no CUDA device visible; nothing verified", file=sys.stderr)
        return 2
    if dispatch._cuda_ext() is None:
        print("verify_cuda: fractal_kernels._C is not built (FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . "
              "--no-deps --no-build-isolation)", file=sys.stderr)
        return 2
    doc = policy.read_document(target)[0] or {}
    ops = set(doc.get("ops", []))
    runs = dict(doc.get("runs", {}))
    for op, files in OP_TESTS.items():
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                           cwd=REPO, capture_output=True, text=True)
        summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        ok = r.returncode == 0 and " passed" in summary  # all skipped (no extension) is not a pass
        print(f"{op}: {'verified' if ok else 'NOT verified'} ({summary})")
        if not ok:
            print(r.stdout[-3000:])
        (ops.add if ok else ops.discard)(op)
        runs[op] = {"passed": ok, "summary": summary, "device": torch.cuda.get_device_name(),
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit()}
    policy.write_document(target, {"ops": sorted(ops), "runs": runs})
    dispatch.reload()
    print(f"wrote {target}: {sorted(ops)}; auto now uses CUDA for {dispatch.cuda_verified_ops()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
