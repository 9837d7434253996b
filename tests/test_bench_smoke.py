"""The benchmark suite runs in smoke mode as a new user would run it: a short summary on the terminal, the full
table and the documented JSON schema in the user's results folder, the checkout left clean."""
import hashlib
import json
import os
import pathlib
import subprocess

import torch

from benchmarks.attention import SHAPES
from benchmarks.cli import DEFAULT_ROOT, main, output_dir
from benchmarks.harness import device_slug

ROW_KEYS = {"suite", "name", "backend", "shape", "timing", "metrics", "check", "skipped"}
TIMING_KEYS = {"median_s", "iqr_s", "min_s", "max_s", "repeats"}
MACHINE_KEYS = {"device", "device_type", "torch", "triton", "python", "platform", "commit", "date", "cuda", "driver"}
REPO = pathlib.Path(__file__).resolve().parents[1]
SCREEN_LINES = 30


def _git_status():
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _committed_results():
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(DEFAULT_ROOT).rglob("*") if p.is_file()}


def test_output_folders():
    cpu = torch.device("cpu")
    assert output_dir(cpu) == os.path.join(os.path.abspath("fractal-bench-results"), device_slug(cpu))
    assert output_dir(cpu, update_committed=True) == os.path.join(DEFAULT_ROOT, device_slug(cpu))
    assert output_dir(cpu, "/some/dir", update_committed=True) == "/some/dir"


