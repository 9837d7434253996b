"""Mutation score per Triton kernel family (issue #27, item 5): ``python -m benchmarks.mutants``.

For each family (one ``kernels.py``): enumerate the mutation sites of its ``@triton.jit`` functions
(:mod:`benchmarks.mutant_sites`), sample ``--sample`` of the interpreter-reachable ones with a committed seed,
copy the repository into a scratch folder, check that the family's test selection passes there unmutated, then
apply one mutant at a time to the scratch copy and run the selection again (the real files are never touched).
A mutant is killed when a test fails, crashed (listed, counts as killed) when the failure is not an assertion
(compile / type / import error, pytest exit codes other than 0 and 1) and timed out (listed, counts as killed)
past ``max(3 x baseline, 30 s)``. Score = killed / (sample - equivalent); each equivalent survivor is justified in
:data:`EQUIVALENT`. Results go to ``benchmarks/results/mutants/report.{json,md}`` (families merged into it).

    python -m benchmarks.mutants --list                      # sites per family, nothing run
    python -m benchmarks.mutants --family pixel_cross_entropy
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .mutant_sites import GPU_RULE, Site, find_sites

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "mutants"
SEED = 27_05
SAMPLE = 20
_T = "tests/fractal_kernels/ops/"


@dataclasses.dataclass(frozen=True)
class Family:
    """A kernel file and the pytest selection (node ids or paths, relative to the root) that guards it."""

    name: str
    kernel: str
    tests: tuple


# Selections: a subset of the family's op tests (its dtypes, masked and unmasked shapes, options), plus the
# family's test_<family>_mutants.py (tests written for this runner's survivors), run in 5-60 s on 2 shared
# cores; -x stops a killed mutant at its first failure.
FAMILIES = {f.name: f for f in (
    Family("pixel_cross_entropy", "fractal_kernels/ops/pixel_cross_entropy/kernels.py", (
        _T + "test_pixel_cross_entropy.py::test_forward_and_gradients_vs_fp64[dtype0-16-130-none-triton]",
        _T + "test_pixel_cross_entropy.py::test_forward_and_gradients_vs_fp64[dtype1-16-300-mean-triton]",
        _T + "test_pixel_cross_entropy.py::test_log_probs_and_odd_vocabulary[triton]",
        _T + "test_pixel_cross_entropy_mutants.py")),
    Family("sample_logits", "fractal_kernels/ops/sample_logits/kernels.py", tuple(
        _T + f"test_sample_logits.py::test_matches_reference_with_explicit_uniforms[{p}-triton]"
        for p in ("dtype0-7-256-1", "dtype0-7-256-4", "dtype0-7-256-6", "dtype0-7-256-9", "dtype1-5-17-2",
                  "dtype1-5-17-5", "dtype1-5-17-8")) + (
        _T + "test_sample_logits.py::test_philox_known_answers",
        _T + "test_sample_logits.py::test_non_finite_and_degenerate_rows[triton]",
        _T + "test_sample_logits.py::test_seeded_draws_identical_across_backends_and_launches[triton]",
        _T + "test_sample_logits_mutants.py")),
    Family("pixel_head", "fractal_kernels/ops/pixel_head/kernels.py", (
        _T + "test_pixel_head.py::test_kernel_logits_and_several_programs[False-triton]",
        _T + "test_pixel_head.py::test_kernel_logits_and_several_programs[True-triton]",
        _T + "test_pixel_head.py::test_gpu_chunking_matches_reference",
        _T + "test_pixel_head.py::test_greedy_and_guided_cfg_one",
        _T + "test_pixel_head.py::test_nan_condition_row[triton]",
        _T + "test_pixel_head.py::test_bf16_weights",
        _T + "test_pixel_head.py::test_value_table_returns_the_ids_values[False-triton]",
        _T + "test_pixel_head.py::test_value_table_returns_the_ids_values[True-triton]",
        _T + "test_pixel_head.py::test_philox_same_seed_same_ids_on_both_backends",
        _T + "test_pixel_head_mutants.py")),
    Family("pixel_head_phased", "fractal_kernels/ops/pixel_head/phased_kernels.py", tuple(
        _T + f"test_pixel_head_phased.py::test_phased_gpu_configs[{c}]"
        for c in ("W128-H4-C256-b1-guided-float32", "W64-H2-C128-b12-guided-float32",
                  "W64-H2-C128-b12-guided-bfloat16", "W64-H4-C256-b4-guided-float32",
                  "W16-H2-C32-b1-unguided-float32")) + (
        _T + "test_pixel_head_phased.py::test_phases_match_torch[1-6-config1]",
        _T + "test_pixel_head_phased.py::test_phases_match_torch[2-17-config0]",
        _T + "test_pixel_head_phased.py::test_nan_rows_value_table_and_empty_batch",
        _T + "test_pixel_head_phased.py::test_draws_agree_with_the_tile_kernel",
        _T + "test_pixel_head_phased.py::test_scratch_is_written_before_it_is_read[sm_90]",
        _T + "test_pixel_head_phased.py::test_a_hidden_width_no_tile_divides",
        _T + "test_pixel_head_phased.py::test_16bit_weights_on_broadcast_tiles",
        _T + "test_pixel_head_phased.py::test_a_dead_channel_stays_dead_when_later_channels_are_finite")),
    Family("ar_step_phased", "fractal_kernels/ops/ar_stack/phased_kernels.py", tuple(
        _T + f"test_ar_step_phased.py::test_phases_match_the_reference_over_steps[{p}]"
        for p in ("32-2-wdtype0-1-1", "32-2-wdtype1-2-2", "48-3-wdtype2-17-1", "64-4-wdtype3-3-2")) + (
        _T + "test_ar_step_phased.py::test_bf16_input_and_cache",
        _T + "test_ar_step_phased.py::test_phased_gpu_configs[D384-H6-bfloat16-rows16-sm90_80]",
        _T + "test_ar_step_phased.py::test_scratch_is_written_before_it_is_read")),
    Family("tiny_attention", "fractal_kernels/ops/tiny_attention/kernels.py", (
        _T + "test_tiny_attention.py::test_forward_grid_fp32[17-80-False]",
        _T + "test_tiny_attention.py::test_forward_grid_fp32[261-16-True]",
        _T + "test_tiny_attention.py::test_gradients_vs_fp64[17-16-False]",
        _T + "test_tiny_attention.py::test_gradients_vs_fp64[261-80-True]",
        _T + "test_tiny_attention.py::test_gradients_vs_fp64[261-16-False]",
        _T + "test_tiny_attention.py::test_variable_lengths[70-False]",
        _T + "test_tiny_attention.py::test_dropout_matches_the_reference_with_the_same_mask[100-True]",
        _T + "test_tiny_attention.py::test_half_precision[21-64-False-dtype1]",
        _T + "test_tiny_attention.py::test_variable_lengths[21-True]",
        _T + "test_tiny_attention.py::test_decode_against_cache[3-lens1-True]",
        _T + "test_tiny_attention.py::test_decode_rope_matches_the_ar_levels_math",
        _T + "test_tiny_attention.py::test_dropout_matches_the_reference_with_the_same_mask[21-False]",
        _T + "test_tiny_attention.py::test_non_finite_inputs_stay_in_their_sequence",
        _T + "test_tiny_attention.py::test_decode_rope_rounds_rotated_q_k_like_the_gpu",
        _T + "test_tiny_attention_mutants.py")),
    Family("mar_stack", "fractal_kernels/ops/mar_stack/kernels.py", (
        _T + "test_mar_stack.py::test_kernel_matches_reference[1-3-22-40-2-torch.float32]",
        _T + "test_mar_stack.py::test_kernel_matches_reference[2-1-5-32-2-torch.bfloat16]",
        _T + "test_mar_stack.py::test_kernel_lengths_and_batches[3-5]",
        _T + "test_mar_stack.py::test_kernel_without_qkv_bias_and_16bit_activations",
        _T + "test_mar_stack.py::test_nan_spreads_to_its_sequence_only",
        _T + "test_mar_stack_mutants.py")),
    Family("ar_stack", "fractal_kernels/ops/ar_stack/kernels.py", (
        _T + "test_ar_stack.py::test_kernel_matches_reference_over_steps[32-2-wdtype0-1-1]",
        _T + "test_ar_stack.py::test_kernel_matches_reference_over_steps[48-3-wdtype11-17-2]",
        _T + "test_ar_stack.py::test_bf16_input_and_cache_and_all_positions",
        _T + "test_ar_stack.py::test_nan_row_stays_in_its_row",
        _T + "test_ar_stack_mutants.py")),
    Family("skinny_linear", "fractal_kernels/ops/skinny_linear/kernels.py", tuple(
        _T + f"test_skinny_linear.py::test_matches_reference[{p}]"
        for p in ("3-100-72-all-fp32", "3-100-72-all-bf16", "17-24-48-plain-fp16", "17-24-48-all-bf16",
                  "3-100-72-norm_gate-fp16", "1-1-1-all-fp32")) + tuple(
        _T + f"test_skinny_linear.py::test_gpu_configuration[{c}-90]" for c in range(5)) + (
        _T + "test_skinny_linear.py::test_16bit_input_rows[x_bf16]",
        _T + "test_skinny_linear.py::test_nonfinite_rows_stay_in_their_row",
        _T + "test_skinny_linear.py::test_gate_silu_of_minus_inf_is_nan_like_the_reference",
        _T + "test_skinny_linear.py::test_strided_inputs[huge_row_stride]",
        _T + "test_skinny_linear.py::test_strided_inputs[k_stride]",
        _T + "test_skinny_linear.py::test_kv_out_writes_the_cache_slot[sm_90-bf16-fp32-triton]",
        _T + "test_skinny_linear.py::test_kv_out_writes_the_cache_slot[interpreter-fp16-triton]",
        _T + "test_skinny_linear_mutants.py")),
    Family("fused_linear", "fractal_kernels/ops/fused_linear/kernels.py", tuple(
        _T + f"test_fused_linear.py::test_matches_reference[{p}]"
        for p in ("70-136-72-norm_gelu-fp32", "70-136-72-norm_gelu-bf16", "70-136-72-residual-fp16",
                  "5-40-300-plain-bf16", "5-40-300-norm-fp32", "1-1-1-plain-fp32")) + tuple(
        _T + f"test_fused_linear.py::test_gpu_configuration[{c}-90]" for c in range(4)) + (
        _T + "test_fused_linear.py::test_16bit_input_rows[x_bf16]",
        _T + "test_fused_linear.py::test_nonfinite_rows_stay_in_their_row",
        _T + "test_fused_linear.py::test_strided_inputs[huge_row_stride]",
        _T + "test_fused_linear.py::test_strided_inputs[k_stride]",
        _T + "test_fused_linear_mutants.py")),
)}

# Survivors that no test can kill, with their reasons: benchmarks/mutant_equivalents.py
from .mutant_equivalents import EQUIVALENT  # noqa: E402

# Hand-written mutants that survived the op tests before this runner (issue #27's list), run apart from the
# sample with --known: (name, text in the family's kernel, its replacement, which occurrence of the text).
KNOWN = {
    "mar_stack": [
        ("EVEN weight load one element off", "w = tl.load(w_ptr + w_off)", "w = tl.load(w_ptr + w_off + 1)", 0),
        ("k0 dropped from the weight offsets", "+ (k0 + kcs)[:, None]", "+ (kcs)[:, None]", 0),
        ("scores from the first head-dim chunk only", "for d0 in tl.range(0, DHr, DC):",
         "for d0 in tl.range(0, DC, DC):", 0),
        ("persistent loop without the it * nprog offset", "(pid + it * nprog)", "(pid + it)", 0),
    ],
    "ar_stack": [
        ("online softmax: acc not rescaled across key chunks", "acc = acc * alpha[:, None] +", "acc = acc +", 0),
        ("online softmax: l_i not rescaled across key chunks", "l_i = l_i * alpha +", "l_i = l_i +", 0),
        ("k0 dropped from the EVEN weight offsets", "w = tl.load(w_ptr + (n0 * K + k0) + w_off)",
         "w = tl.load(w_ptr + (n0 * K) + w_off)", 0),
    ],
}


def known_sites(fam: Family, source: str) -> list:
    """:data:`KNOWN`'s mutants of ``fam`` as sites (a text that is not found is an error: the kernel moved)."""
    out = []
    for name, old, new, nth in KNOWN.get(fam.name, []):
        at = -1
        for _ in range(nth + 1):
            at = source.find(old, at + 1)
            if at < 0:
                raise ValueError(f"{fam.name}: known mutant {name!r}: {old!r} not found")
        out.append(Site(fam.kernel, "?", source.count("\n", 0, at) + 1, "known", name, at, at + len(old), new,
                        False, sid=f"{fam.kernel}:known:{name}", anchor=(at, at + len(old))))
    return out


_COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "results",
                                      ".venv", "csrc", "docs", "*.so")


def scratch_copy(root: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A copy of ``root``'s sources under ``dest`` (no .git, caches, results or build outputs)."""
    shutil.copytree(root, dest, ignore=_COPY_IGNORE)
    return dest


def _env(scratch: pathlib.Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a stale .pyc of the same size and second would hide a mutant
    env["TRITON_INTERPRET"] = "1"
    env["COLUMNS"] = "1000"  # pytest cuts the short summary (the exception type) at the terminal width
    # the fixtures live beside the real checkout, not beside the scratch copy
    env.setdefault("FRACTAL_SHARED", str(REPO.parent / "shared"))
    return env


# node ids may hold spaces (parameter ids): the id runs up to the first " - " of the line
_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - (\w[\w.]*)(.*))?$", re.M)


def run_tests(scratch: pathlib.Path, tests: tuple, timeout: float) -> tuple:
    """(outcome, detail, seconds) of one pytest run in ``scratch``: outcome is passed / failed / crashed /
    timeout. crashed: pytest could not run the selection (exit code not 0 or 1) or a test died of an error
    that is not an assertion (e.g. a Triton compile error)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "--tb=line", "-p", "no:cacheprovider",
           *[t for t in tests if (scratch / t.split("::")[0]).exists()]]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=_env(scratch), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout:.0f} s", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "passed", "", dt
    fails = _FAILED.findall(out)
    if proc.returncode < 0:  # e.g. an out-of-bounds store that corrupted the interpreter's heap
        return "crashed", f"pytest died of {signal.Signals(-proc.returncode).name}", dt
    if proc.returncode != 1 or not fails:
        tail = " ".join(out.strip().splitlines()[-2:])[-200:]
        return "crashed", f"pytest exit {proc.returncode}: {tail}", dt
    test, exc, msg = fails[0]
    exc = exc or "?"
    # "assert" starts the summary of a rewritten bare assert, "Failed" that of pytest.fail / pytest.raises
    kind = "failed" if exc in ("assert", "AssertionError", "Failed") or exc.endswith("AssertionError") else "crashed"
    return kind, f"{test.split('::')[-1]} - {exc}{msg[:120]}", dt


def sample_sites(sites: list, family: str, n: int, seed: int) -> list:
    """``n`` interpreter-reachable sites drawn with a seed derived from (seed, family), in file order."""
    pool = [s for s in sites if not s.gpu_only]
    rng = random.Random(f"{seed}:{family}")
    return sorted(rng.sample(pool, min(n, len(pool))), key=lambda s: s.anchor)


def run_family(fam: Family, root: pathlib.Path = REPO, n: int = SAMPLE, seed: int = SEED,
               equivalent: dict | None = None, only: list | None = None, log=print) -> dict:
    """Baseline, then each sampled mutant of ``fam``; the family's report entry (see the module doc)."""
    equivalent = EQUIVALENT if equivalent is None else equivalent
    source = (root / fam.kernel).read_text()
    sites = find_sites(source, fam.kernel)
    picked = only if only is not None else sample_sites(sites, fam.name, n, seed)
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        scratch = scratch_copy(root, pathlib.Path(tmp) / "repo")
        target = scratch / fam.kernel
        outcome, detail, base = run_tests(scratch, fam.tests, timeout=900)
        log(f"[{fam.name}] baseline {outcome} in {base:.1f} s {detail}")
        if outcome != "passed":
            raise RuntimeError(f"{fam.name}: the unmutated baseline must pass ({outcome}: {detail})")
        limit = max(3 * base, 30.0)
        rows = []
        for i, s in enumerate(picked):
            mutated = s.apply(source)
            ast.parse(mutated)  # a SyntaxError is a bug of the site finder, never a kill
            target.write_text(mutated)
            try:
                outcome, detail, dt = run_tests(scratch, fam.tests, timeout=limit)
            finally:
                target.write_text(source)
            status = {"passed": "survived", "failed": "killed"}.get(outcome, outcome)
            if status == "survived" and s.sid in equivalent:
                status = "equivalent"
            rows.append({"id": s.sid, "line": s.line, "kind": s.kind, "diff": s.diff(source), "status": status,
                         "detail": detail if status != "equivalent" else equivalent[s.sid],
                         "seconds": round(dt, 1)})
            log(f"[{fam.name}] {i + 1}/{len(picked)} {status:10s} {dt:5.1f} s  {s.diff(source)[:110]}")
    return summarize(fam, sites, rows, base, seed)


def summarize(fam: Family, sites: list, rows: list, base: float, seed: int) -> dict:
    """The report entry of one family from its mutant rows."""
    entry = {
        "kernel": fam.kernel, "tests": list(fam.tests), "seed": seed, "sites": len(sites),
        "gpu_only_sites": [{"id": s.sid, "diff": s.desc, "line": s.line} for s in sites if s.gpu_only],
        "sample": len(rows), "baseline_s": round(base, 1), "mutant_s": round(sum(r["seconds"] for r in rows), 1),
        "mutants": rows,
    }
    return _score(entry)


def _score(entry: dict, equivalent: dict | None = None) -> dict:
    # survivors are (re)classified by the EQUIVALENT table as it is now: a reason added after a run scores
    # without rerunning it (the mutant's outcome, surviving, is what was measured)
    if equivalent is not None:
        for r in entry["mutants"]:
            if r["status"] in ("survived", "equivalent"):
                r["status"] = "equivalent" if r["id"] in equivalent else "survived"
                r["detail"] = equivalent.get(r["id"], "")
    rows = entry["mutants"]
    count = {k: sum(r["status"] == k for r in rows) for k in ("killed", "crashed", "timeout", "survived",
                                                                "equivalent")}
    dead = count["killed"] + count["crashed"] + count["timeout"]
    denom = len(rows) - count["equivalent"]
    entry.update(count, dead=dead, score=round(dead / denom, 4) if denom else None,
                 equivalent_share=round(count["equivalent"] / len(rows), 4) if rows else 0.0)
    return entry


def write_report(entries: dict, out: pathlib.Path = OUT, known: dict | None = None) -> None:
    """Merge ``entries`` (family -> entry) and ``known`` (family -> rows of its KNOWN mutants) into
    ``out/report.json`` and rewrite ``out/report.md`` from it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    data = json.loads(path.read_text()) if path.exists() else {"families": {}}
    data["families"].update(entries)
    data.setdefault("known", {}).update(known or {})
    for entry in data["families"].values():
        _score(entry, EQUIVALENT)
    data["gpu_rule"] = GPU_RULE
    data["target"] = 0.9
    path.write_text(json.dumps(data, indent=1) + "\n")
    others = sorted(f"{q.parent.name}/" for q in out.glob("*/report.json"))
    (out / "report.md").write_text(render_md(data, every_family=out == OUT, others=others))


def render_md(data: dict, every_family: bool = True, others: list = ()) -> str:
    """The markdown report: the score table, then per family its survivors, equivalents, crashes, timeouts
    (``every_family``: name the families not run yet, as the main report should hold them all)."""
    lines = ["# Mutation scores of the Triton kernels (issue #27, item 5)", "",
             "Generated by `python -m benchmarks.mutants` (seed and selections in `benchmarks/mutants.py`). "
             "Score = killed / (sample - equivalent); crashes and timeouts count as killed and are listed. "
             f"GPU-only rule: {data['gpu_rule']}.", "",
             "Crashes are mostly `InterpreterError`s (an exception inside the interpreted kernel: an invalid "
             "shape, type or address) and SIGSEGV / SIGABRT (a store that corrupted memory); they count as "
             "killed. "
             "Every equivalent mutant below is a survivor whose outputs cannot differ, with the reason; most are "
             "a dropped mask on a load whose extra columns are never stored (only the out-of-bounds read remains, "
             "which the interpreter does not trap). Each family's test selection (in `benchmarks/mutants.py`) "
             "is a fast subset of its op tests plus `tests/fractal_kernels/ops/test_<family>_mutants.py`.", "",
             "| family | sites | GPU-only | sample | killed | crashed | timeout | survived | equivalent | score "
             "| baseline s | all mutants s |", "|" + "---|" * 12]
    fams = data["families"]
    for name, e in fams.items():
        score = "n/a" if e["score"] is None else f"{100 * e['score']:.1f} %"
        lines.append(f"| {name} | {e['sites']} | {len(e['gpu_only_sites'])} | {e['sample']} | {e['killed']} | "
                     f"{e['crashed']} | {e['timeout']} | {e['survived']} | {e['equivalent']} | {score} | "
                     f"{e['baseline_s']} | {e['mutant_s']} |")
    over = [n for n, e in fams.items() if e["equivalent_share"] > 0.1]
    if over:
        lines += ["", f"**Over the 10 % equivalent bound**: {', '.join(over)}."]
    below = [n for n, e in fams.items() if e["score"] is not None and e["score"] < data["target"]]
    if below:
        lines += ["", f"**Below the {100 * data['target']:.0f} % target**: {', '.join(below)}."]
    if others:  # runs with other settings (e.g. a bigger sample), each with its own report
        lines += ["", "Other runs beside this report: " + ", ".join(f"`{o}`" for o in others) + "."]
    missing = [f for f in FAMILIES if f not in fams and every_family]
    if missing:
        lines += ["", f"**Partial**: not run yet: {', '.join(missing)}."]
    if data.get("known"):
        lines += ["", "## Named mutants (the issue's list of survivors of the op tests; `--known`, not sampled)", ""]
        for name, rows in data["known"].items():
            lines += [f"- {name}, {r['id'].split(':known:', 1)[-1]} (`{r['diff']}`): **{r['status']}**"
                      + (f" by `{r['detail'].split(' - ')[0]}`" if r["detail"] else "") for r in rows]
    for name, e in fams.items():
        lines += ["", f"## {name}", "", f"`{e['kernel']}`; tests: " + ", ".join(f"`{t}`" for t in e["tests"])]
        for status, title in (("survived", "Survivors"), ("equivalent", "Equivalent (reason)"),
                              ("crashed", "Crashed (counted as killed)"), ("timeout", "Timed out (counted as killed)")):
            rows = [r for r in e["mutants"] if r["status"] == status]
            if rows:
                lines += ["", f"{title}:", ""] + [f"- `{r['id']}`: `{r['diff']}`" + (f" -- {r['detail']}" if
                                                                                      r["detail"] else "")
                                                  for r in rows]
        if e["gpu_only_sites"]:
            lines += ["", "GPU-only sites (not sampled):", ""] + [f"- `{g['id']}`" for g in e["gpu_only_sites"]]
    return "\n".join(lines) + "\n"


def main(argv: list | None = None) -> int:
    """CLI: run the chosen families (all by default) and merge them into the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES))
    ap.add_argument("--sample", type=int, default=SAMPLE)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--list", action="store_true", help="print the sites per family and the sample, run nothing")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--known", action="store_true", help="run the KNOWN mutants of the families, not the sample")
    ap.add_argument("--rescore", action="store_true",
                    help="rewrite the report from report.json with the current EQUIVALENT table, run nothing")
    args = ap.parse_args(argv)
    if args.rescore:
        write_report({}, args.out)
        return 0
    names = args.family or list(FAMILIES)
    for name in names:
        fam = FAMILIES[name]
        source = (REPO / fam.kernel).read_text()
        sites = find_sites(source, fam.kernel)
        if args.list:
            picked = sample_sites(sites, name, args.sample, args.seed)
            gpu = sum(s.gpu_only for s in sites)
            print(f"{name}: {len(sites)} sites, {gpu} GPU-only, sample {len(picked)}")
            for s in picked:
                print(f"  {s.sid}\n    {s.diff(source)}")
            continue
        if args.known:
            if name in KNOWN:
                rows = run_family(fam, only=known_sites(fam, source))["mutants"]
                write_report({}, args.out, known={name: rows})
            continue
        entry = run_family(fam, n=args.sample, seed=args.seed)
        write_report({name: entry}, args.out)
        print(f"[{name}] score {entry['score']} ({entry['dead']} dead / {entry['sample']} - "
              f"{entry['equivalent']} equivalent), survivors {entry['survived']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
