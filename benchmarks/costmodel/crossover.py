"""The modeled crossovers of the fused block stacks and of the AR skinny-linear step, written as package data for
the dispatch (a MODEL). ``ar_skinny_step`` (AR levels: the step's linears as ``skinny_linear`` launches vs aten
linears) is read by ``fractal_models.engine.ar.explain_skinny_step``, ``mar_linear_step`` (MAR levels: the step's
linears as ``fused_linear`` launches) by ``fractal_models.engine.mar.explain_fused_linear_step``
(``policy.crossover_rule``).

For every published level that has a fused block stack (``mar_block_stack``: MAR levels of length <= 64;
``ar_block_stack_decode``: AR levels), and each modeled GPU (H100 -> sm_90, A100 -> sm_80), the level step's
modeled time fused and op by op at N = 1, 2, 4, ..., 65536 sequences / rows. Per (op, dtype, arch, width) the
document lists the N ranges where the fused step's modeled time is lower at every level of that width
(``fused_n``: inclusive ``[lo, hi]`` of grid points; an N between grid points counts as fused only inside a
range). ``fractal_kernels.policy.block_stack_ranges`` reads it, ``dispatch.choose_block_stack`` follows it; a
measured file of the same form in the overlay (``$FRACTAL_HOME/block_stack_model.json``, a GPU run) overrides
an entry. ``tests/test_costmodel.py`` checks that the committed file equals what the model regenerates.

Attention (op ``attention_sdpa``, :mod:`benchmarks.costmodel.attention`): per (dtype, arch, head dim) not N ranges
but ``sdpa_from_l``, the first length from which PyTorch SDPA's modeled forward beats tiny_attention's at every
modeled ``N x H`` (null: nowhere up to ``dispatch.ATTENTION_MAX_L``), with the lengths it wins at per ``N x H`` and
the bound of each side; ``fractal_kernels.policy.attention_model_length`` reads it (package data only: a measured
crossover is ``attention_crossover.json``'s, per device name).
"""
from __future__ import annotations

import copy
import json
from typing import Dict, List, Sequence

from fractal_kernels.policy import AR_PERSISTENT_OP, AR_PHASES_OP, PIXEL_PERSISTENT_OP, PIXEL_PHASES_OP

from . import attention
from . import constants as C
from .levels import build_levels, step_time, with_n
from .workload import STACK_OPS

N_GRID = tuple(2 ** k for k in range(17))
PUBLISHED = ("fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
             "fractalmar_huge_in256")
DTYPE = "bfloat16"  # the modeled 16-bit dtype (bf16 and fp16 move the same bytes at the same tensor-core rate)
# the entries are written for both: precision="auto" on a GPU is fp16 autocast (the public code's choice), and
# bf16 is the other 16-bit precision; the dispatch looks its call's dtype up
DTYPES = ("bfloat16", "float16")
SKINNY_OP = "ar_skinny_step"  # fractal_models.engine.ar.SKINNY_OP: the AR step with skinny_linear launches
LINEAR_OP = "mar_linear_step"  # fractal_models.engine.mar.LINEAR_OP: the MAR step with fused_linear launches
# the pixel-head schedules (fractal_kernels.policy's ops; vs the tile kernel, N = rows per call, both CFG halves),
# keyed by float32: the engine passes the head's fp32 parameters (benchmarks/costmodel/pixel.py)
PIXEL_DTYPE = "float32"


def ranges(wins: Sequence[bool], grid: Sequence[int] = N_GRID) -> List[List[int]]:
    """Inclusive ``[lo, hi]`` runs of grid points where ``wins`` is true."""
    out: List[List[int]] = []
    last = False
    for n, w in zip(grid, wins):
        if w and last:
            out[-1][1] = n
        elif w:
            out.append([n, n])
        last = w
    return out


