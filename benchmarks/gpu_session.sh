#!/usr/bin/env bash
# One short GPU window, spent well (docs/first-gpu-run.md; the phases and budgets: benchmarks/gpu_session.py).
#   bash benchmarks/gpu_session.sh                       # on the GPU machine: results in $OUT (<= 8 files)
#   bash benchmarks/gpu_session.sh --dry-run --out DIR   # CPU, CI: every phase's entry point, GPU steps skipped
#   bash benchmarks/gpu_session.sh --cache-archive triton-cache-sm90.tar.gz   # start from a cache built elsewhere
# Phases, in priority order, each killed at its own budget (540 s in all): env, prewarm, build_ext, gpu_tests,
# microbench, sanitizer, measure, dispatch. $OUT/phases.json is rewritten as each phase ends; exit 1 if a
# phase failed or timed out. PYTHON picks the interpreter (default: python, else python3); it must import torch.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
"$PY" -c "import torch, triton" || { echo "gpu_session.sh: $PY cannot import torch and triton (set PYTHON=...)" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_session "$@"
