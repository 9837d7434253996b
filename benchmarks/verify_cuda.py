"""Run each op's tests on a real GPU and record the ops whose CUDA kernels passed in
``benchmarks/results/cuda_verified.json`` (read by ``fractal_kernels.dispatch``: only listed ops get the CUDA
path under ``backend="auto"``).

    FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . --no-deps --no-build-isolation   # build fractal_kernels._C
    python -m benchmarks.verify_cuda                                                # then this

An op is listed only when all of its test files pass with CUDA visible and the extension loaded; a failing
op is removed from the list. The file records device, date, commit and the pytest summary of each op.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Dict, List

import torch

from .harness import atomic_write, git_commit
from fractal_kernels.dispatch import _VERIFIED_FILE, _cuda_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_TESTS: Dict[str, List[str]] = {
    "sample_logits": ["tests/fractal_kernels/ops/test_sample_logits.py"],
    "pixel_cross_entropy": ["tests/fractal_kernels/ops/test_pixel_cross_entropy.py"],
    "tiny_attention": ["tests/fractal_kernels/ops/test_tiny_attention_cuda.py"],
}


def main() -> int:
    if not torch.cuda.is_available():
        print("verify_cuda: no CUDA device visible; nothing verified", file=sys.stderr)
        return 2
    if _cuda_ext() is None:
        print("verify_cuda: fractal_kernels._C is not built (FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . "
              "--no-deps --no-build-isolation)", file=sys.stderr)
        return 2
    try:
        with open(_VERIFIED_FILE) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {}
    ops = set(doc.get("ops", []))
    runs = doc.get("runs", {})
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
    doc = {"ops": sorted(ops), "runs": runs}
    atomic_write(_VERIFIED_FILE, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    print(f"wrote {_VERIFIED_FILE}: {sorted(ops)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
