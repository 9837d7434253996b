#!/usr/bin/env bash
# One-shot GPU check for a session that is lent a GPU (see README "GPU runs"): build the CUDA extension
# against the machine's torch, run the GPU tests, record which CUDA ops passed (cuda_verified.json), then
# the benchmark suite (which measures the Triton/SDPA crossover, attention_crossover.json). Everything is logged
# under $OUT (or benchmarks/results/gpu-logs) and the results land in benchmarks/results/<device>/. The dispatch
# data the run records goes to the overlay $FRACTAL_HOME, by default $LOG/fractal_home so that it comes back
# with the logs; promote it into the package data with
#   FRACTAL_HOME=<log>/fractal_home python -m benchmarks.policy_data promote
# Usage: bash benchmarks/gpu_session.sh [quick|full]
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-full}"
LOG="${OUT:-benchmarks/results/gpu-logs}"
mkdir -p "$LOG"
export FRACTAL_HOME="${FRACTAL_HOME:-$(cd "$LOG" && pwd)/fractal_home}"   # what this run verifies/measures
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$LOG/versions.txt"
# 1. CUDA extension, in place (no deps, no isolation: use the image's torch)
FRACTAL_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 python setup.py build_ext --inplace > "$LOG/build.txt" 2>&1
echo "build rc=$?" | tee -a "$LOG/versions.txt"
# 2. GPU tests of the kernels (Triton on GPU, CUDA where built) and the models on the kernel backends
timeout 240 python -m pytest -q -x -p no:cacheprovider tests/fractal_kernels tests/models/test_kernel_backends.py \
    > "$LOG/gpu-tests.txt" 2>&1
echo "gpu tests rc=$? ($(tail -1 "$LOG/gpu-tests.txt"))" | tee -a "$LOG/versions.txt"
python -m benchmarks.verify_cuda 2>&1 | tee "$LOG/verify_cuda.txt"
# 3. fast generation engine: operator counts and images/s, faithful vs fast vs fused kernels (tiny configs)
timeout 180 python -m benchmarks.opcount > "$LOG/opcount.txt" 2>&1
echo "opcount rc=$?" | tee -a "$LOG/versions.txt"
# 4. benchmarks (JSON + markdown + plot under benchmarks/results/<device>/; --full adds the published configs'
#    generate rows: fractalmar_in64 batch 256 and fractalmar_large_in256 batch 64, faithful vs fast)
timeout 300 python -m benchmarks.cli "--$MODE" --no-progress --update-committed --table > "$LOG/bench.txt" 2>&1
echo "bench rc=$?" | tee -a "$LOG/versions.txt"
python -m benchmarks.policy_data show > "$LOG/dispatch-policy.txt" 2>&1
cat "$LOG/dispatch-policy.txt"
cp -r benchmarks/results "$LOG/results" 2>/dev/null || true
