"""AR decode step over the whole GPU: the configuration and the launcher of :mod:`.phased_kernels`
(``schedule="phases"``: one launch per phase; ``"persistent"``: one launch, grid barriers between phases).
:func:`fractal_kernels.ops.ar_stack.ar_block_stack_decode` calls it; the inputs are checked there."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

from fractal_kernels._scratch import workspace
from fractal_kernels._target import device_arch, sm_count
from fractal_kernels.dispatch import triton_interpreting
from fractal_kernels.ops._grid import barrier, check_schedule, launch_plan
from fractal_kernels.ops.ar_stack.phased_kernels import ATT, FINAL, HAS_TRITON, INIT, QKV, W13
from fractal_kernels.reference.ar_stack import ArStackWeights

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.ar_stack.phased_kernels import _ar_step_phased_kernel

PRODUCT = 8192  # elements of one [BR, BN, BK] accumulator: 32 fp32 registers a thread at 8 warps


class ArStepConfig(NamedTuple):
    """Launch configuration of :func:`_ar_step_phased_kernel` for one (width, rows, device)."""
    br: int  # rows per tile
    bn: int  # output columns per item of the column-split phases
    bk: int  # K chunk
    kb: int  # keys per attention chunk
    num_warps: int
    max_programs: int
    maxnreg: Optional[int]  # ptxas register cap (None: ptxas' choice)


def ar_step_config(width: int, hidden: int, head_dim: int, rows: int, device: torch.device, *,
                   arch: Optional[int] = None, interpret: Optional[bool] = None) -> ArStepConfig:
    """The one place the phased AR step's configuration is chosen. GPU: row tiles of ``min(16, rows)`` rows;
    output-column items as narrow as keeps the widest phase (3 D or the hidden width) at <= 2 items a program (8
    columns at D = 512 and 2 rows: 192 items for qkv and w1 | w3, 64 for wo and w2), the largest K chunk that
    keeps each ``[BR, BN, BK]`` accumulator at :data:`PRODUCT` elements (a whole 512-wide row in one trip at batch
    1), 32-key attention chunks, 8 warps and a 255-register cap, one program per SM at most (the persistent mode's
    barrier needs every program resident). The interpreter pays per program and op: 64-column items and whole-K
    chunks."""
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    br = max(2, min(16, triton.next_power_of_2(max(1, rows))))
    n_rt = math.ceil(rows / br)
    if interpret:
        bn = min(64, width & -width, hidden & -hidden)
        return ArStepConfig(br=br, bn=bn, bk=triton.next_power_of_2(max(width, hidden)), kb=16, num_warps=4,
                            max_programs=4, maxnreg=None)
    if arch is None:
        arch = device_arch(device)
    sms = sm_count(device, arch)
    # the widest phase (3 D or the hidden width) at <= 2 items a program: its weights in about 2 trips a program
    bn = 2
    while bn < 64 and n_rt * max(3 * width, hidden) // bn > 2 * sms:
        bn *= 2
    bn = min(bn, width & -width, hidden & -hidden)  # a power of two that divides D and the hidden width
    bk = max(16, min(triton.next_power_of_2(max(width, hidden)), PRODUCT // (br * bn)))
    return ArStepConfig(br=br, bn=bn, bk=bk, kb=32, num_warps=8, max_programs=sms, maxnreg=255)


def phase_count(depth: int) -> int:
    """Phases of one step: INIT, 5 a block, FINAL."""
    return 2 + 5 * depth


def phase_kind(ph: int, depth: int) -> int:
    """The kernel's decoding of phase ``ph`` (for the host's grid sizes)."""
    if ph == 0:
        return INIT
    d, i = divmod(ph - 1, 5)
    return FINAL if d >= depth else i


def phase_items(kind: int, cfg: ArStepConfig, width: int, hidden: int, heads: int, rows: int) -> int:
    """Work items of one phase of ``kind``."""
    n_rt = math.ceil(rows / cfg.br)
    if kind in (INIT, FINAL):
        return n_rt
    if kind == ATT:
        return rows * heads
    n_out = 3 * width if kind == QKV else hidden if kind == W13 else width
    return n_rt * (n_out // cfg.bn)


def launch_phased(x: torch.Tensor, w: ArStackWeights, cache: torch.Tensor, pos: int, freqs_cis: torch.Tensor,
                  num_heads: int, out: torch.Tensor, *, schedule: str = "phases",
                  config: Optional[ArStepConfig] = None, max_programs: Optional[int] = None) -> List[int]:
    """Run the phased step into ``out`` (inputs checked by the caller); ``schedule`` "phases" or "persistent"
    (CUDA only). Returns the grid of each launch."""
    check_schedule(schedule)
    bsz, dim = x.shape
    depth, hidden = w.wo.shape[0], w.w1.shape[1]
    hd = dim // num_heads
    cfg = config or ar_step_config(dim, hidden, hd, bsz, x.device)
    if dim % cfg.bn or hidden % cfg.bn or hd & (hd - 1):
        raise ValueError(f"config: bn={cfg.bn} must divide D={dim} and the hidden width {hidden}, and the head dim "
                         f"{hd} be a power of two (the phased step has no column masks)")
    nrp = math.ceil(bsz / cfg.br) * cfg.br
    ws = workspace(nrp * (3 * dim + hidden), x.device)
    cap = max(1, max_programs or cfg.max_programs)
    launches = launch_plan(schedule, x.device, phase_count(depth),
                           lambda p: phase_items(phase_kind(p, depth), cfg, dim, hidden, num_heads, bsz), cap)
    rnd = {torch.bfloat16: 1, torch.float16: 2}.get(w.wqkv.dtype, 0)
    bar = barrier(x.device)
    grids = []
    for start, end, grid in launches:
        _ar_step_phased_kernel[(grid,)](
            x, w.wqkv, w.wo, w.w1, w.w3, w.w2, w.attn_norm, w.ffn_norm, w.rms_eps, w.norm_w, w.norm_b, cache,
            freqs_cis, out, ws, bar,
            bsz, pos, depth, cache.shape[3], x.stride(0), float(w.norm_eps), hd ** -0.5, start, end,
            D=dim, DP=triton.next_power_of_2(dim), H=num_heads, HD=hd, HID=hidden, NRP=nrp, BR=cfg.br, BN=cfg.bn,
            BK=cfg.bk, KB=cfg.kb, ROUND=rnd,
            BARRIER=schedule == "persistent", num_warps=cfg.num_warps, num_stages=1, maxnreg=cfg.maxnreg,
        )
        grids.append(grid)
    return grids
