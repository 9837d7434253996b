"""The ahead-of-time resource gate (issue 14): what the GPU compiler makes of the library's Triton launches.

``test_ci_subset_within_budget`` compiles ``benchmarks.aot.CI_SUBSET`` for sm_90a and sm_80 in a subprocess
without ``TRITON_INTERPRET`` (the launchers are replayed, not hand-copied) and fails on any compile error,
spill, shared memory over a per-block limit or under 2 CTAs/SM on H100, compile over budget or 16-bit dot
without tensor cores that ``KNOWN_OVER_BUDGET`` does not list -- and on every listed budget that is met now
(a stale entry), so the list cannot hide anything. Measured wall time of the subset: see
``benchmarks/results/aot/ci.md``.

``test_every_launched_kernel_is_recorded``: every ``@triton.jit`` function of ``fractal_kernels`` that has a
launch site (``name[grid](...)``) appears in the replayed set, and in the CI subset.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import aot

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (90, 80)
#: The oldest supported Triton (pyproject.toml: torch 2.11 ships it), installed compile-only beside the venv's:
#: ``pip install --target .triton36 triton==3.6.0 --no-deps`` (.ci/run does; FRACTAL_TRITON36 points elsewhere).
#: It needs no torch of its own: the capture binds launches with Triton only and compiles need no driver.
TRITON36 = pathlib.Path(os.environ.get("FRACTAL_TRITON36", REPO / ".triton36"))
TRITONS = ("venv", "3.6")


def _env(extra_path: str = "") -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the capture must take the GPU launch path
    paths = [p for p in (extra_path, str(REPO), env.get("PYTHONPATH", "")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _aot(*args: str, timeout: int, extra_path: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.aot", *args], cwd=REPO, env=_env(extra_path),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=TRITONS)
def ci_doc(request, tmp_path_factory):
    """One run of the CI subset (both arches) under the venv's Triton and under Triton 3.6; its JSON document."""
    extra = ""
    if request.param == "3.6":
        if not (TRITON36 / "triton" / "__init__.py").is_file():
            msg = (f"Triton 3.6 not installed at {TRITON36} (pip install --target .triton36 triton==3.6.0 "
                   f"--no-deps): the oldest supported Triton's AOT gate cannot run")
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
        extra = str(TRITON36)
    out = tmp_path_factory.mktemp("aot")
    # -j 2: CI has 2 cores of its own (the subset's compiles take ~200 CPU-seconds in all; see ci.md). The
    # timeout only catches a hang: on a machine shared by many jobs the same run has taken 26 minutes.
    proc = _aot("--ci", "-j", "2", "--no-progress", "--out-dir", str(out), timeout=60 * 60, extra_path=extra)
    assert proc.returncode == 0, f"benchmarks.aot --ci crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    doc = json.loads((out / "ci.json").read_text())
    if extra:
        assert doc["machine"]["triton"].startswith("3.6."), f"expected Triton 3.6 from {extra}: {doc['machine']}"
    print(f"\nAOT CI subset, triton {doc['machine']['triton']}: {doc['compiles']} compiles, wall {doc['wall_s']} s "
          f"(capture {doc['capture_s']} s, compiles {doc['compile_wall_s']} s)")
    return doc


