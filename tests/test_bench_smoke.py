"""The benchmark suite runs in smoke mode and writes the JSON schema the README documents."""
import json

import torch

from benchmarks.attention import SHAPES
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
        if row["skipped"] is None and row["timing"] is None:  # counted, not timed (opcount rows via the interpreter)
            assert row["suite"] == "opcount" and row["metrics"]["ops"] > 0
        elif row["skipped"] is None:
            assert set(row["timing"]) == TIMING_KEYS and row["timing"]["median_s"] > 0
            assert row["check"] and not row["check"].isupper()
        else:
            assert not row["skipped"].startswith("error"), row
    assert (tmp_path / "smoke.md").read_text().startswith("# fractal-bench results (smoke)")
    out = capsys.readouterr().out
    assert "| e2e | generate[faithful] | torch |" in out and "| e2e | generate[fast] | torch |" in out
    fast = [r for r in doc["rows"] if r["suite"] == "e2e" and r["name"] == "generate[fast]" and not r["skipped"]]
    assert fast and all("images identical to faithful" in r["check"] for r in fast if r["backend"] == "torch")
    from fractal_kernels import cpu
    auto = [r for r in fast if r["backend"] == "auto"]
    assert len(auto) == (3 if cpu.status()[0] and not torch.cuda.is_available() else 0)
    assert all(r["metrics"]["identical_subpixels"] >= 0.99 for r in auto)  # the compiled CPU pixel head
    counts = {r["name"]: r for r in doc["rows"] if r["suite"] == "opcount" and r["shape"].get("config") == "tiny_mar"}
    assert counts["generate[fast]"]["metrics"]["ops"] < counts["generate[faithful]"]["metrics"]["ops"]
    if "generate[fast,auto]" in counts:
        assert counts["generate[fast,auto]"]["metrics"]["ops"] < counts["generate[fast]"]["metrics"]["ops"]
        assert counts["generate[fast,auto]"]["metrics"]["identical_subpixels"] >= 0.99
    if not torch.cuda.is_available():
        assert "No GPU here" in out

    # attention rows: every WORKLOADS shape, forward and forward+backward, measured and checked
    attn = [r for r in doc["rows"] if r["suite"] == "attention"]
    measured = [r for r in attn if r["skipped"] is None]
    for case in ("attn_fwd", "attn_fwd_bwd"):
        for shape in SHAPES:
            group = [r for r in measured if r["name"] == case and r["shape"]["tag"] == shape.tag]
            backends = {r["backend"] for r in group}
            assert {"reference", "tiny_attention[torch]", "tiny_attention_packed[auto]", "sdpa[math]"} <= backends
            for r in group:
                assert r["check"].startswith("max err") and not r["check"].isupper()
                assert r["metrics"]["GB_per_s"] > 0 and r["metrics"]["pct_copy_bw"] > 0
                assert r["metrics"]["max_err"] <= 1e-3
                assert "speedup_vs_best_sdpa" in r["metrics"] and "speedup_vs_reference" in r["metrics"]
    # GPU-only rows stay visible with the bytes they must move; the target shape is listed
    for r in attn:
        if r["skipped"] and r["name"] != "crossover":
            assert r["metrics"]["bytes_min_bf16"] > 0 and r["metrics"]["target_s_at_85pct_of_3.0TBps"] > 0
    if not torch.cuda.is_available():
        assert any(r["shape"]["N"] * r["shape"]["H"] >= 2 ** 19 and r["backend"] == "tiny_attention[triton]"
                   for r in attn)
    # the Triton/SDPA crossover that auto-dispatch reads is measured on GPUs only, and says so here
    assert any(r["name"] == "crossover" for r in attn)
    assert (tmp_path / "smoke.png").stat().st_size > 0
