"""The per-launch cost MODEL (``benchmarks.costmodel``): hand-computed bounds of synthetic launches, the CLI on
the tiny configs (CI: seconds), the committed package data against what the model regenerates, and the
dispatch rule that reads it. Nothing here needs a GPU; every figure is a MODEL."""
import json
import math
import os

import pytest
import torch

from benchmarks.costmodel import constants as C
from benchmarks.costmodel import crossover, report
from benchmarks.costmodel.__main__ import POLICY_PATH, main
from benchmarks.costmodel.launch import Launch, launch_time, occupancy
from benchmarks.costmodel.workload import gemm
from fractal_kernels import dispatch, policy

H100 = C.HARDWARE["H100"]
MB64 = 64e6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_constants_are_performance_md_s():
    """The table as shared/PERFORMANCE.md states it (change only with a GPU measurement, never fitted)."""
    assert (H100.sms, H100.hbm_bytes_per_s, H100.l2_bytes_per_s, H100.l2_plan_bytes) == (132, 3.0e12, 5.5e12, 25e6)
    assert (H100.hbm_latency_s, H100.l2_latency_s) == (0.6e-6, 0.3e-6)
    assert (H100.hgmma_flops, H100.hmma_flops, H100.fma_flops) == (800e12, 400e12, 50e12)
    assert (H100.launch_eager_s, H100.launch_triton_s, H100.launch_graph_s, H100.sync_s) == (5e-6, 3e-6, 2e-6, 10e-6)


def _stream(grid, per_cta, in_flight, **kw):
    return Launch(kernel="synthetic", grid_ctas=grid, ctas_per_sm=kw.pop("ctas_per_sm", 1), bytes_per_cta=per_cta,
                  in_flight_bytes=in_flight, unique_bytes=kw.pop("unique", per_cta * grid), launch_kind="triton", **kw)


def test_one_cta_streaming_64mb_without_and_with_pipelining():
    # 64 MB > the L2: one HBM round trip (0.6 us) per 4 KB tile with num_stages = 1 (max(1, 0) = 1 tile ahead)
    t = launch_time(_stream(1, MB64, 4096))
    assert t["bound"] == "latency"
    assert t["seconds"] == pytest.approx(MB64 / 4096 * 0.6e-6 + 3e-6)  # 9.375 ms + the Triton launch
    # num_stages = 3: two tiles in flight, half the time
    t3 = launch_time(_stream(1, MB64, 2 * 4096))
    assert t3["seconds"] == pytest.approx(MB64 / 8192 * 0.6e-6 + 3e-6)


def test_132_ctas_streaming_64mb_are_bound_by_hbm():
    per = MB64 / 132
    t = launch_time(_stream(132, per, 16384))
    assert t["terms"]["latency"] == pytest.approx(per * 0.6e-6 / 16384)  # 17.8 us
    assert t["bound"] == "HBM" and t["seconds"] == pytest.approx(MB64 / 3.0e12 + 3e-6)  # 21.3 us + launch


def test_a_big_gemm_is_compute_bound_near_the_measured_peak():
    """8192^3 bf16 on sm_90: 128 x 256 tiles, 2048 CTAs, 2 per SM -> 8 waves; PERFORMANCE.md measures ~800
    TFLOP/s on this matmul, the MODEL must agree to within its wave quantisation."""
    g = gemm("mm", 8192, 8192, 8192, H100, 90)
    assert g.grid_ctas == 64 * 32 and g.unit == "HGMMA"
    t = launch_time(g)
    waves = math.ceil(2048 / (132 * 2))
    per_wave = 2 * (2 * 128 * 256 * 8192) / (800e12 / 132)  # two CTAs share an SM's peak
    assert t["bound"] == "compute (HGMMA)"
    assert t["seconds"] == pytest.approx(waves * per_wave + 5e-6)
    assert 2 * 8192 ** 3 / t["seconds"] > 700e12


