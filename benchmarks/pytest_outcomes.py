"""A pytest plugin for the GPU session: one JSON line per test as it finishes, so a run cut off by its
budget still leaves every result so far; and the per-kernel summary of those lines.

    FRACTAL_OUTCOMES=outcomes.jsonl python -m pytest -p benchmarks.pytest_outcomes ...   (xdist: the controller
    writes the lines; pytest-timeout's failures arrive as ordinary failures whose text names the timeout)
    python -m benchmarks.pytest_outcomes outcomes.jsonl summary.json

A test's "kernel" is its file's stem without ``test_`` (``tests/fractal_kernels/ops/test_pixel_head.py`` ->
``pixel_head``; ``test_tiny_attention_cuda.py`` -> ``tiny_attention_cuda``), models' tests under ``models/``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List


def kernel_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = stem[5:] if stem.startswith("test_") else stem
    return f"models/{stem}" if "/models/" in f"/{path}" else stem


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("FRACTAL_OUTCOMES")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist the controller writes (once per test)
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        outcome = report.outcome
        text = str(report.longrepr)[-600:] if report.outcome == "failed" and report.longrepr else ""
        if report.when != "call" and outcome == "failed":
            outcome = "error"
        if "Timeout" in text and outcome in ("failed", "error"):
            outcome = "timed_out"
        rec = {"nodeid": report.nodeid, "kernel": kernel_of(report.nodeid), "when": report.when,
               "outcome": outcome, "seconds": round(getattr(report, "duration", 0.0), 3)}
        if text:
            rec["text"] = text
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def summarize(lines: List[Dict[str, Any]]) -> Dict[str, Any]:
    kernels: Dict[str, Dict[str, Any]] = {}
    for r in lines:
        k = kernels.setdefault(r["kernel"], {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "timed_out": 0,
                                             "seconds": 0.0, "failures": []})
        k[r["outcome"]] = k.get(r["outcome"], 0) + 1
        k["seconds"] = round(k["seconds"] + r.get("seconds", 0.0), 2)
        if r["outcome"] in ("failed", "error", "timed_out") and len(k["failures"]) < 10:
            k["failures"].append({"test": r["nodeid"], "outcome": r["outcome"], "text": r.get("text", "")[-300:]})
    for k in kernels.values():
        k["status"] = ("failed" if k["failed"] + k["error"] + k["timed_out"] else
                       "passed" if k["passed"] else "skipped")
    totals = {o: sum(k[o] for k in kernels.values()) for o in ("passed", "failed", "error", "skipped", "timed_out")}
    return {"totals": totals, "kernels": dict(sorted(kernels.items()))}


def read_lines(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut off by a kill
                pass
    return out


if __name__ == "__main__":
    doc = summarize(read_lines(sys.argv[1]))
    with open(sys.argv[2], "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc["totals"]))
