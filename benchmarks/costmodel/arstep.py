"""The phased AR decode step's launches (a MODEL input): ``_ar_step_phased_kernel`` (``ar_block_stack_decode``
with ``schedule="phases"``: a launch per phase, or ``"persistent"``: one launch, a grid barrier between phases).

One step of a level: ``INIT``, per block ``QKV`` / ``ATT`` / ``WO`` / ``W13`` / ``W2``, ``FINAL``. Items, column
widths and K chunks from the launcher's own ``ar_step_config`` at the original width; 16-bit weights (the engine
packs the level's linears in the autocast dtype), fp32 scratch and cache. Bytes per item: what its loops load and
store (QKV: the rows' RMSNorm pass, the operand chunks of its two products -- the columns and their RoPE pair
partners -- and both weight row sets, counted twice although the partners are the item's own rows, an L1 hit
on a GPU); bytes in flight: one loop trip's loads (FMA loops: not software-pipelined).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from . import constants as C
from .launch import Launch, occupancy, phase_launch

WB = 2   # 16-bit linear weights
F32 = 4  # scratch, cache
AR_STEP_REGS = 170  # registers of _ar_step_phased_kernel (8 warps, 255 cap), the worst of the CI subset (sm_90 fp32)


def _launch(kind: str, *args) -> Launch:
    return phase_launch(f"triton:_ar_step_phased_kernel {kind}", *args)


def phased(lv, hw: C.Hardware, arch: int, persistent: bool = False) -> List[Tuple[Launch, float]]:
    """``(launch, per step)`` of one decode step of the AR level ``lv`` at ``lv.n`` rows."""
    from fractal_kernels._target import target_arch
    from fractal_kernels.ops.ar_stack.phased import ar_step_config
    D, HID, H, depth, n = lv.width, lv.hidden, lv.heads, lv.depth, max(1, lv.n)
    HD = D // H
    with target_arch(arch):
        cfg = ar_step_config(D, HID, HD, n, torch.device("cuda"), arch=arch, interpret=False)
    br, bn, bk = cfg.br, cfg.bn, cfg.bk
    n_rt = math.ceil(n / br)
    ctas = 1 if persistent else occupancy(AR_STEP_REGS, cfg.num_warps, hw=hw)
    cap = hw.sms if persistent else cfg.max_programs
    nxt = "barrier" if persistent else "triton"
    t = (lv.tokens + 1) / 2.0  # mean cache length over the level's steps

    def cols(n_out, k, x_reads, mats, distinct, out_bytes):
        # a column-split phase: items (row tile, BN columns); the rows read x_reads times (QKV / W13: the RMSNorm
        # pass and one operand pass per product), mats weight row sets of BN x k a item (QKV: its columns and their
        # RoPE partners; W13: w1's and w3's), distinct of them distinct over the launch (QKV 1, W13 2); distinct
        # bytes: those weights, the rows, the outputs
        items = n_rt * (n_out // bn)
        kc = min(k, bk)
        per = x_reads * br * k * F32 + mats * bn * k * WB + out_bytes
        trip = max(1, x_reads - 1) * br * kc * F32 + mats * bn * kc * WB
        wts = distinct * n_out * k * WB
        return items, per, trip, wts, wts + n_rt * br * (k + n_out) * F32, 2.0 * br * bn * k * mats

    out: List[Tuple[Launch, float]] = []
    rows_b = n_rt * br * D * F32
    out.append((_launch("INIT", n_rt, cap, br * D * (F32 + F32), br * D * F32, 0.0, 2 * rows_b, 0.0, "triton", ctas),
                1.0))
    blk = [("QKV",) + cols(3 * D, D, 3, 2, 1, br * bn * F32),
           ("WO",) + cols(D, D, 1, 1, 1, 2 * br * bn * F32),
           ("W13",) + cols(HID, D, 3, 2, 2, br * bn * F32),
           ("W2",) + cols(D, HID, 1, 1, 1, 2 * br * bn * F32)]
    for name, items, per, trip, wts, unique, fl in blk:
        out.append((_launch(name, items, cap, per, trip, wts, unique, fl, nxt, ctas), float(depth)))
    att_per = HD * F32 * 2 + 2 * t * HD * F32
    out.append((_launch("ATT", n * H, cap, att_per, min(att_per, 2 * cfg.kb * HD * F32), 0.0, n * H * att_per,
                        4.0 * t * HD, nxt, ctas), float(depth)))
    out.append((_launch("FINAL", n_rt, cap, br * D * F32 + br * D * WB, br * D * F32, 0.0, rows_b, 0.0, nxt, ctas),
                1.0))
    return out
