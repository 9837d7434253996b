"""The benchmark suite runs in smoke mode and writes the JSON schema the README documents."""
import json

import torch

from benchmarks.cli import main

ROW_KEYS = {"suite", "name", "backend", "shape", "timing", "metrics", "check", "skipped"}
TIMING_KEYS = {"median_s", "iqr_s", "min_s", "max_s", "repeats"}
MACHINE_KEYS = {"device", "device_type", "torch", "triton", "python", "platform", "commit", "date", "cuda", "driver"}


def test_smoke_run_writes_documented_schema(tmp_path, capsys):
    assert main(["--smoke", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["schema_version"] == 1 and doc["mode"] == "smoke"
    assert set(doc["machine"]) == MACHINE_KEYS
    assert doc["rows"], "no rows measured"
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS
        if row["skipped"] is None:
            assert set(row["timing"]) == TIMING_KEYS and row["timing"]["median_s"] > 0
            assert row["check"] and not row["check"].isupper()
    assert (tmp_path / "smoke.md").read_text().startswith("# fractal-bench results (smoke)")
    out = capsys.readouterr().out
    assert "| e2e | generate | torch |" in out
    if not torch.cuda.is_available():
        assert "No GPU here" in out
