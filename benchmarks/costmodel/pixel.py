"""The pixel head's launches per schedule (a MODEL input): the tile kernel (``_pixel_head_kernel``: a program runs
its pixels' whole 3-channel loop) and the phased kernel (``_pixel_head_phased_kernel``: the loop cut into phases
whose work is split over the grid; ``phases`` = a launch per phase, ``persistent`` = one launch, a grid barrier
between phases).

Weights are **fp32**: the engine packs the pixel head from its parameters, which stay fp32 under the default fp16
autocast (``fractal_models/engine/pixel_head.py packed_weights``), and both kernels read them as they are. The
condition rows are 16-bit (a level's output under autocast); the scratch between phases is fp32.

Grid, tiles and chunks come from the launchers' own config functions (``pixel_head_config``, ``phased_config``)
at the original width. Bytes per item: what the item's loops load and store; bytes in flight: one loop trip's
loads (the FMA loops are not software-pipelined: Triton stages only loads that feed a ``tl.dot``; the tile
kernel's 16-bit dots would be, but its fp32 weights take the "ieee" FMA dot with ``num_stages=1``).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from . import constants as C
from .launch import Launch, occupancy, phase_launch
from .workload import aot_ctas_per_sm, elementwise

WB = 4   # fp32 pixel-head weights (see the module docstring)
F32 = 4  # the phased kernel's scratch
EB = 2   # condition rows (16-bit under autocast)
VOCAB = 256
# registers of _pixel_head_phased_kernel, 4 warps, sm_90 (benchmarks/results/aot/ci.md; full.json has no row)
PHASED_REGS = 221
SAMPLER_FLOPS_PER_LOGIT = 40  # sanitize, filter + CFG mix (two softmaxes), softmax, the CDF scan and draw: ~40 ops


def _blocks_params(lv) -> int:
    return sum(o * i for o, i in lv.linears)


def tiles(lv, hw: C.Hardware, arch: int) -> Launch:
    """``_pixel_head_kernel`` (guided): a persistent grid over tiles of ``block_b`` pixel pairs; per tile and channel
    the blocks' weights and that channel's codebook stream through the program once (3 channels: 3 times a call),
    the condition projection once; one ``[KC, NC]`` weight chunk in flight."""
    from fractal_kernels._target import target_arch
    from fractal_kernels.ops.pixel_head.launch import pixel_head_config
    pairs = max(1, lv.n // 2)
    with target_arch(arch):
        cfg = pixel_head_config(lv.width, lv.hidden, lv.c_in, pairs, True, torch.float32, torch.device("cuda"))
    n_tiles = math.ceil(pairs / cfg.block_b)
    grid = max(1, min(n_tiles, cfg.max_programs))
    rows = 2 * cfg.block_b
    blocks = lv.depth * _blocks_params(lv) * WB
    unique = lv.c_in * lv.width * WB + blocks + 3 * VOCAB * lv.width * WB
    per_tile = lv.c_in * lv.width * WB + 3 * (blocks + VOCAB * lv.width * WB) + rows * lv.c_in * EB
    flops_row = lv.roof["fast_flops"] / max(1.0, lv.roof["rows_per_image"])
    ctas = aot_ctas_per_sm("_pixel_head_kernel", arch, {"W": lv.width}) or 1
    return Launch(kernel="triton:_pixel_head_kernel", grid_ctas=grid, ctas_per_sm=ctas, bytes_per_cta=per_tile,
                  in_flight_bytes=cfg.kc * cfg.nc * WB * max(1, cfg.num_stages - 1),
                  unique_bytes=unique + lv.n * lv.c_in * EB, weight_bytes=unique,
                  flops_per_cta=flops_row * rows, unit="FMA", items_per_cta=math.ceil(n_tiles / grid),
                  launch_kind="triton", meta={"block_b": cfg.block_b, "tiles": n_tiles})


def _phase(kind: str, *args) -> Launch:
    return phase_launch(f"triton:_pixel_head_phased_kernel {kind}", *args)


def phased(lv, hw: C.Hardware, arch: int, persistent: bool = False) -> List[Tuple[Launch, float]]:
    """``(launch, per call)`` of the phased kernel's phases (guided). ``persistent``: the first phase carries the
    launch, every later one a grid barrier instead (``launch_kind="barrier"``)."""
    from fractal_kernels.ops.pixel_head.phased import phased_config
    from fractal_kernels._target import target_arch
    W, HID, C_in, H, depth, n = lv.width, lv.hidden, lv.c_in, lv.heads, lv.depth, max(2, lv.n)
    DH = W // H
    with target_arch(arch):
        cfg = phased_config(W, H, n, torch.device("cuda"), arch=arch, interpret=False)
    br, bn = cfg.br, cfg.bn
    n_rt = math.ceil(n / br)
    rows_b = br * W * F32  # one row tile of the residual stream
    ctas = aot_ctas_per_sm("_pixel_head_phased_kernel", arch, {"W": W}) or occupancy(PHASED_REGS, cfg.num_warps, hw=hw)
    ctas = 1 if persistent else ctas  # the barrier's grid is one program per SM
    cap = hw.sms if persistent else cfg.max_programs
    nxt = "barrier" if persistent else "triton"

    def cols(n_out, k, x_bytes, x_reads, out_bytes):
        # a column-split phase: items (row tile, BN columns); x rows read x_reads times, BN weight rows of K
        items = n_rt * math.ceil(n_out / bn)
        kc = min(k, cfg.kc)
        per = x_reads * br * k * x_bytes + bn * k * WB + out_bytes
        trip = br * kc * x_bytes + bn * kc * WB
        return items, per, trip, n_out * k * WB, 2.0 * br * bn * k

    out: List[Tuple[Launch, float]] = []
    items, per, trip, wts, fl = cols(W, C_in, EB, 1, br * bn * F32)
    out.append((_phase("EMB", items, cap, per, trip, wts, wts + n * C_in * EB, fl, "triton", ctas), 1.0))
    # per channel and block (average cached tokens: 1 of 0, 1, 2)
    qkv_items = n_rt * H
    qkv_per = 2 * rows_b + 3 * DH * W * WB + (2 * 1 + 3) * br * DH * F32
    qkv_trip = br * cfg.kcq * F32 + 3 * DH * cfg.kcq * WB
    blk = [("QKV", qkv_items, qkv_per, qkv_trip, 3 * W * W * WB, 2.0 * 3 * br * DH * W),
           ("PROJ",) + cols(W, W, F32, 1, 2 * br * bn * F32),
           ("FC1",) + cols(HID, W, F32, 2, br * bn * F32),
           ("FC2",) + cols(W, HID, F32, 1, 2 * br * bn * F32)]
    for name, items, per, trip, wts, fl in blk:
        act = n_rt * per - wts  # every item's activation reads (L2) beside the distinct weights
        out.append((_phase(name, items, cap, per, trip, wts, wts + max(0.0, act), fl, nxt, ctas), 3.0 * depth))
    items, per, trip, wts, fl = cols(VOCAB, W, F32, 2, br * bn * F32)
    out.append((_phase("LOGITS", items, cap, per, trip, wts, wts + n * VOCAB * F32, fl, nxt, ctas), 3.0))
    pairs = max(1, n // 2)
    s_items = math.ceil(pairs / cfg.bp)
    s_per = 2 * cfg.bp * VOCAB * F32 + 2 * cfg.bp * W * (WB + F32)
    out.append((_phase("SAMPLE", s_items, cap, s_per, s_per, VOCAB * W * WB, s_items * s_per,
                       2.0 * cfg.bp * VOCAB * SAMPLER_FLOPS_PER_LOGIT, nxt, ctas), 3.0))
    return out


SCHEDULES = ("tiles", "phases", "persistent")


def step(lv, schedule: str, hw: C.Hardware, arch: int) -> List[Tuple[Launch, float]]:
    """``(launch, per call)`` of one pixel-head call on ``schedule``; the call's other counted launches (none
    today: ``kernel_launches`` is the head's own launch) ride along as elementwise ops."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    other = max(0.0, lv.counts["kernel_launches"] - 1.0)
    extra = []
    if other:
        extra = [(elementwise("pixel head glue", 2 * lv.n * 3 * F32), other)]
    if schedule == "tiles":
        return [(tiles(lv, hw, arch), 1.0)] + extra
    return phased(lv, hw, arch, persistent=schedule == "persistent") + extra