def test_a_persistent_grid_runs_its_items_one_after_another():
    # 264 CTAs (2 per SM), 3 items each, 1 MB per item, 4 KB in flight, a 50 MB working set (> L2: HBM latency)
    launch = _stream(264, 1e6, 4096, ctas_per_sm=2, items_per_cta=3, unique=50e6, working_set_bytes=50e6)
    t = launch_time(launch)
    assert t["rounds"] == 3 and t["bound"] == "latency"
    assert t["terms"]["latency"] == pytest.approx(3 * 1e6 * 0.6e-6 / 4096)
    assert t["terms"]["HBM"] == pytest.approx(264 * 3 * 1e6 / 3.0e12)  # re-reads miss past the L2


def test_occupancy_from_registers_warps_and_shared_memory():
    assert occupancy(255, 4) == 2  # the fused stacks' cap: 255 x 128 threads
    assert occupancy(128, 4, smem=100 * 1024) == 2
    assert occupancy(32, 1) == 32


@pytest.fixture(scope="module")
def tiny_doc(tmp_path_factory):
    d = tmp_path_factory.mktemp("costmodel")
    assert main(["--tiny", "--batches", "1", "8", "--json", str(d / "c.json"), "--md", str(d / "c.md")]) == 0
    with open(d / "c.json") as f:
        return json.load(f), (d / "c.md").read_text()


def test_the_cli_runs_on_the_tiny_configs(tiny_doc):
    doc, md = tiny_doc
    assert doc["kind"] == "MODEL" and "MODEL" in md.splitlines()[0]
    recs = doc["records"]
    assert recs and set(report.KEYS) <= set(recs[0])
    combos = {(r["config"], r["batch"], r["path"]) for r in recs}
    assert combos == {(c, b, p) for c in ("tiny_mar", "tiny_ar", "tiny_mar_gp") for b in (1, 8)
                      for p in ("fast", "op_by_op", "skinny", "fused_linear", "fused", "pre28_default", "reference", "op_by_op_graph",
                                "fast_graph", "fast_persistent")}
    for h in doc["headline"]:
        rs = [r for r in recs if r["config"] == h["config"] and r["batch"] == h["batch"] and r["path"] == "fast"]
        assert h["fast_s"] == pytest.approx(sum(r["launches_per_image"] * r["modeled_us"] for r in rs) * 1e-6)
        assert h["fast_s"] > 0 and h["reference_s"] > 0
    assert all(r["modeled_us"] > 0 for r in recs)


