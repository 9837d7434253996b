"""PyTorch SDPA's fused attention forward beside tiny_attention's, and the length from which SDPA wins (a MODEL).

:func:`sdpa` is one launch of SDPA's fused forward for a bidirectional MAR attention call (``N`` sequences x ``H``
heads x ``L`` tokens x head dim ``D``, 16-bit) through the tile model of ``constants.SDPA_*`` (ours: a
FlashAttention-2-style forward, a MODEL of a library we cannot read); :func:`kernel` is tiny_attention's launch of
the same call (``workload.attention_mar``: the launcher's own config at the arch).

:func:`sweep` compares them per modeled GPU (H100 -> sm_90, A100 -> sm_80) and head dim ``D`` in :data:`HEAD_DIMS`
over the lengths :data:`L_GRID` at each ``N x H`` of :data:`NH_GRID` (many sequences, and a few), and writes, per
``dtype`` ("bfloat16", "float16": the same bytes at the same tensor-core rate), ``"sm_XX"`` and ``D``, an entry of
the crossover document (:mod:`benchmarks.costmodel.crossover`, op :data:`OP`, i.e.
``fractal_kernels/data/block_stack_model.json``)::

    {"sdpa_from_l": first grid L from which SDPA's modeled time is lower at every N x H and every grid L up to
                    dispatch.ATTENTION_MAX_L (null: the kernel wins somewhere at the longest lengths),
     "sdpa_from_l_by_nh": {"<N>x<H>": the same at that N x H alone},
     "sdpa_wins_l": {"<N>x<H>": [grid L where SDPA's modeled time is lower]},
     "bounds": {"<N>x<H>": {"<L>": "<kernel's bound> / <SDPA's bound>"}}}

``fractal_kernels.policy.attention_model_length`` reads ``sdpa_from_l``; ``dispatch.explain_attention`` hands a
call with ``L >= sdpa_from_l`` to SDPA on a CUDA device of that arch unless a measured crossover
(``attention_crossover.json``, per device name) decides. Past ``ATTENTION_MAX_L`` SDPA runs whatever the MODEL says
(the kernels take no longer sequence). Nothing here has run on a GPU.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

from . import constants as C
from .launch import Launch, launch_time, occupancy
from .workload import EB, Level, attention_mar

OP = "attention_sdpa"  # fractal_kernels.policy.ATTENTION_MODEL_OP
HEAD_DIMS = (16, 32, 64, 80)  # the published levels' head dims (pixel heads 16 / 32, MAR / AR levels 64 / 80)
L_GRID = (4, 8, 16, 17, 21, 22, 32, 64, 65, 128, 129, 256, 257, 261, 384, 512)
NH_GRID = ((4096, 8), (2, 16))  # (sequences, heads) per call: a big batch's level and a single image's


def padded_d(D: int) -> int:
    """The head dim SDPA's kernel computes at (``constants.SDPA_D_MULTIPLE``)."""
    return C.SDPA_D_MULTIPLE * math.ceil(D / C.SDPA_D_MULTIPLE)


def sdpa(N: int, H: int, L: int, D: int, hw: C.Hardware, arch: int) -> Launch:
    """SDPA's fused forward over ``N x H`` sequences of ``L`` tokens (bidirectional, 16-bit), one eager launch:
    ``N * H * ceil(L / SDPA_BLOCK_M)`` CTAs, each reading its query rows and every key and value row of its head
    and writing its output rows; the tiles computed whole at the padded head dim; the keys and values of the heads
    one wave runs are the L2 working set (a head's query tiles are adjacent in the grid)."""
    bm, bn = C.SDPA_BLOCK_M, C.SDPA_BLOCK_N
    dp = padded_d(D)
    qtiles = math.ceil(L / bm)
    grid = N * H * qtiles
    smem = (bm + 2 * C.SDPA_STAGES * bn) * dp * EB
    ctas = occupancy(C.SDPA_REGS, C.SDPA_WARPS, smem, hw=hw)
    rows = min(bm, L)
    head = 4 * L * D * EB  # q, k, v and o of one (sequence, head)
    heads_in_flight = math.ceil(min(grid, hw.sms * ctas) / qtiles)
    return Launch(kernel="aten:scaled_dot_product_attention (flash fwd)", grid_ctas=grid, ctas_per_sm=ctas,
                  bytes_per_cta=(2 * rows * D + 2 * L * D) * EB,
                  in_flight_bytes=max(1, C.SDPA_STAGES - 1) * 2 * bn * D * EB,
                  unique_bytes=N * H * head, working_set_bytes=heads_in_flight * head,
                  flops_per_cta=4.0 * bm * bn * math.ceil(L / bn) * dp, unit="HMMA", launch_kind="eager",
                  note="SDPA tile model of constants.py (ours, a MODEL)",
                  meta={"block_m": bm, "block_n": bn, "padded_d": dp, "smem": smem})


def kernel(N: int, H: int, L: int, D: int, hw: C.Hardware, arch: int) -> Launch:
    """tiny_attention's launch of the same call (``workload.attention_mar``)."""
    lv = Level(label=f"attention N={N} H={H} L={L} D={D}", kind="MAR", width=H * D, depth=1, heads=H, hidden=0,
               tokens=L, linears=[], n=N, invocations_per_image=1.0, roof={})
    return attention_mar(lv, hw, arch)


def _from(grid: Sequence[int], wins: Sequence[bool]) -> Optional[int]:
    """The first grid length of the final run of lengths where SDPA wins (None: it loses at the longest)."""
    start = None
    for L, w in zip(reversed(grid), reversed(wins)):
        if not w:
            break
        start = L
    return start


def sweep(hardware: Sequence[str] = ("H100", "A100")) -> Dict[str, Dict[str, dict]]:
    """``{"sm_XX": {str(D): entry}}`` (the entry: see the module docstring)."""
    from fractal_kernels.dispatch import ATTENTION_MAX_L
    grid = [L for L in L_GRID if L <= ATTENTION_MAX_L]
    out: Dict[str, Dict[str, dict]] = {}
    for name in hardware:
        hw, arch = C.HARDWARE[name], C.ARCH[name]
        for D in HEAD_DIMS:
            wins, bounds = {}, {}
            for N, H in NH_GRID:
                key = f"{N}x{H}"
                ts = [(launch_time(kernel(N, H, L, D, hw, arch), hw), launch_time(sdpa(N, H, L, D, hw, arch), hw))
                      for L in grid]
                wins[key] = [L for L, (k, s) in zip(grid, ts) if s["seconds"] < k["seconds"]]
                bounds[key] = {str(L): f"{k['bound']} / {s['bound']}" for L, (k, s) in zip(grid, ts)}
            every = [all(L in w for w in wins.values()) for L in grid]
            by_nh = {key: _from(grid, [L in w for L in grid]) for key, w in wins.items()}
            out.setdefault(f"sm_{arch}", {})[str(D)] = {"sdpa_from_l": _from(grid, every), "sdpa_from_l_by_nh": by_nh,
                                                        "sdpa_wins_l": wins, "bounds": bounds}
    return out
