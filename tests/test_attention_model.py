"""PyTorch SDPA against tiny_attention in the cost MODEL (``benchmarks.costmodel.attention``), the crossover length
it writes into the package data, and the attention dispatch that reads it (a measured crossover first, then the
MODEL's length on a CUDA device, else the kernel). Nothing here needs a GPU; every figure is a MODEL."""
import json
import math

import pytest
import torch

from benchmarks.costmodel import attention as A
from benchmarks.costmodel import constants as C
from benchmarks.costmodel import crossover
from benchmarks.costmodel.launch import launch_time
from benchmarks.costmodel.levels import build_levels
from fractal_kernels import dispatch, policy
from fractal_kernels._record import record
from fractal_kernels._target import target_arch

H100, A100 = C.HARDWARE["H100"], C.HARDWARE["A100"]
BF16 = torch.bfloat16


def test_an_sdpa_launch_by_hand():
    """4096 sequences x 8 heads x 261 tokens, D = 64, on the H100: 3 query tiles of 128 rows a head; shared memory
    (128 + 2 x 2 x 128) x 64 x 2 B = 80 KB and 255 registers x 128 threads: 2 CTAs an SM; a CTA reads its 128 query
    rows and all 261 key and value rows and writes 128 output rows; its tensor-core work is 128 x 384 padded keys at
    the 64 head dim; the heads of a wave (88) keep their keys and values in the L2, so HBM sees each byte once. The
    padded tiles make it compute-bound: 373 waves of 2 CTAs sharing an SM's mma.sync peak."""
    s = A.sdpa(4096, 8, 261, 64, H100, 90)
    assert s.grid_ctas == 4096 * 8 * 3 and s.ctas_per_sm == 2 and s.launch_kind == "eager" and s.unit == "HMMA"
    assert s.bytes_per_cta == (2 * 128 * 64 + 2 * 261 * 64) * 2
    assert s.in_flight_bytes == 2 * 128 * 64 * 2  # one K and one V tile ahead (2 stages)
    assert s.flops_per_cta == 4 * 128 * 384 * 64
    assert s.working_set_bytes == 88 * 4 * 261 * 64 * 2 < H100.l2_plan_bytes
    t = launch_time(s, H100)
    waves = math.ceil(s.grid_ctas / (132 * 2))
    assert t["bound"] == "compute (HMMA)" and waves == 373
    assert t["seconds"] == pytest.approx(waves * 2 * s.flops_per_cta / (400e12 / 132) + 5e-6)
    assert t["terms"]["HBM"] == pytest.approx(4096 * 8 * 4 * 261 * 64 * 2 / 3.0e12)
    # the padded head dim: D = 16 runs the 32-wide kernel, D = 80 the 96-wide one (120 KB of tiles: 1 CTA an SM)
    assert A.padded_d(16) == 32 and A.padded_d(80) == 96 and A.sdpa(2, 16, 22, 80, H100, 90).ctas_per_sm == 1


def test_the_model_says_where_sdpa_wins():
    """tiny_attention wins at L = 21 (one packed pass) at both N x H on both GPUs. At 4096 x 8 SDPA wins from L = 65
    (D = 32 / 64), where the kernel streams: its grid runs a head's query blocks N x H programs apart, so every block
    re-reads the head's keys and values from HBM (HBM-bound), while SDPA's query tiles of a head are adjacent
    (L2 hits; compute-bound on its padded tiles). At 2 x 16 the kernel wins at every length (launch-bound: a Triton
    launch, 3 us, against an eager op, 5 us). So the length that holds at every N x H is None everywhere: the MODEL
    hands no length the kernels take to SDPA."""
    doc = A.sweep()
    for arch in ("sm_90", "sm_80"):
        for d in ("16", "32", "64", "80"):
            e = doc[arch][d]
            assert e["sdpa_from_l"] is None and e["sdpa_from_l_by_nh"]["2x16"] is None
            assert 21 not in e["sdpa_wins_l"]["4096x8"] and not e["sdpa_wins_l"]["2x16"]
            assert e["bounds"]["4096x8"]["261"] == "HBM / compute (HMMA)"
        assert doc[arch]["64"]["sdpa_from_l_by_nh"]["4096x8"] == 65
    for hw, arch in ((H100, 90), (A100, 80)):
        for n, h in A.NH_GRID:
            assert launch_time(A.kernel(n, h, 21, 64, hw, arch), hw)["seconds"] < \
                launch_time(A.sdpa(n, h, 21, 64, hw, arch), hw)["seconds"]
        assert launch_time(A.kernel(2, 16, 261, 64, hw, arch), hw)["seconds"] < \
            launch_time(A.sdpa(2, 16, 261, 64, hw, arch), hw)["seconds"]