def _add(entries: dict, op: str, path: str, lv, config: str, hardware: Sequence[str], dtype: str = DTYPE,
         against: Sequence[str] = ("op_by_op",)) -> None:
    """Fold one level's modeled step times on ``path`` vs the fastest of ``against`` (default op by op with aten
    linears; a pixel head: the tile kernel) into ``entries[op]``."""
    for name in hardware:
        hw, arch = C.HARDWARE[name], C.ARCH[name]
        times = [(step_time(with_n(lv, n), path, hw, arch),
                  min(step_time(with_n(lv, n), p, hw, arch) for p in against)) for n in N_GRID]
        e = entries.setdefault(op, {}).setdefault(dtype, {}).setdefault(f"sm_{arch}", {}).setdefault(
            str(lv.width), {"levels": [], "wins": [True] * len(N_GRID), "best_ratio": None})
        e["levels"].append(f"{config} {lv.label} (depth {lv.depth}, L {lv.tokens})")
        e["wins"] = [a and f < o for a, (f, o) in zip(e["wins"], times)]
        ratio = max(o / f for f, o in times)  # the baseline's / the path's at its best N (> 1: it wins somewhere)
        e["best_ratio"] = ratio if e["best_ratio"] is None else min(e["best_ratio"], ratio)


def sweep(configs: Sequence[str] = PUBLISHED, hardware: Sequence[str] = ("H100", "A100")) -> Dict[str, object]:
    """The crossover document (see the module docstring)."""
    entries: Dict[str, Dict[str, Dict[str, Dict[str, dict]]]] = {}
    for config in configs:
        for lv in build_levels(config, 1):
            if lv.kind == "MAR":
                _add(entries, LINEAR_OP, "fused_linear", lv, config, hardware)
            if lv.kind == "AR":
                _add(entries, SKINNY_OP, "skinny", lv, config, hardware)
                # the phased step where it beats op by op *and* the skinny step (dispatch takes it first)
                _add(entries, AR_PHASES_OP, "ar_phases", lv, config, hardware, against=("op_by_op", "skinny"))
                _add(entries, AR_PERSISTENT_OP, "ar_persistent", lv, config, hardware,
                     against=("op_by_op", "skinny", "ar_phases"))
            if lv.fusable:
                _add(entries, STACK_OPS[lv.kind], "fused", lv, config, hardware)
            if lv.kind == "pixel":
                _add(entries, PIXEL_PHASES_OP, "phases", lv, config, hardware, PIXEL_DTYPE)
                _add(entries, PIXEL_PERSISTENT_OP, "persistent", lv, config, hardware, PIXEL_DTYPE)
    for by_dtype in entries.values():
        for by_arch in by_dtype.values():
            for by_width in by_arch.values():
                for e in by_width.values():
                    e["fused_n"] = ranges(e.pop("wins"))
                    e["best_ratio"] = round(e["best_ratio"], 4)
        for other in DTYPES if DTYPE in by_dtype else ():
            by_dtype.setdefault(other, copy.deepcopy(by_dtype[DTYPE]))
    if hardware:  # SDPA vs tiny_attention, 16-bit: the same figures for bf16 and fp16
        sdpa = attention.sweep(hardware)
        entries[attention.OP] = {dt: copy.deepcopy(sdpa) for dt in DTYPES}
    return {
        "schema": 1,
        "kind": "MODEL",
        "source": "python -m benchmarks.costmodel --write-policy (benchmarks/costmodel: per-launch cost MODEL with the "
                  "constants of shared/PERFORMANCE.md; nothing measured)",
        "n_grid": list(N_GRID),
        "note": "fused_n: inclusive [lo, hi] ranges of N (sequences / rows per call) where the op's modeled step time "
                "(mar_block_stack / ar_block_stack_decode: the fused block stack; ar_skinny_step: the AR step with "
                "skinny_linear launches; mar_linear_step: the MAR step with fused_linear launches; pixel_head_phases / "
                "pixel_head_persistent: the pixel head's phased schedule, a launch per phase / one launch with grid "
                "barriers, fp32 weights, N = rows per call; ar_step_phases / ar_step_persistent: the AR step's phased "
                "kernel, the same two ways, against the fastest of op by op, the skinny step and (persistent) the phases) "
                "beats op-by-op with aten linears (a pixel head: its tile "
                "kernel) at every published level of that width; "
                "best_ratio: op-by-op / the op's modeled time at its best N (< 1: it loses everywhere); "
                "attention_sdpa: per head dim, sdpa_from_l = the first sequence length from which PyTorch SDPA's "
                "modeled forward beats tiny_attention's at every modeled N x H (null: nowhere up to "
                "dispatch.ATTENTION_MAX_L), sdpa_wins_l = where it does per N x H, bounds = kernel / SDPA bound",
        "entries": entries,
    }


def dumps(doc: Dict[str, object]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"
