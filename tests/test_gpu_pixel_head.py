"""The measure phase's pixel-head section (``benchmarks/gpu_pixel_head.py``) on the CPU: the dry run's keys, the
persistent child's kill paths (a stand-in child that hangs or sleeps), and the candidate overlay read back by the
dispatch policy. The timings below are made-up test inputs, not measurements."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_measure
from benchmarks import gpu_pixel_head as gph
from fractal_kernels import dispatch, policy

HANG = [sys.executable, "-c", "import json, time; print(json.dumps({'result': {'B': 1, 'rows': 2}}), flush=True); "
        "print(json.dumps({'stage': 'persistent wait', 'B': 8}), flush=True); time.sleep(60)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_dry_run_writes_the_section():
    names = [n for n, _ in gpu_measure.SECTIONS]
    assert names.index("ar_step") < names.index("pixel_head") < names.index("images_per_s")
    doc = gpu_measure.run(True, 60, None, only=["pixel_head"])
    r = doc["sections"]["pixel_head"]
    assert r["status"] == "ok", r
    res = r["result"]
    assert res["backend"] == "triton"  # the tests run under TRITON_INTERPRET=1: both schedules' kernels ran
    assert res["persistent"] == {"status": gpu_measure.SKIPPED} and res["candidate_overlay"] == gpu_measure.SKIPPED
    assert [b["B"] for b in res["by_batch"]] == list(gph.DRY_SHAPE["batches"])
    for b in res["by_batch"]:
        assert b["rows"] == 2 * b["B"] and b["tiles_s"] == b["phases_s"] == gpu_measure.SKIPPED
        assert b["ids_equal"] and b["ids_differing"] == 0 and b["logits_max_abs_diff"] < 1e-4, b


def test_persistent_child_kill_paths(monkeypatch):
    t0 = time.monotonic()
    rec = gph.run_child(HANG, timeout_s=30, hang_s=0.5)  # waits on a "launch" that never ends
    assert rec["status"].startswith("hung (killed after ") and rec["stage"] == "persistent wait (B=8)", rec
    assert rec["by_batch"] == [{"B": 1, "rows": 2}]  # what it printed before is kept
    rec = gph.run_child(SLEEP, timeout_s=1)  # prints nothing: start-up or a compile, not a hang
    assert rec["status"].startswith("timed out (killed after ") and rec["stage"] is None, rec
    assert time.monotonic() - t0 < 20
    # in the section: a timeout is recorded, a hang too, and after a hang the schedule is not run again
    monkeypatch.setattr(gph, "_PERSISTENT_HUNG", None)
    monkeypatch.setitem(gph.DRY_SHAPE, "batches", (1,))
    c = gpu_measure.Ctx(False, 60, None)
    assert gph.pixel_head(c, child_cmd=SLEEP, child_timeout_s=1)["persistent"]["status"].startswith("timed out")
    out = gph.pixel_head(c, child_cmd=HANG, hang_s=0.5)
    assert out["persistent"]["status"].startswith("hung") and out["by_batch"][0]["ids_equal"], out
    again = gph.pixel_head(c, child_cmd=HANG, hang_s=0.5)["persistent"]["status"]
    assert again.startswith("skipped: it hung earlier in this process"), again


def test_persistent_child_dies_with_the_measuring_process(tmp_path):
    """The measure phase kills its process group at its budget; the child (its own group) must not outlive it."""
    pid_file = tmp_path / "child.pid"
    child = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(60)"]
    parent = subprocess.Popen([sys.executable, "-c", f"from benchmarks import gpu_pixel_head as g; "
                               f"g.run_child({child!r}, 60)"], cwd=gph.REPO, env=dict(os.environ, PYTHONPATH=gph.REPO))
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(pid_file.read_text())
    finally:
        parent.kill()
        parent.wait()
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid), "the child outlived the measuring process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped by init) counts as gone
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _measured(persistent_ids_equal=True):
    """Made-up medians (seconds) at the GPU batches: phases beat tiles up to 128 rows, persistent beats both at
    2 rows only; the child exited cleanly."""
    tiles = {1: 5.7e-4, 8: 6.0e-4, 64: 7.0e-4, 512: 2.0e-3}
    phases = {1: 1.7e-4, 8: 2.0e-4, 64: 5.0e-4, 512: 3.0e-3}
    pers = {1: 0.8e-4, 8: 2.5e-4, 64: 6.0e-4, 512: 4.0e-3}
    by_batch = [{"B": b, "rows": 2 * b, "tiles_s": tiles[b], "phases_s": phases[b], "ids_equal": True}
                for b in tiles]
    child = {"status": "ok", "by_batch": [{"B": b, "rows": 2 * b, "persistent_s": pers[b], "phases_s": phases[b],
                                           "ids_equal": persistent_ids_equal or b != 8} for b in tiles]}
    return by_batch, child


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path / "home"))
    dispatch.reload()
    yield tmp_path / "home"
    monkeypatch.undo()
    dispatch.reload()


def _rule(rows):
    return policy.pixel_head_schedule_rule(128, rows=rows, dtype="float32", arch=90)[0]


def test_candidate_overlay_drives_the_policy(home, tmp_path):
    doc = gph.candidate_overlay(*_measured(), device="test GPU", arch=90, date="2000-01-01")
    assert doc["kind"] == "measured" and "not installed" in doc["note"]
    fused = lambda op: doc["entries"][op]["float32"]["sm_90"]["128"]["fused_n"]  # noqa: E731
    assert fused("pixel_head_phases") == [[2, 128]] and fused("pixel_head_persistent") == [[2, 2]]
    path = gph.write_candidate(doc, str(tmp_path / "logs"))
    assert path.endswith(gph.CANDIDATE) and not home.exists()  # written beside the logs, not installed
    # installed as the overlay's block_stack_model.json (after review), the policy follows the measurements
    home.mkdir()
    (home / policy.BLOCK_STACK).write_text(json.dumps(doc))
    dispatch.reload()
    assert [_rule(n) for n in (2, 16, 128, 300, 1024)] == ["persistent", "phases", "phases", "tiles", "tiles"]
    # persistent ids that differ anywhere: no persistent entry, the phases decide; --install merges
    bad = gph.candidate_overlay(*_measured(persistent_ids_equal=False), device="test GPU", arch=90)
    assert "pixel_head_persistent" not in bad["entries"] and "B = [8]" in bad["persistent_entry"]
    (home / policy.BLOCK_STACK).write_text(json.dumps({"kind": "measured", "entries": {
        "other_op": {"float32": {"sm_90": {"64": {"fused_n": [[1, 4]]}}}}}}))
    gph.install(gph.write_candidate(bad, str(tmp_path / "logs")))
    merged = json.loads((home / policy.BLOCK_STACK).read_text())
    assert set(merged["entries"]) == {"other_op", "pixel_head_phases"}
    assert [_rule(n) for n in (2, 16, 1024)] == ["phases", "phases", "tiles"]
    # nothing measured (every batch past the budget): no entry at all, the MODEL keeps deciding
    none = gph.candidate_overlay([{"B": 1, "rows": 2, "status": "skipped: budget"}], {"status": "skipped: budget"},
                                 device="test GPU", arch=90)
    assert none["entries"] == {} and none["measured_rows"] == []
