#!/usr/bin/env bash
# Packaging smoke (run by .ci/run after pytest): install fractal-kernels the way a user does and use it.
#  1. build the sdist from the work tree, and the wheel from that sdist (so the sdist is proven complete);
#     no network, no build isolation (the CI venv's setuptools), no CUDA extension
#  2. the sdist carries csrc/, CMakeLists.txt, the CPU kernel sources and the dispatch data
#  3. a fresh venv with CPU torch (local wheel cache) gets the wheel; site-packages gains only fractal_kernels,
#     fractal_models and fractal_bench (and the dist-info); `pip check` passes
#  4. from outside the checkout: fractalgen info, a tiny generate on the default backend, fractal-bench --smoke,
#     and the installed dispatch reading its packaged data and overlay exactly as the checkout does
# Usage: bash .ci/wheel_smoke.sh   (PYTHON=... for the build interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-$REPO/.venv/bin/python}"
T0=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fractal-wheel-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "wheel smoke FAILED: $*" >&2; exit 1; }
step() { echo "== wheel smoke [$(( $(date +%s) - T0 )) s] $*"; }
unset PYTHONPATH
export FRACTAL_KERNELS_BUILD_CUDA=0 PIP_DISABLE_PIP_VERSION_CHECK=1

step "build sdist (from the tracked and new files of the work tree) and wheel (from the sdist)"
mkdir -p "$WORK/src" "$WORK/dist"
git ls-files -z --cached --others --exclude-standard | (cd "$REPO" && xargs -0 tar -cf - --ignore-failed-read) \
    | tar -xf - -C "$WORK/src"
(cd "$WORK/src" && "$PY" -c 'import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))' \
    "$WORK/dist" > "$WORK/sdist.log" 2>&1) || { tail -30 "$WORK/sdist.log"; fail "sdist build"; }
SDIST="$(ls "$WORK"/dist/fractal_kernels-*.tar.gz)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$SDIST" > "$WORK/wheel.log" 2>&1 \
    || { tail -30 "$WORK/wheel.log"; fail "wheel build from the sdist"; }
WHEEL="$(ls "$WORK"/dist/fractal_kernels-*.whl)"
echo "   $(basename "$SDIST") $(du -k "$SDIST" | cut -f1) KB, $(basename "$WHEEL") $(du -k "$WHEEL" | cut -f1) KB"

step "sdist and wheel contents"
"$PY" - "$SDIST" "$WHEEL" "$REPO" <<'EOF' || fail "package contents"
import os, sys, tarfile, zipfile
sdist, wheel, repo = sys.argv[1:]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
need = {"CMakeLists.txt", "README.md", "setup.py", "pyproject.toml", "fractal_kernels/data/cuda_verified.json",
        "fractal_kernels/data/attention_crossover.json", "fractal_kernels/data/block_stack_model.json",
        "fractal_kernels/policy.py", "benchmarks/cli.py", "benchmarks/costmodel/launch.py"}
for root, _, files in os.walk(os.path.join(repo, "csrc")):
    need |= {os.path.relpath(os.path.join(root, f), repo) for f in files}
for root, _, files in os.walk(os.path.join(repo, "fractal_kernels", "cpu")):
    need |= {os.path.relpath(os.path.join(root, f), repo) for f in files if f.endswith((".cpp", ".h"))}
missing = sorted(need - names)
assert not missing, f"sdist lacks {missing}"
assert not any(n.startswith("benchmarks/results/") for n in names), "sdist carries benchmark results"
whl = zipfile.ZipFile(wheel).namelist()
top = {n.split("/", 1)[0] for n in whl if not n.split("/", 1)[0].endswith(".dist-info")}
assert top == {"fractal_kernels", "fractal_models", "fractal_bench"}, f"wheel top-level entries: {sorted(top)}"
for n in ("fractal_kernels/data/cuda_verified.json", "fractal_kernels/data/attention_crossover.json",
          "fractal_kernels/data/block_stack_model.json", "fractal_kernels/cpu/pixel_head_cpu.cpp",
          "fractal_bench/cli.py", "fractal_bench/costmodel/launch.py"):
    assert n in whl, f"wheel lacks {n}"
ep = zipfile.ZipFile(wheel).read(next(n for n in whl if n.endswith("entry_points.txt"))).decode()
assert "fractal-bench = fractal_bench.cli:main" in ep and "fractalgen = fractal_models.cli:main" in ep, ep
print(f"   sdist: {len(names)} files incl. {sum(n.startswith('csrc/') for n in names)} under csrc/; "
      f"wheel top level: {sorted(top)}")
