"""benchmarks/gpu_session.sh: the budgets, the result-file promise, and the dry run end to end on the CPU.

The dry run (``bash benchmarks/gpu_session.sh --dry-run``) runs every phase through its real entry point
(``pytest --collect-only`` of the GPU selection, ``fractal-bench --smoke``, a prewarm of three sm_90
specializations with a fresh-process cache-hit check, the microbenchmark, sanitizer launches and measurements
on tiny sizes); GPU-only steps must say ``skipped`` / "no GPU". About 2.5 minutes on 2 idle CPU cores, 6 on a
shared, loaded one (a dry run kills a phase at 3x its budget: it checks entry points, not CPU timing).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_session
from benchmarks.pytest_outcomes import kernel_of, summarize

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_budgets_fit_the_window():
    names = [p.name for p in gpu_session.PHASES]
    assert len(set(names)) == len(names)
    assert all(p.budget_s > 0 for p in gpu_session.PHASES)
    total = sum(p.budget_s for p in gpu_session.PHASES)
    assert total <= gpu_session.TOTAL_BUDGET_S <= 540, f"phase budgets sum to {total} s"
    # the window brings back at most 8 files, at most 2 folders deep: the session writes files only
    assert len(set(gpu_session.RESULT_FILES)) == len(gpu_session.RESULT_FILES) <= gpu_session.MAX_RESULT_FILES <= 8
    assert all("/" not in f for f in gpu_session.RESULT_FILES)
    # priority order: what later phases need comes first
    assert names[:4] == ["env", "prewarm", "build_ext", "gpu_tests"]


def test_shell_script_parses_and_calls_the_driver():
    sh = REPO / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert "-m benchmarks.gpu_session" in sh.read_text()
    assert " -x" not in sh.read_text()  # one failing test must not end the others


def test_phase_is_killed_at_its_budget(tmp_path):
    s = gpu_session.Session(str(tmp_path / "out"), True, None)
    s.deadline = time.monotonic() + 2
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        s.sh("sleep", ["bash", "-c", "sleep 30 & sleep 30"])  # a child of the child too: the group is killed
    assert time.monotonic() - t0 < 10
    assert "[killed at the phase budget]" in (pathlib.Path(s.logs) / "sleep.txt").read_text()


def test_outcome_summary_per_kernel():
    lines = [
        {"nodeid": "tests/fractal_kernels/ops/test_pixel_head.py::test_a", "kernel": "pixel_head", "outcome": "passed"},
        {"nodeid": "tests/fractal_kernels/ops/test_pixel_head.py::test_b", "kernel": "pixel_head", "outcome": "failed",
         "text": "assert 0"},
        {"nodeid": "tests/fractal_kernels/ops/test_mar_stack.py::t", "kernel": "mar_stack", "outcome": "timed_out"},
        {"nodeid": "tests/models/test_kernel_backends.py::t", "kernel": "models/kernel_backends", "outcome": "skipped"},
    ]
    doc = summarize(lines)
    assert doc["kernels"]["pixel_head"]["status"] == "failed" and doc["kernels"]["pixel_head"]["passed"] == 1
    assert doc["kernels"]["mar_stack"]["status"] == "failed"
    assert doc["kernels"]["models/kernel_backends"]["status"] == "skipped"
    assert doc["totals"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1, "timed_out": 1}
    assert kernel_of("tests/fractal_kernels/ops/test_tiny_attention_cuda.py::test_x[a]") == "tiny_attention_cuda"
    assert kernel_of("tests/models/test_fused_stack_ar.py::t") == "models/fused_stack_ar"


def test_measure_ar_step_dry_run_and_budget():
    """The measure phase's AR decode-step section on the CPU (tiny_ar's level 1, the graph recorder, the fused stack
    on torch): outputs checked against eager, timings skipped; past its budget each later part says so."""
    from benchmarks import gpu_measure
    assert [n for n, _ in gpu_measure.SECTIONS].index("ar_step") < [n for n, _ in gpu_measure.SECTIONS].index(
        "images_per_s")
    doc = gpu_measure.run(True, 60, None, only=["ar_step"])
    r = doc["sections"]["ar_step"]
    assert r["status"] == "ok", r
    res = r["result"]
    assert res["config"] == "tiny_ar" and res["rows"] == 2 and res["position"] == res["seq_len"] // 2
    assert res["graph_max_abs_diff"] == 0.0 and res["fused_max_abs_diff"] < 1e-4
    assert res["skinny_max_abs_diff"] < 1e-4 and res["skinny_graph_max_abs_diff"] < 1e-4
    assert res["graph_info"] == {"captures": res["position"] + 1, "failed": None}
    for k in ("eager_s", "graph_s", "fused_s", "skinny_s", "skinny_graph_s", "call_eager_s", "call_graphs_s"):
        assert res[k] == gpu_measure.SKIPPED, (k, res[k])
    # fused vs op by op at more rows (64 and 2048 on a GPU; small rows on the dry run), rows 2 first
    from benchmarks import gpu_ar_step
    assert [r["rows"] for r in res["by_rows"]] == [2, *gpu_ar_step.DRY_MORE_ROWS]
    assert res["by_rows"][0]["fused_max_abs_diff"] == res["fused_max_abs_diff"]
    for r in res["by_rows"]:
        assert r["fused_max_abs_diff"] < 1e-4 and r["skinny_max_abs_diff"] < 1e-4, r
        assert all(r[k] == gpu_measure.SKIPPED for k in ("eager_s", "skinny_s", "fused_s")), r
    c = gpu_measure.Ctx(False, 6, None)  # 1 s past the 5 s reserve: only the eager step runs
    res = gpu_measure.ar_step(c)
    assert res["eager_s"] == gpu_measure.SKIPPED
    assert all(res[k] == "skipped: budget" for k in ("graph_s", "fused_s", "skinny_s", "skinny_graph_s", "call_eager_s",
                                                     "call_graphs_s")), res
    assert all(r == {"rows": n, "status": "skipped: budget"} for r, n in zip(res["by_rows"][1:],
                                                                          gpu_ar_step.DRY_MORE_ROWS)), res


def test_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    print(f"\ngpu_session.sh --dry-run: {wall:.0f} s\n{proc.stdout[-3000:]}")
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads((out / "phases.json").read_text())
    assert doc["dry_run"] is True
    recs = {r["name"]: r for r in doc["phases"]}
    assert [r["name"] for r in doc["phases"]] == [p.name for p in gpu_session.PHASES]
    for p in gpu_session.PHASES:
        r = recs[p.name]
        assert r["budget_s"] == p.budget_s and r["seconds"] <= p.budget_s * gpu_session.DRY_RUN_SLACK + 5, r
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["note"] == "no GPU", r
        else:  # every file the phase promises is there and recorded
            assert r["wrote"] == p.wrote, r
            for f in p.wrote:
                assert (out / f).is_file(), f
    assert recs["build_ext"]["status"] == "skipped"
    files = sorted(os.listdir(out))
    assert set(files) <= set(gpu_session.RESULT_FILES) and len(files) <= 8, files
    assert all((out / f).is_file() for f in files)
    # what each dry path stands for
    tests = json.loads((out / "tests.json").read_text())
    assert tests["collected"] and "collected" in tests["collected"][0]
    prewarm = json.loads((out / "prewarm.json").read_text())
    assert prewarm["arch"] == 90 and not prewarm["errors"] and prewarm["hit_check"]["ok"]
    assert prewarm["hit_check"]["hits"] == prewarm["specializations"] == 3
    # and a launch through JITFunction.run (sm_90 driver stand-in) computes the prewarm's cache keys
    assert prewarm["hit_check"]["runtime_path"]["same_hash"] == 3
    micro = json.loads((out / "microbench.json").read_text())
    assert micro["sums_ok"] and all("skipped: no GPU" in json.dumps(r) for r in micro["rows"])
    measure = json.loads((out / "measure.json").read_text())
    assert all(v["status"] == "ok" for v in measure["sections"].values()), measure
    sanitizer = json.loads((out / "sanitizer.json").read_text())
    assert sanitizer["tools"] == {"memcheck": "skipped: no GPU", "initcheck": "skipped: no GPU"}
    import tarfile
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/gpu_tests.txt" in names and "logs/bench_smoke.txt" in names
