"""The one table of constants of the per-launch cost MODEL, each with its source.

Machine figures are copied from ``shared/PERFORMANCE.md`` ("The constants a model of this project uses (fixed
here, pessimistic end; not fitted)") as they stand there. Nothing here is fitted to a target or to the upstream
figures; change a figure only with a measurement from a GPU run, and say which run.

The tile model of the aten GEMMs (cuBLAS) and of the elementwise aten ops is ours, stated here once: it is a
MODEL of a library we cannot read, documented so that a GPU run can refute it.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple


class Hardware(NamedTuple):
    name: str
    sms: int
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    l2_plan_bytes: float          # the L2 size to plan reuse within
    hbm_latency_s: float
    l2_latency_s: float
    hgmma_flops: float            # dense 16-bit tensor cores, >= 64-row tiles (0: no wgmma on this arch)
    hmma_flops: float             # dense 16-bit tensor cores, mma.sync
    fma_flops: float              # fp32 FMA, no tensor cores
    regs_per_sm: int
    smem_per_sm: int
    max_warps_per_sm: int
    max_ctas_per_sm: int
    launch_eager_s: float         # an eager PyTorch op (host)
    launch_triton_s: float        # a bare Triton launch
    launch_graph_s: float         # a CUDA-graph node
    sync_s: float                 # host <-> device sync


# shared/PERFORMANCE.md, "The constants a model of this project uses" (H100 SXM / A100 SXM columns) and "The
# machine" (per-SM registers, shared memory, warps, CTAs: spec).
HARDWARE: Dict[str, Hardware] = {
    "H100": Hardware("H100 SXM", sms=132, hbm_bytes_per_s=3.0e12, l2_bytes_per_s=5.5e12, l2_plan_bytes=25e6,
                     hbm_latency_s=0.6e-6, l2_latency_s=0.3e-6, hgmma_flops=800e12, hmma_flops=400e12,
                     fma_flops=50e12, regs_per_sm=65536, smem_per_sm=228 * 1024, max_warps_per_sm=64,
                     max_ctas_per_sm=32, launch_eager_s=5e-6, launch_triton_s=3e-6, launch_graph_s=2e-6,
                     sync_s=10e-6),
    "A100": Hardware("A100 SXM", sms=108, hbm_bytes_per_s=1.8e12, l2_bytes_per_s=3.5e12, l2_plan_bytes=20e6,
                     hbm_latency_s=0.6e-6, l2_latency_s=0.3e-6, hgmma_flops=0.0, hmma_flops=250e12,
                     fma_flops=17e12, regs_per_sm=65536, smem_per_sm=164 * 1024, max_warps_per_sm=64,
                     max_ctas_per_sm=32, launch_eager_s=5e-6, launch_triton_s=3e-6, launch_graph_s=2e-6,
                     sync_s=10e-6),
}
ARCH = {"H100": 90, "A100": 80}
SOURCES = {
    "sms, hbm, l2 bandwidth, l2 plan size, latencies, tensor-core / FMA peaks, launch and sync costs":
        "shared/PERFORMANCE.md, table 'The constants a model of this project uses' (pessimistic end, not fitted)",
    "registers / shared memory / warps / CTAs per SM": "shared/PERFORMANCE.md, 'The machine' (spec)",
    "bytes in flight per CTA = max(1, num_stages - 1) tiles": "shared/PERFORMANCE.md, 'Bytes in flight per CTA'",
    "registers, shared memory, warps of a Triton specialization": "benchmarks/results/aot/full.json (sm_90 rows); "
        "where a kernel has no row there, its launcher's num_warps and register cap (maxnreg) (see launch.py)",
    "cuBLAS tile model": "ours (this file): a MODEL, no source; a GPU run must check it",
    "SDPA tile model (FlashAttention-2-style forward)": "ours (this file, SDPA_*): a MODEL of PyTorch's fused "
        "attention, no source read; a GPU run (benchmarks/attention.py crossover_rows) must check it",
    "grid barrier = 3 L2 round trips": "ours (this file, BARRIER_L2_TRIPS): derived from the L2 latency; a GPU run "
                                       "must check it",
    "upstream figures": "fractalgen issue #13 (21 s, one FractalAR-64 image, RTX 4090) and issue #19 (~7 min for "
                        "512 FractalMAR-L images on one H100: ~0.82 s/img)",
}

# ---- aten tile model (ours, a MODEL) ------------------------------------------------------------------------
# cuBLAS GEMM: 128 x 128 output tiles with K steps of 64 and 4 pipeline stages (3 tiles in flight), 2 CTAs per
# SM; M <= 64 rows take tiles of max(16, next power of two of M) rows x 64 columns (the skinny-GEMM kernels; 16
# is the smallest M of an mma). 16-bit operands on sm_90 with >= 64-row tiles
# run on wgmma (HGMMA), else HMMA; fp32 operands run as TF32 is off by default in PyTorch: FMA.
# sm_90: 128 x 256 tiles in 2-CTA clusters with TMA multicast (each operand tile read from the L2 once per
# cluster): the 128 x 128 model above would make an 8192^3 matmul L2-bound at ~330 TFLOP/s, against the ~800
# measured in shared/PERFORMANCE.md; this one makes it compute-bound (tests/test_costmodel.py checks the anchor).
GEMM_TILE_BIG: Tuple[int, int] = (128, 128)
GEMM_TILE_SM90: Tuple[int, int] = (128, 256)
GEMM_SM90_CLUSTER = 2
GEMM_TILE_SKINNY_N = 64
GEMM_SKINNY_MAX_M = 64
GEMM_BK = 64
GEMM_STAGES = 4
GEMM_CTAS_PER_SM = 2
# elementwise / norm / copy aten ops: 4 warps x 32 threads x 16 bytes per thread per CTA in flight, enough CTAs
# to cover the tensor, 8 CTAs per SM
ELEM_BYTES_PER_CTA_IN_FLIGHT = 4 * 32 * 16
ELEM_CTAS_PER_SM = 8

# PyTorch SDPA's fused attention forward (ours, a MODEL of a library we cannot read): FlashAttention-2 on sm_80,
# FlashAttention-2 / cuDNN on sm_90, modeled alike as FlashAttention-2's forward: one CTA per (sequence, head,
# 128-row query tile), the query tiles of one head adjacent in the grid (so its keys and values are re-read from the
# L2), 128-key tiles of K and V streamed with 2 stages (one K and one V tile in flight), 4 warps; the head dim
# padded to a multiple of 32 (FlashAttention-2's head-dim kernels 32, 64, 96, 128: D = 16 runs the 32 one, D = 80
# the 96 one), every tile computed whole (padded rows and keys included); mma.sync (HMMA) on both archs (the
# FlashAttention-2 kernels are sm_80 code; a cuDNN wgmma kernel on sm_90 would be faster: this is the slow end);
# 16-bit q, k, v and output only (bf16 and fp16 alike; fp32 inputs take another kernel, not modeled). CTAs per SM
# from shared memory (the query tile + 2 stages of K and V tiles, 16-bit, at the padded head dim) and registers
# (SDPA_REGS a thread: ptxas's cap, the slow end); one eager PyTorch op (no output copy: the [N, H, L, D] result
# is what tiny_attention returns). benchmarks/attention.py's crossover rows measure it against the kernel.
SDPA_BLOCK_M = 128
SDPA_BLOCK_N = 128
SDPA_STAGES = 2
SDPA_WARPS = 4
SDPA_REGS = 255
SDPA_D_MULTIPLE = 32

# a grid-wide barrier between two phases of a persistent launch (the phased pixel head's "persistent" schedule):
# ours, a MODEL derived from the L2 latency of the table, never measured: the release fence before the arrival,
# the arrival atomic, and the poll that sees the last arrival, each one L2 round trip (3 x 0.3 us = 0.9 us; the
# "No Bubbles" anchor asks ~1 us of a gap between dependent steps). The GPU session's pixel-head phase measures
# the persistent and the phased launch side by side, which bounds it.
BARRIER_L2_TRIPS = 3

# the README's sampling settings (CFG on: two rows per image) and the published batches of the issue
BATCHES = (1, 8, 64, 256)
SAMPLING = {"cfg": 11.0, "temperature": 1.03, "cfg_schedule": "linear"}

# upstream figures (reference loop), for the beside-the-figure check; never fitted to
UPSTREAM = (
    {"figure": "fractalgen #13", "config": "fractalar_in64", "batch": 1, "hardware": "RTX 4090",
     "measured_s_per_image": 21.0,
     "note": "our constants are H100's: the RTX 4090 has ~1.0 TB/s and ~165 TFLOP/s; the reference loop is "
             "launch-bound, so the host terms dominate either way"},
    {"figure": "fractalgen #19", "config": "fractalmar_large_in256", "batch": 512, "hardware": "H100",
     "measured_s_per_image": 0.82, "note": "~7 min for 512 images on one H100"},
)

# issue #28's targets (MODEL, H100)
TARGETS = {("fractalar_in64", 1): 0.5, ("fractalmar_large_in256", 256): 0.10}
BIG_WEIGHT_LAUNCH_BYTES = 8e6  # no fast-path launch reading >= 8 MB of weights on fewer CTAs than SMs