def launched_kernels() -> set:
    """Names of the @triton.jit functions in fractal_kernels that some fractal_kernels source launches
    (``name[grid](``); helpers are only ever called (``name(``) from inside kernels."""
    pkg = REPO / "fractal_kernels"
    sources = {p: re.sub(r"#[^\n]*", "", p.read_text()) for p in pkg.rglob("*.py")}
    jitted = set()
    for src in sources.values():
        jitted |= set(re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\n\s*def\s+(\w+)", src))
    assert jitted, "no @triton.jit functions found: has the kernel code moved?"
    return {name for name in jitted if any(re.search(rf"\b{name}\[", s) for s in sources.values())}


def test_launch_site_rule_sees_the_known_kernels():
    # the rule must see the kernels the 2026-12-01 report listed, and none of the inlined helpers
    found = launched_kernels()
    assert {"_attn_fwd_kernel", "_attn_bwd_packed_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
            "_pixel_head_kernel", "_sample_logits_kernel", "_ce_rows_kernel"} <= found
    assert not found & {"_philox_uniform", "_layer_norm", "_row_layout", "_load_rows", "_sanitize"}


def test_every_launched_kernel_is_recorded(ci_doc):
    captured = {(k, c, a) for k, c, a in ci_doc["captured"]}
    errors = [r for r in ci_doc["rows"] if r.get("capture_error")]
    assert not errors, "launcher replay failed:\n" + "\n".join(f"{r['case']} sm_{r['arch']}: {r['capture_error']}"
                                                              for r in errors)
    for arch in ARCHS:
        have = {k for k, _, a in captured if a == arch}
        missing = launched_kernels() - have
        assert not missing, (f"kernels launched in fractal_kernels but produced by no case of benchmarks.aot "
                             f"(sm_{arch}): {sorted(missing)}; add a case for their launch path")
    in_subset = {k for k, _ in aot.CI_SUBSET}
    assert not launched_kernels() - in_subset, f"kernels missing from CI_SUBSET: {launched_kernels() - in_subset}"


def test_known_over_budget_names_real_rows(ci_doc):
    # an entry for a renamed case or kernel would otherwise sit there forever
    keys = {aot.row_key(k, c, a) for k, c, a in ci_doc["captured"] if k}
    bogus = sorted(set(aot.KNOWN_OVER_BUDGET) - keys)
    assert not bogus, f"KNOWN_OVER_BUDGET entries that match no recorded (kernel, case, arch): {bogus}"
    names = {"compile_error", "spill", "smem_block", "smem_ctas", "compile_time", "tensor_cores"}
    for key, budgets in aot.KNOWN_OVER_BUDGET.items():
        assert set(budgets) <= names, f"{key}: unknown budget names {set(budgets) - names}"


def test_ci_subset_within_budget(ci_doc):
    rows = [r for r in ci_doc["rows"] if not r.get("capture_error")]
    compiled = {(r["kernel"], r["case"]) for r in rows}
    assert compiled == set(aot.CI_SUBSET), f"subset rows not compiled: {set(aot.CI_SUBSET) - compiled}"
    assert {r["arch"] for r in rows} == set(ARCHS)
    # recomputed here from the figures, not read from the document's own verdict
    for r in rows:
        assert r["violations"] == aot.violations(r)
    problems = aot.gate_problems(ci_doc["rows"], aot.KNOWN_OVER_BUDGET)
    assert not problems, "AOT gate:\n" + "\n".join(problems)


# ---- the gate's logic on synthetic rows (no compile) -----------------------------------------------------

def _row(**kw):
    r = dict(kernel="_k", case="c", arch=80, status="ok", regs=100, stack=0, spill_store=0, spill_load=0,
             smem=16384, num_warps=4, num_stages=1, hmma=4, hgmma=0, ldl=0, stl=0, has_dot=True, compile_s=1.0,
             signature={"x": "*bf16"})
    r.update(kw)
    ctas, limiter, limits = aot.occupancy(r["regs"], r["smem"], r["num_warps"], r["arch"])
    r.update(ctas_per_sm=ctas, limiter=limiter, occupancy_limits=limits)
    r["violations"] = aot.violations(r)
    return r


def test_budget_checks_each_fire():
    assert _row()["violations"] == []
    assert _row(spill_store=4)["violations"] == ["spill"]
    assert _row(smem=200768)["violations"] == ["smem_block"]               # decode fp32 at num_stages=3, A100
    assert _row(arch=90, smem=200768)["violations"] == ["smem_ctas"]       # fits a block, 1 CTA per H100 SM
    assert _row(arch=90, smem=113 * 1024)["violations"] == []              # + 1 KB reserved: exactly 228 / 2
    assert _row(arch=90, smem=113 * 1024 + 1)["violations"] == ["smem_ctas"]
    assert _row(compile_s=31.0)["violations"] == ["compile_time"]
    assert _row(hmma=0)["violations"] == ["tensor_cores"]
    assert _row(hmma=0, signature={"x": "*fp32"})["violations"] == []     # fp32 keeps ieee dots
    assert _row(status="error", error="boom")["violations"] == ["compile_error"]


def test_gate_flags_new_and_stale_entries():
    bad = _row(spill_store=8, spill_load=8)
    key = aot.row_key("_k", "c", 80)
    assert aot.gate_problems([bad], {}) and "over budget: spill" in aot.gate_problems([bad], {})[0]
    assert aot.gate_problems([bad], {key: ["spill"]}) == []
    stale = aot.gate_problems([_row()], {key: ["spill"]})
    assert len(stale) == 1 and "stale" in stale[0]
    # listed for one budget, now breaking another too: still a failure
    worse = _row(spill_store=8, smem=200768)
    assert any("smem_block" in p for p in aot.gate_problems([worse], {key: ["spill"]}))


def test_seeded_regression_hook():
    hook = aot._parse_seed_regression("decode_num_stages_3")
    assert hook("_attn_fwd_kernel", {"DECODE": True, "num_stages": 1})["num_stages"] == 3
    assert hook("_attn_fwd_kernel", {"DECODE": False})  == {"DECODE": False}
    assert hook("_sample_logits_kernel", {}) == {}
    hook = aot._parse_seed_regression("_attn_fwd_kernel,DECODE=True,DOT_F32=False:num_stages=4")
    assert hook("_attn_fwd_kernel", {"DECODE": True, "DOT_F32": False})["num_stages"] == 4
    assert "num_stages" not in hook("_attn_fwd_kernel", {"DECODE": True, "DOT_F32": True})
    with pytest.raises(ValueError, match="FRACTAL_AOT_SEED_REGRESSION"):
        aot._parse_seed_regression("num_stages=3")


def test_seeded_regression_reaches_the_capture(tmp_path):
    # the hook rewrites the launch the library made, before Triton's binder sees it
    out = tmp_path / "launches.json"
    env_case = "decode Lmax=17 D=64 H=8 rope fp32"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot", "--list-json", str(out), "--arch", "80",
                           "--case", env_case], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(_env(), FRACTAL_AOT_SEED_REGRESSION="_attn_fwd_kernel,DECODE=True:num_stages=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    launches = json.loads(out.read_text())
    assert [(l["kernel"], l["options"]["num_stages"]) for l in launches] == [("_attn_fwd_kernel", 2)]


def test_fractal_bench_aot_entry(tmp_path):
    # fractal-bench --aot from a process that has TRITON_INTERPRET=1 (this one) replays in a clean process
    from benchmarks.cli import main
    out = tmp_path / "launches.json"
    assert main(["--aot", "--list-json", str(out), "--arch", "90", "--case", "ce_rows V=256 nll (no grad)"]) == 0
    launches = json.loads(out.read_text())
    assert [(l["kernel"], l["arch"], l["constexpr_values"]["BLOCK_N"]) for l in launches] == [
        ("_ce_rows_kernel", 90, 8)]  # the launcher's GPU branch (8 rows of 256), not the interpreter's