EOF

step "fresh venv: CPU torch 2.13.0 and the wheel's dependencies, then the wheel"
python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# --no-compile: byte-compiling torch's ~20k modules would dominate this step; imports compile what they use
"$VPY" -m pip install -q --no-compile torch==2.13.0 numpy tqdm scipy || fail "installing torch into the fresh venv"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ls "$SITE" | sort > "$WORK/site-before.txt"
"$VPY" -m pip install -q "$WHEEL" || fail "installing the wheel"
ls "$SITE" | sort > "$WORK/site-after.txt"
GAINED="$(comm -13 "$WORK/site-before.txt" "$WORK/site-after.txt" | grep -v '^__pycache__$' | tr '\n' ' ')"
echo "   site-packages gained: $GAINED"
[ "$GAINED" = "fractal_bench fractal_kernels fractal_kernels-0.1.0.dist-info fractal_models " ] \
    || fail "site-packages gained '$GAINED', expected only fractal_bench, fractal_kernels, fractal_models (+ dist-info)"
"$VPY" -m pip check || fail "pip check"

step "use it from outside the checkout"
mkdir -p "$WORK/user" && cd "$WORK/user"
export FRACTAL_HOME="$WORK/user/fractal_home" FRACTAL_KERNELS_CACHE="$WORK/user/cpu-kernels"
# one thread: this checks that things work, not how fast; OpenMP teams spin badly on a shared, busy CI machine
export OMP_NUM_THREADS=1
BIN="$WORK/venv/bin"
"$VPY" -c 'import fractal_kernels, fractal_models, fractal_bench, sys; s = sys.argv[1]
for m in (fractal_kernels, fractal_models, fractal_bench):
    assert m.__file__.startswith(s), f"{m.__name__} imported from {m.__file__}, not {s}"
try:
    import benchmarks
except ImportError:
    pass
else:
    raise AssertionError(f"a top-level benchmarks package is importable: {benchmarks.__file__}")' "$SITE" \
    || fail "imports resolve outside the installed wheel"
"$BIN/fractalgen" info --config tiny_mar > info.txt || { cat info.txt; fail "fractalgen info"; }
grep -q "read     $SITE/fractal_kernels/data/cuda_verified.json" info.txt \
    || { cat info.txt; fail "fractalgen info does not show the packaged cuda_verified.json being read"; }
grep -q "cuda sample_logits:" info.txt || { cat info.txt; fail "fractalgen info lacks the per-op CUDA decisions"; }
sed -n '/dispatch policy/,$p' info.txt
"$BIN/fractalgen" sample --config tiny_mar --labels 0,1 --num-iter-list 2,2 --output samples.png --quiet > sample.txt 2>&1 \
    || { cat sample.txt; fail "fractalgen sample (tiny_mar, default backend)"; }
"$VPY" -c 'import sys; d = open(sys.argv[1], "rb").read(); assert d[:8] == b"\x89PNG\r\n\x1a\n" and len(d) > 100, len(d)' \
    samples.png || fail "sample wrote no PNG"
echo "   $(cat sample.txt | tail -1)"
"$BIN/fractal-bench" --smoke --no-progress > bench.txt 2>&1 || { tail -40 bench.txt; fail "fractal-bench --smoke"; }
ls fractal-bench-results/*/smoke.json > /dev/null || fail "fractal-bench wrote no results under ./fractal-bench-results"
[ ! -d "$SITE/fractal_bench/results" ] || fail "fractal-bench wrote into site-packages"
echo "   $(grep -c '^|' bench.txt) table lines; $(grep '^wrote' bench.txt)"
"$VPY" "$REPO/.ci/dispatch_data_check.py" installed > installed.json || fail "installed dispatch ignores its data"
(cd "$REPO" && PYTHONPATH="$REPO" "$PY" .ci/dispatch_data_check.py checkout) > checkout.json \
    || fail "checkout dispatch ignores its data"
"$VPY" - installed.json checkout.json <<'EOF' || fail "installed copy and checkout decide differently"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
for scenario in ("shipped", "overlay", "package"):
    assert a[scenario] == b[scenario], f"{scenario}: installed {a[scenario]} != checkout {b[scenario]}"
print(f"   same decisions installed ({a['where']}) and in the checkout ({b['where']}): "
      + "; ".join(f"{k} -> {v}" for k, v in sorted(a["package"].items())))
EOF
step "passed (wall $(( $(date +%s) - T0 )) s)"