def test_the_committed_crossovers_are_what_the_model_regenerates():
    with open(POLICY_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == crossover.dumps(crossover.sweep()), (
        "fractal_kernels/data/block_stack_model.json is stale (a constant, a launcher config or the launch counts "
        "changed): run python -m benchmarks.costmodel --write-policy --out benchmarks/results/costmodel")


def test_the_committed_results_add_up():
    path = os.path.join(ROOT, "benchmarks", "results", "costmodel", "costmodel.json")
    with open(path) as f:
        doc = json.load(f)
    assert doc["kind"] == "MODEL"
    fast = [r for r in doc["records"] if r["config"] == "fractalar_in64" and r["batch"] == 1 and r["path"] == "fast"]
    head = next(h for h in doc["headline"] if h["config"] == "fractalar_in64" and h["batch"] == 1)
    assert head["fast_s"] == pytest.approx(sum(r["launches_per_image"] * r["modeled_us"] for r in fast) * 1e-6,
                                           rel=1e-4)


def test_a_skinny_linear_launch_fills_the_gpu_and_streams_its_weights_once():
    """M = 2 rows, a 1536 x 512 bf16 weight (an AR level's wqkv at D = 512): the launcher's own sm_90 config
    gives 8 columns a program, 192 programs (>= 132 SMs), 8 KB of weights per program in one K trip."""
    from benchmarks.costmodel.workload import skinny
    launch = skinny("wqkv", 2, 1536, 512, H100, 90, norm=True)
    assert launch.grid_ctas == 192 and launch.meta["bn"] == 8 and launch.meta["bk"] == 512
    assert launch.weight_bytes == 1536 * 512 * 2 and launch.in_flight_bytes == 8 * 512 * 2
    # per program: its weight rows + x twice (the RMSNorm prologue re-reads it) + 2 x 8 outputs
    assert launch.bytes_per_cta == 8 * 512 * 2 + 2 * 512 * 4 * 2 + 2 * 8 * 2
    t = launch_time(launch)
    assert t["terms"]["latency"] == pytest.approx(launch.bytes_per_cta * 0.6e-6 / launch.in_flight_bytes)
    assert t["seconds"] == pytest.approx(max(t["terms"][k] for k in ("HBM", "L2", "latency", "compute")) + 3e-6)


def test_the_fast_path_takes_the_skinny_step_only_where_the_data_says():
    doc = crossover.sweep(("fractalar_in64",), ("H100",))
    e = doc["entries"][crossover.SKINNY_OP]["bfloat16"]["sm_90"]
    assert e and all(runs and runs[0][0] == 1 for runs in (v["fused_n"] for v in e.values()))
    # the AR levels (the pixel head's schedule is its own choice: test below)
    recs = [r for r in report.config_records("fractalar_in64", 1, doc, "H100", paths=("fast", "skinny", "op_by_op"))
            if r["level"] != "pixel head"]
    tot = report.totals(recs)
    # fast takes per level the skinny step or, where its data says it beats that too, the phased step
    fast_paths = {r["level"]: r["level_path"] for r in recs if r["path"] == "fast" and r["level"].endswith(" AR")}
    assert set(fast_paths.values()) <= {"skinny", "ar_phases"} and "skinny" in fast_paths.values()
    assert tot[("fractalar_in64", 1, "fast")]["s"] <= tot[("fractalar_in64", 1, "skinny")]["s"] * (1 + 1e-9)
    assert tot[("fractalar_in64", 1, "skinny")]["s"] < tot[("fractalar_in64", 1, "op_by_op")]["s"]
    recs256 = [r for r in report.config_records("fractalar_in64", 256, doc, "H100", paths=("fast", "op_by_op"))
               if r["level"] != "pixel head"]
    tot256 = report.totals(recs256)
    assert tot256[("fractalar_in64", 256, "fast")]["s"] == pytest.approx(tot256[("fractalar_in64", 256, "op_by_op")]["s"])


def test_ranges():
    assert crossover.ranges([True, True, False, True], (1, 2, 4, 8)) == [[1, 2], [8, 8]]
    assert crossover.ranges([False] * 3, (1, 2, 4)) == []


def test_dispatch_follows_the_crossover_data(tmp_path, monkeypatch):
    from fractal_kernels._target import target_arch
    doc = {"entries": {"mar_block_stack": {"bfloat16": {"sm_90": {"64": {"fused_n": [[1, 8]]}}}}}}
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path))
    (tmp_path / policy.BLOCK_STACK).write_text(json.dumps(doc))
    dispatch.reload()
    try:
        cuda = torch.device("cuda")
        ask = lambda width, n, **kw: dispatch.explain_block_stack(  # noqa: E731
            "mar_block_stack", None, kw.pop("device", cuda), width, n=n, dtype=torch.bfloat16, policy_only=True, **kw)
        with target_arch(90):
            which, why = ask(64, 8)
            assert which == "triton" and "measured" in why and str(tmp_path) in why
            which, why = ask(64, 9)
            assert which is None and "loses" in why
            assert ask(64, None)[0] is None  # no N: the default rule (op by op)
            assert ask(128, 8)[0] is None  # no entry: the default rule
            assert ask(64, 9, fuse=True)[0] == "triton"  # fused_stack=True forces it
        with target_arch(80):
            assert ask(64, 8)[0] is None
        assert ask(64, 8, device=torch.device("cpu"))[0] is None  # off a GPU: no arch, the default rule
        assert policy.block_stack_table()[("mar_block_stack", "bfloat16", "sm_90", "64")][1] == \
            str(tmp_path / policy.BLOCK_STACK)
        assert policy.block_stack_rule(64, None, op="mar_block_stack", n=4, dtype="bfloat16", arch=90)[0]
        # fuse=None and no winning range: op by op, without asking any backend
        assert dispatch.choose_block_stack("mar_block_stack", None, torch.device("cpu"), 64, n=8,
                                           dtype=torch.bfloat16) is None
    finally:
        monkeypatch.delenv("FRACTAL_HOME")
        dispatch.reload()