def test_smoke_run_summary_results_folder_schema_and_clean_checkout(tmp_path, capsys, monkeypatch):
    status, committed = _git_status(), _committed_results()
    monkeypatch.chdir(tmp_path)  # a user's working directory: the default results folder lands here
    assert main(["--smoke", "--no-progress"]) == 0
    out = capsys.readouterr().out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = tmp_path / "fractal-bench-results" / device_slug(device)

    # the checkout is left as it was: committed results untouched, nothing new or modified
    assert _committed_results() == committed
    assert _git_status() == status

    doc = json.loads((folder / "smoke.json").read_text())
    assert doc["schema_version"] == 1 and doc["mode"] == "smoke"
    assert set(doc["machine"]) == MACHINE_KEYS
    assert doc["rows"], "no rows measured"
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS
        if row["skipped"] is None and row["timing"] is None:  # counted, not timed (opcount rows)
            assert row["suite"] == "opcount" and row["metrics"]["ops"] > 0
        elif row["skipped"] is None:
            assert set(row["timing"]) == TIMING_KEYS and row["timing"]["median_s"] > 0
        else:
            assert not row["skipped"].startswith("error"), row
        if row["skipped"] is None:
            assert row["check"] and not row["check"].isupper(), row
    table = (folder / "smoke.md").read_text()
    assert table.startswith("# fractal-bench results (smoke)")
    assert "| e2e | generate[faithful] | torch |" in table and "| e2e | generate[fast] | torch |" in table
    assert (folder / "smoke.png").stat().st_size > 0

    # the terminal: one screen of summary, no table, skipped rows counted in one line
    lines = out.strip().splitlines()
    assert len(lines) <= SCREEN_LINES, out
    assert not any(line.startswith("|") for line in lines), out
    assert lines[0].startswith("fractal-bench smoke on ")
    assert any(line.startswith("backends that ran: fractal_kernels ops on torch") for line in lines), out
    assert any("images/s (batch 2): faithful" in line for line in lines), out
    assert any("operator calls/image: faithful" in line for line in lines), out
    assert any(line.startswith("checks: all ") for line in lines), out
    skipped = [r for r in doc["rows"] if r["skipped"]]
    assert sum(line.startswith("not run here:") for line in lines) == 1
    assert f"not run here: {len(skipped)} rows" in out
    assert "GPU-only" not in out and "not importable" not in out  # skip reasons are not listed one by one
    assert "full table: " in out and "smoke.md" in out
    if not torch.cuda.is_available():
        assert "on a GPU the skipped rows measure:" in out and "fractal-bench --full" in out

    # every row that runs a fractal_kernels op records where it ran, and it is where the row says
    for r in doc["rows"]:
        if r["skipped"] is None and r["suite"] == "pixel" and r["backend"] == "torch":
            op = "sample_logits" if r["name"] == "sampler" else "pixel_cross_entropy"
            assert r["metrics"]["ran_on"] == {op: "torch"}, r
    fast = [r for r in doc["rows"] if r["suite"] == "e2e" and r["name"] == "generate[fast]" and not r["skipped"]]
    assert fast and all("images identical to faithful" in r["check"] for r in fast if r["backend"] == "torch")
    # each fast row says which path every level took and why (issue #28: no fused stack by default)
    for r in fast:
        paths = r["metrics"]["level_paths"]
        assert [p["path"] for p in paths][:-1] == ["op_by_op"] * (len(paths) - 1), r
        assert paths[-1]["path"] == "pixel_head" and all(p["why"] for p in paths)
    assert "level paths [torch]: L0 op_by_op" in out
    from fractal_kernels import cpu
    auto = [r for r in fast if r["backend"] == "auto"]
    assert len(auto) == (3 if cpu.status()[0] and not torch.cuda.is_available() else 0)
    assert all(r["metrics"]["identical_subpixels"] >= 0.99 for r in auto)  # the compiled CPU pixel head
    assert all(r["metrics"]["ran_on"] == {"pixel_head_sample": "cpu"} for r in auto)
    counts = {r["name"]: r for r in doc["rows"] if r["suite"] == "opcount" and r["shape"].get("config") == "tiny_mar"}
    assert counts["generate[fast]"]["metrics"]["ops"] < counts["generate[faithful]"]["metrics"]["ops"]
    if "generate[fast,auto]" in counts:
        assert counts["generate[fast,auto]"]["metrics"]["ops"] < counts["generate[fast]"]["metrics"]["ops"]
        assert counts["generate[fast,auto]"]["metrics"]["identical_subpixels"] >= 0.99

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
                if r["backend"] == "tiny_attention[torch]":
                    assert r["metrics"]["ran_on"] == {"tiny_attention": "torch"}
    # GPU-only rows stay visible (in the file) with the bytes they must move; the target shape is listed
    for r in attn:
        if r["skipped"] and r["name"] != "crossover":
            assert r["metrics"]["bytes_min_bf16"] > 0 and r["metrics"]["target_s_at_85pct_of_3.0TBps"] > 0
    if not torch.cuda.is_available():
        assert any(r["shape"]["N"] * r["shape"]["H"] >= 2 ** 19 and r["backend"] == "tiny_attention[triton]"
                   for r in attn)
    # the Triton/SDPA crossover that auto-dispatch reads is measured on GPUs only, and says so here
    assert any(r["name"] == "crossover" for r in attn)


def test_quick_cpu_plan_is_trimmed_to_its_budget(monkeypatch):
    """A CPU quick run (the README's main job) counts operator calls for one tiny config and times one N per
    attention shape (measured 2 min 15 s on 2 cores; budget 3 min); --full keeps every config and size."""
    import dataclasses

    from benchmarks import attention, opcount
    from benchmarks.cases import MODES, TINY
    cpu = torch.device("cpu")
    counted = []
    monkeypatch.setattr(opcount, "opcount_rows", lambda config, *a, **k: counted.append(config) or [])
    for name, expect in (("quick", TINY[:1]), ("full", TINY)):
        counted.clear()
        rows = [r for thunk in opcount.plan(dataclasses.replace(MODES[name], crossover_path=None), cpu)
                for r in thunk()]
        assert tuple(counted) == tuple(expect), name
        left = {r.shape["config"] for r in rows if r.skipped and r.skipped.startswith("quick mode")}
        assert left == set(TINY) - set(expect), name
    for shape in attention.SHAPES:
        assert len(attention.sizes("quick", shape, cuda=False)) == 1
        assert len(attention.sizes("full", shape, cuda=False)) == 3
