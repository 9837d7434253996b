"""Fused pixel head over the whole GPU: the launch configuration and the launcher of
:mod:`.phased_kernels` (``schedule="phases"``: one launch per phase; ``"persistent"``: one launch, grid barriers).

Which schedule runs by default is :func:`fractal_kernels.dispatch.choose_schedule`'s call (the cost
MODEL's crossover data); this module only runs the one it is given.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

from fractal_kernels._scratch import workspace
from fractal_kernels._target import device_arch, sm_count as _sm_count
from fractal_kernels.dispatch import triton_interpreting
from fractal_kernels.ops._grid import barrier, check_schedule, launch_plan
from fractal_kernels.ops.pixel_head.phased_kernels import (EMB, FC1, HAS_TRITON, LOGITS, QKV, SAMPLE)
from fractal_kernels.reference.pixel_head import VOCAB, PixelHeadWeights

if HAS_TRITON:
    from fractal_kernels.ops.pixel_head.phased_kernels import _pixel_head_phased_kernel

PRODUCT = 4096  # elements of one [BR, KC, N] FMA product: 32 fp32 registers a thread at 4 warps


class PhasedConfig(NamedTuple):
    """Launch configuration of :func:`_pixel_head_phased_kernel` for one (width, rows, device)."""
    br: int  # rows per tile
    bn: int  # output columns per item of the column-split phases
    kc: int  # K chunk of those phases
    kcq: int  # K chunk of the QKV phase ([BR, KCQ, head dim] products)
    bp: int  # pixels per sampler item
    dot: int  # 1: the column-split phases use the tile kernel's _dot (BR, BN >= 16), 0: broadcast FMA products
    dotq: int  # the same for the QKV phase (BR, head dim >= 16)
    maxnreg: Optional[int]  # ptxas register cap (None: ptxas' choice)
    num_warps: int
    max_programs: int  # programs of a launch (the persistent mode: all co-resident)


def phased_config(width: int, heads: int, n_rows: int, device: torch.device, *, arch: Optional[int] = None,
                  interpret: Optional[bool] = None) -> PhasedConfig:
    """The one place the phased pixel head's configuration is chosen. GPU: row tiles of ``min(16, rows)`` rows (2 at
    batch 1 with CFG); output-column items as narrow as gives a W-wide output about one item per SM (2 columns at
    batch 1: a 128-wide output is 64 programs, the 512-wide MLP 256; up to 16 columns at hundreds of rows), K
    chunks that keep each FMA product at :data:`PRODUCT` elements, 8-pixel sampler items, 4 warps, one program per
    SM at most (the persistent mode's barrier needs every program resident; one per SM always is). The
    interpreter pays per program and op: whole-width tiles, 4 programs."""
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    br = max(2, min(16, 1 << max(0, n_rows - 1).bit_length()))
    dh = width // heads
    if interpret:
        return PhasedConfig(br=br, bn=min(64, width), kc=width, kcq=width, bp=8, dot=0, dotq=0, num_warps=4,
                            max_programs=4, maxnreg=None)
    if arch is None:
        arch = device_arch(device)
    sms = _sm_count(device, arch)
    cap = 255 if arch < 90 else None  # sm_80's ptxas settles at ~168 registers and spills unless told it may take 255
    n_rt = math.ceil(n_rows / br)
    bn = max(2, min(16, 1 << max(0, math.ceil(n_rt * width / sms) - 1).bit_length()))
    if br >= 16:  # dot tiles: 16 columns at least, K chunks of up to 128 (16 KB of operands a trip)
        bn = 16
        return PhasedConfig(br=br, bn=bn, kc=min(64, width), kcq=min(32, width), bp=8, dot=1,
                            dotq=int(dh >= 16), num_warps=8, max_programs=sms, maxnreg=cap)
    kc = min(width, max(8, PRODUCT // (br * bn)))
    kcq = min(width, max(8, PRODUCT // (br * dh)))
    return PhasedConfig(br=br, bn=bn, kc=kc, kcq=kcq, bp=8, dot=0, dotq=0, num_warps=4, max_programs=sms,
                        maxnreg=cap)


def phase_count(depth: int) -> int:
    """Phases of one call: the condition's projection, then per channel ``4 depth`` block phases, logits, draw."""
    return 1 + 3 * (4 * depth + 2)


def phase_kind(ph: int, depth: int) -> Tuple[int, int, int]:
    """(kind, channel, block) of phase ``ph`` (the kernel's decoding, for the host's grid sizes)."""
    if ph == 0:
        return EMB, 0, 0
    c, r = divmod(ph - 1, 4 * depth + 2)
    if r < 4 * depth:
        return QKV + r % 4, c, r // 4
    return (LOGITS if r == 4 * depth else SAMPLE), c, 0


def phase_items(kind: int, cfg: PhasedConfig, width: int, heads: int, hidden: int, n_rows: int, bsz: int) -> int:
    """Work items of one phase of ``kind``: the programs that phase can use."""
    n_rt = math.ceil(n_rows / cfg.br)
    if kind == QKV:
        return n_rt * heads
    if kind == SAMPLE:
        return math.ceil(bsz / cfg.bp)
    n_out = hidden if kind == FC1 else VOCAB if kind == LOGITS else width
    return n_rt * math.ceil(n_out / cfg.bn)


def scratch_floats(cfg: PhasedConfig, width: int, hidden: int, depth: int, n_rows: int) -> int:
    if width % cfg.bn or VOCAB % cfg.bn:  # the kernel masks only the MLP's columns
        raise ValueError(f"config: bn={cfg.bn} must divide the width {width} and {VOCAB}")
    nrp = math.ceil(n_rows / cfg.br) * cfg.br
    return nrp * (3 * width + hidden + VOCAB + max(depth, 1) * 4 * width)


def launch_phased(cond, weights: PixelHeadWeights, num_heads, guided, cfg_t, cfg_scalar, inv_temp, filter_threshold,
                  top_p, greedy, uniforms, seed_lo, seed_hi, offset, ids, logits=None, exponentials=None,
                  value_table=None, values=None, *, schedule: str = "phases", config: Optional[PhasedConfig] = None,
                  max_programs: Optional[int] = None) -> List[int]:
    """Run the phased kernel with :func:`.launch._launch_triton`'s arguments; ``schedule`` "phases" (one launch per
    phase) or "persistent" (one launch with grid barriers: CUDA only). Returns the grid of each launch."""
    check_schedule(schedule)
    w = PixelHeadWeights(*(t.contiguous() for t in weights))
    rows, c_in = cond.shape
    interp = cond.device.type == "cpu" and triton_interpreting()
    bsz = ids.shape[0]
    width, depth, hidden = w.ln_w.shape[0], w.qkv_w.shape[0], w.fc1_w.shape[1]
    n_rows = 2 * bsz if guided else bsz
    cfg = config or phased_config(width, num_heads, n_rows, cond.device)
    if width % cfg.bn or VOCAB % cfg.bn:  # the kernel masks only the MLP's columns
        raise ValueError(f"config: bn={cfg.bn} must divide the width {width} and {VOCAB}")
    nrp = math.ceil(n_rows / cfg.br) * cfg.br
    ws = workspace(scratch_floats(cfg, width, hidden, depth, n_rows), cond.device)
    uni = uniforms.double().contiguous() if uniforms is not None else torch.empty(1, dtype=torch.float64,
                                                                                   device=cond.device)
    exp = exponentials.float().contiguous() if exponentials is not None else ws
    draw = 3 if greedy else 2 if exponentials is not None else 1 if uniforms is not None else 0
    cap = max(1, max_programs or cfg.max_programs)
    launches = launch_plan(schedule, cond.device, phase_count(depth),
                           lambda p: phase_items(phase_kind(p, depth)[0], cfg, width, num_heads, hidden, n_rows, bsz),
                           cap)
    bar = barrier(cond.device)  # the phases never touch it (one buffer a device and stream, not one a call)
    args = (cond, *w, cfg_t if cfg_t is not None else ws, uni, exp, ids, ws, logits if logits is not None else ws,
            value_table if value_table is not None else ws, values if values is not None else ws, bar)
    grids = []
    for start, end, grid in launches:
        _pixel_head_phased_kernel[(grid,)](
            *args, bsz, c_in, n_rows, cond.stride(0), depth, start, end,
            (width // num_heads) ** -0.5, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
            int(cfg_t is not None), draw, int(top_p < 1.0), int(logits is not None), int(value_table is not None),
            GUIDED=guided, W=width, H=num_heads, DH=width // num_heads, HID=hidden, NRP=nrp, BR=cfg.br, BN=cfg.bn,
            KC=cfg.kc, KCQ=cfg.kcq, BP=cfg.bp, V=VOCAB, DOT=2 if interp and cfg.dot else cfg.dot,
            DOTQ=2 if interp and cfg.dotq else cfg.dotq, BARRIER=schedule == "persistent",
            num_warps=cfg.num_warps, num_stages=1, maxnreg=cfg.maxnreg,
        )
        grids.append(grid)
    return grids