def test_the_package_data_fuses_no_published_level():
    """The MODEL's verdict today (fused stacks: 4 KB in flight per CTA, every weight per sequence): op by op wins
    at every N of every published width; a measured overlay can say otherwise."""
    dispatch.reload()
    table = {k: v for k, v in policy.block_stack_table().items() if v[1] == policy.package_path(policy.BLOCK_STACK)}
    stacks = {k: v for k, v in table.items() if k[0] not in (crossover.SKINNY_OP, crossover.LINEAR_OP,
                                                              crossover.PIXEL_PHASES_OP, crossover.PIXEL_PERSISTENT_OP,
                                                              crossover.AR_PHASES_OP, crossover.AR_PERSISTENT_OP)}
    assert stacks and all(not runs for runs, _ in stacks.values())
    # the phased AR step (one program per SM streaming, a few full-GPU launches a block) wins only at few rows,
    # against both op by op and the skinny step: never past 128 rows
    phased = {k: v for k, v in table.items() if k[0] in (crossover.AR_PHASES_OP, crossover.AR_PERSISTENT_OP)}
    assert phased and all(runs and runs[-1][1] <= 128 for runs, _ in phased.values())
    # the AR step with skinny_linear launches wins at few rows (launch count, every SM streaming) and only there
    skinny = {k: v for k, v in table.items() if k[0] == crossover.SKINNY_OP}
    assert skinny and all(runs and runs[0][0] == 1 and runs[-1][1] <= 64 for runs, _ in skinny.values())
    # the MAR fused-linear step wins only at small N (launch-bound steps), never at large N (L2 traffic of its
    # 128 x 128 tiles with the fp32 LayerNorm input, MODEL)
    linear = {k: v for k, v in table.items() if k[0] == crossover.LINEAR_OP}
    assert linear and all(not runs or (runs[0][0] == 1 and runs[-1][1] <= 256) for runs, _ in linear.values())
    assert any(runs for runs, _ in linear.values())
    # precision="auto" on a GPU is fp16 autocast: every entry is there for fp16 as for bf16 (same bytes, same rate)
    keys = set(table)
    assert {(op, "float16", a, w) for op, dt, a, w in keys if dt == "bfloat16"} <= keys


