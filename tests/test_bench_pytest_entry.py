"""``benchmarks/test_bench_pytest.py`` (the pytest-benchmark entry point, outside ``testpaths``) still runs:
every case once with ``--benchmark-disable``, each asserting its output against the reference."""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_pytest_benchmark_cases_run_and_agree():
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "benchmarks/test_bench_pytest.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