def test_the_package_data_holds_the_model_and_the_fast_path_charges_what_dispatch_picks():
    """The committed crossover document carries the sweep for both 16-bit dtypes (the regeneration check of
    tests/test_costmodel.py covers it), and the cost model's fast path charges tiny_attention at every published MAR
    level because no MODEL length reaches a published one (else that path would have to charge SDPA)."""
    with open(policy.package_path(policy.BLOCK_STACK), encoding="utf-8") as f:
        entries = json.load(f)["entries"][A.OP]
    assert entries["bfloat16"] == entries["float16"] == json.loads(json.dumps(A.sweep()))
    dispatch.reload()
    table = policy.attention_model_table()
    assert table[("bfloat16", "sm_90", "64")] is None and len(table) == 2 * 2 * len(A.HEAD_DIMS)
    for config in crossover.PUBLISHED:
        for lv in build_levels(config, 1):
            if lv.kind == "MAR":
                for arch in ("sm_90", "sm_80"):
                    n = table[("bfloat16", arch, str(lv.width // lv.heads))]
                    assert n is None or lv.tokens < n


def test_attention_dispatch_measured_then_model_then_the_kernel(tmp_path, monkeypatch):
    """On a CUDA device (no real GPU: the backend resolution is stubbed to Triton, the device named) the MODEL's
    length for the arch decides; a measured crossover in the overlay for this device name overrides it; a CPU device
    and an arch without MODEL data keep today's rule (the kernel up to ATTENTION_MAX_L)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    model = {"entries": {A.OP: {"bfloat16": {"sm_90": {"64": {"sdpa_from_l": 128}, "80": {"sdpa_from_l": None}}}}}}
    (pkg / policy.BLOCK_STACK).write_text(json.dumps(model))
    monkeypatch.setattr(policy, "PACKAGE_DIR", str(pkg))
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dispatch, "resolve", lambda op, backend, device, **kw: record(op, "triton"))
    monkeypatch.setattr(dispatch, "device_name", lambda index=None: "Fake GPU")
    ask = lambda L, D=64, device=cuda, dtype=BF16: dispatch.explain_attention(  # noqa: E731
        "tiny_attention", None, dtype, device, D, L)
    dispatch.reload()
    try:
        with target_arch(90):
            which, why = ask(128)
            assert which == "sdpa" and "MODEL crossover on sm_90 D=64: SDPA from L=128" in why and str(pkg) in why
            assert dispatch.last_backend("tiny_attention") == "sdpa"
            assert ask(127)[0] == "triton"
            assert dispatch.choose_attention("tiny_attention", None, BF16, cuda, 64, 200) == "sdpa"  # same signature
            which, why = ask(512, D=80)
            assert which == "triton" and "tiny_attention wins at every length" in why
            assert ask(512, dtype=torch.float16)[0] == "triton"  # no entry for fp16 here: the kernel
            assert ask(128, device=cpu)[0] == "triton"  # on a CPU nothing changes
            assert ask(600)[0] == "sdpa" and "no kernel" in ask(600)[1]  # past ATTENTION_MAX_L, as before
            assert dispatch.explain_attention("tiny_attention", "triton", BF16, cuda, 64, 200) == ("triton", "forced")
        with target_arch(80):
            which, why = ask(200)
            assert which == "triton" and "no crossover" in why
        # a measured crossover for this device name (the overlay a GPU run writes) overrides the MODEL both ways
        policy.write_document(policy.overlay_path(policy.CROSSOVER), {"Fake GPU": {"bfloat16": {"64": 513, "80": 96}}})
        dispatch.reload()
        with target_arch(90):
            which, why = ask(200)
            assert which == "triton" and "measured crossover on 'Fake GPU': SDPA from L=513" in why
            assert str(tmp_path / "home") in why
            assert ask(96, D=80)[0] == "sdpa" and ask(95, D=80)[0] == "triton"
    finally:
        monkeypatch.undo()
        dispatch.reload()


def test_describe_names_the_model_lengths():
    dispatch.reload()
    text = "\n".join(policy.describe("Some GPU"))
    assert "attention crossover on 'Some GPU': none measured: auto follows the MODEL's length" in text
    assert f"attention, SDPA from L (MODEL, {policy.package_path(policy.BLOCK_STACK)}): bfloat16 sm_80 D=16: never" \
        in text


def test_the_model_lookup_reads_no_file_per_call(monkeypatch):
    """The attention dispatch is hot: after the first call the MODEL table and the policy come from the caches."""
    import builtins
    monkeypatch.setattr(dispatch, "resolve", lambda op, backend, device, **kw: record(op, "triton"))
    monkeypatch.setattr(dispatch, "device_name", lambda index=None: "Fake GPU")
    dispatch.reload()
    opens, real_open = [], builtins.open
    with target_arch(90):
        assert dispatch.choose_attention("tiny_attention", None, BF16, torch.device("cuda"), 64, 261) == "triton"
        monkeypatch.setattr(builtins, "open", lambda *a, **kw: opens.append(a[0]) or real_open(*a, **kw))
        for _ in range(50):
            dispatch.choose_attention("tiny_attention", None, BF16, torch.device("cuda"), 64, 261)
    assert not opens