def test_a_phased_pixel_head_phase_by_hand():
    """fractalar_in64's pixel head (W = 128, 4 heads, MLP 512, fp32 weights) at batch 1 with CFG (2 rows): the
    launcher's sm_90 config gives 2-row tiles and 2-column items, so PROJ is 64 programs, each reading the 2 rows of
    the attention output (2 x 128 fp32), its 2 weight rows (2 x 128 fp32) and read-modify-writing 2 x 2 outputs, in
    one K trip; a launch of its own (phases) or behind a grid barrier of 3 L2 round trips (persistent)."""
    from benchmarks.costmodel import pixel
    from benchmarks.costmodel.levels import build_levels
    lv = next(lv for lv in build_levels("fractalar_in64", 1) if lv.kind == "pixel")
    assert (lv.width, lv.hidden, lv.heads, lv.depth, lv.n) == (128, 512, 4, 3, 2)
    phases = dict((la.kernel.split()[-1], (la, n)) for la, n in pixel.phased(lv, H100, 90))
    proj, per_call = phases["PROJ"]
    assert per_call == 9 and proj.grid_ctas == 64 and proj.items_per_cta == 1
    assert proj.bytes_per_cta == 2 * 128 * 4 + 2 * 128 * 4 + 2 * 2 * 2 * 4
    assert proj.in_flight_bytes == 2 * 128 * 4 + 2 * 128 * 4  # the whole K in one trip
    t = launch_time(proj)
    assert t["terms"]["launch"] == pytest.approx(3e-6) and t["bound"] == "launch"
    persistent = dict((la.kernel.split()[-1], la) for la, _ in pixel.phased(lv, H100, 90, persistent=True))
    assert persistent["EMB"].launch_kind == "triton" and persistent["PROJ"].launch_kind == "barrier"
    assert launch_time(persistent["PROJ"])["terms"]["launch"] == pytest.approx(3 * 0.3e-6)
    # the phases of one call: 1 + 3 x (4 x 3 + 2) = 43, as the kernel's phase_count
    assert sum(n for _, n in pixel.phased(lv, H100, 90)) == 43
    # the tile kernel at batch 1: one program streams every weight 3 times (blocks and a codebook per channel)
    tiles = pixel.tiles(lv, H100, 90)
    blocks = 3 * (3 * 128 * 128 + 128 * 128 + 2 * 512 * 128) * 4
    assert tiles.grid_ctas == 1 and tiles.bytes_per_cta == 512 * 128 * 4 + 3 * (blocks + 256 * 128 * 4) + 16 * 512 * 2


def test_the_pixel_head_schedules_win_only_at_few_rows_and_persistent_needs_a_measurement(tmp_path, monkeypatch):
    from fractal_kernels._target import target_arch
    dispatch.reload()
    table = policy.block_stack_table()
    phases = {k: v for k, v in table.items() if k[0] == crossover.PIXEL_PHASES_OP}
    # the MODEL: the phased head beats the tile kernel from 1 row up to some hundreds, never at 65536 rows
    assert phases and all(k[1] == "float32" and runs and runs[0][0] == 1 and runs[-1][1] < 65536
                          for k, (runs, _) in phases.items())
    cuda = torch.device("cuda")
    with target_arch(90):
        assert dispatch.choose_schedule("pixel_head", None, cuda, 128, 2, torch.float32)[0] == "phases"
        assert dispatch.choose_schedule("pixel_head", None, cuda, 128, 65536, torch.float32)[0] == "tiles"
        assert dispatch.choose_schedule("pixel_head", None, cuda, 128, 2, torch.bfloat16)[0] == "tiles"  # no entry
        # the MODEL's persistent entry alone never picks it
        assert (crossover.PIXEL_PERSISTENT_OP, "float32", "sm_90", "128") in table
        assert dispatch.choose_schedule("pixel_head", "persistent", cuda, 128, 2, torch.float32)[0] == "persistent"
    assert dispatch.choose_schedule("pixel_head", None, torch.device("cpu"), 128, 2, torch.float32)[0] == "tiles"
    with pytest.raises(ValueError, match="schedule"):
        dispatch.choose_schedule("pixel_head", "fast", cuda, 128, 2, torch.float32)
    doc = {"entries": {crossover.PIXEL_PERSISTENT_OP: {"float32": {"sm_90": {"128": {"fused_n": [[1, 64]]}}}}}}
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path))
    (tmp_path / policy.BLOCK_STACK).write_text(json.dumps(doc))
    dispatch.reload()
    try:
        with target_arch(90):
            which, why = dispatch.choose_schedule("pixel_head", None, cuda, 128, 2, torch.float32)
            assert which == "persistent" and "measured" in why
            assert dispatch.choose_schedule("pixel_head", None, cuda, 128, 128, torch.float32)[0] == "phases"
    finally:
        monkeypatch.delenv("FRACTAL_HOME")
        dispatch.reload()
