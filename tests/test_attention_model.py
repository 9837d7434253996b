"""PyTorch SDPA against tiny_attention in the cost MODEL (``benchmarks.costmodel.attention``), the crossover length
it writes into the package data. Nothing here needs a GPU; every figure is a MODEL."""
import math

import pytest
import torch

from benchmarks.costmodel import attention as A
from benchmarks.costmodel import constants as C
from benchmarks.costmodel.launch import launch_time

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
