"""The launches of one level step per path, with their shapes (a MODEL input).

Levels, their widths, depths, heads, Linear shapes and sampling schedule (rows, calls, steps) come from the
full-size model built on the meta device (``benchmarks.launches.roofline``); the launch *counts* of the pieces
we do not model one by one (indexing, concatenation, masks, copies, syncs) come from the exact counts of
``benchmarks.launches`` (committed for the published configs, counted on the fly for the tiny ones).

Grids, tiles, warps and stages come from each launcher's own config function at the original width
(``mar_stack_config``, ``ar_stack_config``, ``pixel_head_config``, tiny_attention's ``_attn_config`` /
``_packed_layout``) under ``fractal_kernels._target.target_arch``; CTAs per SM from the AOT report's row of that
specialization (``benchmarks/results/aot/full.json``), or, for kernels it has no row of, from the launcher's
warps and register cap. aten ops go through the tile model of ``constants.py``.

Paths (``levels.PATHS``): ``op_by_op`` (the kernel path, blocks op by op, aten linears), ``skinny`` / ``fused_linear``
(op by op with the AR / MAR levels' linears as ``skinny_linear`` / ``fused_linear`` launches), ``fused`` (the fused
block-stack kernel wherever the level has one), ``reference`` (the reference loop) and ``fast`` (per level what
dispatch picks, by the modeled crossover data at this N). All weights and activations 16-bit (the default
``precision="auto"`` on a GPU is fp16 autocast; bf16 moves the same bytes); KV-cache attention at the mean cache
length of the level.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import constants as C
from .launch import Launch, occupancy

EB = 2  # bytes per 16-bit element
F32 = 4
AOT_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "aot", "full.json")
BLOCK_LAUNCHES = {"MAR": 10, "AR": 13}  # benchmarks.launches.BLOCK_LAUNCHES: launches per block, op by op
STACK_KERNELS = {"MAR": "triton:_mar_stack_kernel", "AR": "triton:_ar_stack_decode_kernel"}
STACK_OPS = {"MAR": "mar_block_stack", "AR": "ar_block_stack_decode"}


@dataclass
class Level:
    """One level of a config at one batch."""
    label: str
    kind: str                         # "MAR" | "AR" | "pixel"
    width: int
    depth: int
    heads: int
    hidden: int
    tokens: int                       # sequence length (MAR), cache length (AR), 4 (pixel)
    linears: List[Tuple[int, int]]    # (out, in) of one block's Linear layers
    n: int                            # sequences (MAR) / rows (AR) / rows incl. both CFG halves (pixel) per call
    invocations_per_image: float      # level steps (pixel: calls) per image
    roof: Dict[str, float]
    c_in: int = 0                     # pixel heads: condition width
    fusable: bool = False
    counts: Dict[str, Dict[str, float]] = field(default_factory=dict)  # path -> launches/syncs per invocation


# ------------------------------------------------------------------------------------------------- AOT data
@functools.lru_cache(maxsize=None)
def _aot_rows(arch: int) -> Tuple[dict, ...]:
    try:
        with open(AOT_JSON, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return ()
    return tuple(r for r in rows if r.get("arch") == arch and r.get("status", "ok") == "ok" and r.get("ctas_per_sm"))


def aot_ctas_per_sm(kernel: str, arch: int, want: Dict[str, int], dtype: str = "bf16") -> Optional[int]:
    """CTAs per SM of the AOT row of ``kernel`` closest to ``want`` (case fields such as L / D / W), or None."""
    best, best_d = None, None
    for r in _aot_rows(arch):
        if r["kernel"] != kernel or (dtype and dtype not in r["case"] and "fp32" in r["case"]):
            continue
        fields = {k: int(v) for k, v in re.findall(r"\b(L|Lmax|D|W)=(\d+)", r["case"])}
        if "Lmax" in fields:
            fields["L"] = fields.pop("Lmax")
        if any(k in fields and k in ("D", "W") and fields[k] != v for k, v in want.items()):
            continue
        d = sum(abs(fields.get(k, v) - v) for k, v in want.items())
        if best_d is None or d < best_d:
            best, best_d = r, d
    return int(best["ctas_per_sm"]) if best else None


# ---------------------------------------------------------------------------------------------- launch kinds
def gemm(name: str, M: int, N: int, K: int, hw: C.Hardware, arch: int, kind: str = "eager") -> Launch:
    """An aten GEMM ``[M, K] @ [K, N]`` (16-bit) through the cuBLAS tile model of ``constants``."""
    multicast = 1
    if M <= C.GEMM_SKINNY_MAX_M:
        tm, tn = max(16, 1 << max(0, M - 1).bit_length()), C.GEMM_TILE_SKINNY_N
    elif arch >= 90:
        (tm, tn), multicast = C.GEMM_TILE_SM90, C.GEMM_SM90_CLUSTER
    else:
        tm, tn = C.GEMM_TILE_BIG
    rows = min(tm, M)
    grid = math.ceil(M / tm) * math.ceil(N / tn)
    unit = "HGMMA" if arch >= 90 and tm >= 64 and M >= 64 else "HMMA"
    # HBM: every operand once while the weights and the live K slices of one wave's A panels fit the L2 plan;
    # past it, the blocked traffic of an L2 holding three b x b blocks (b = sqrt(L2 / (3 x 2 B))): A and B read
    # once per b-wide block of the other
    unique = (N * K + M * K + M * N) * EB
    b = math.sqrt(hw.l2_plan_bytes / (3 * EB))
    hbm = max(unique, 2.0 * M * N * K * EB / b + M * N * EB) if N * K * EB > hw.l2_plan_bytes else unique
    return Launch(kernel=f"aten:{name}", grid_ctas=grid, ctas_per_sm=C.GEMM_CTAS_PER_SM,
                  bytes_per_cta=((rows * K + tn * K) / multicast + rows * tn) * EB,
                  in_flight_bytes=max(1, C.GEMM_STAGES - 1) * (rows + tn) * C.GEMM_BK * EB / multicast,
                  unique_bytes=hbm, weight_bytes=N * K * EB, working_set_bytes=min(hbm, hw.l2_plan_bytes),
                  flops_per_cta=2.0 * tm * tn * K, unit=unit, launch_kind=kind, meta={"M": M, "N": N, "K": K})


def elementwise(name: str, nbytes: float, kind: str = "eager") -> Launch:
    """An elementwise / norm / copy aten op moving ``nbytes`` (read + write): 2 KB per CTA in one round trip."""
    per = C.ELEM_BYTES_PER_CTA_IN_FLIGHT
    grid = max(1, math.ceil(nbytes / per))
    return Launch(kernel=f"aten:{name}", grid_ctas=grid, ctas_per_sm=C.ELEM_CTAS_PER_SM,
                  bytes_per_cta=min(per, nbytes), in_flight_bytes=min(per, max(nbytes, 1)), unique_bytes=nbytes,
                  launch_kind=kind)


def attention_mar(lv: Level, hw: C.Hardware, arch: int) -> Launch:
    """tiny_attention's packed forward over ``n`` sequences of ``tokens`` (bidirectional, bf16)."""
    from fractal_kernels._target import target_arch
    from fractal_kernels.ops.tiny_attention.launch import _attn_config, _packed_layout
    import triton
    from fractal_kernels.ops.tiny_attention.kernels import PACK_MAX_L
    L, dh = lv.tokens, lv.width // lv.heads
    nh = lv.n * lv.heads
    ctas = aot_ctas_per_sm("_attn_fwd_kernel", arch, {"L": L, "D": dh}) or 2
    unit = "HGMMA" if arch >= 90 else "HMMA"
    if L > PACK_MAX_L:  # streaming: one program per (sequence, head, query block), every key block streamed
        with target_arch(arch):
            cfg = _attn_config("fwd_stream", L, dh, torch.bfloat16, torch.device("cuda"))
        qb = math.ceil(L / cfg.block_m)
        per = (2 * cfg.block_m * dh + 2 * L * dh) * EB
        return Launch(kernel="triton:_attn_fwd_kernel(stream)", grid_ctas=nh * qb, ctas_per_sm=ctas,
                      bytes_per_cta=per, in_flight_bytes=max(1, cfg.num_stages - 1) * cfg.block_n * dh * EB * 2,
                      unique_bytes=nh * 4 * L * dh * EB, flops_per_cta=4.0 * cfg.block_m * L * dh, unit=unit,
                      launch_kind="triton", meta={"block_m": cfg.block_m, "block_n": cfg.block_n})
    with target_arch(arch):
        cfg = _attn_config("fwd", L, dh, torch.bfloat16, torch.device("cuda"))
    groups, lpk = _packed_layout(L, cfg.block_m)
    lpq = max(triton.next_power_of_2(L), 16 // groups)
    grid = math.ceil(nh / groups)
    per = groups * 4 * L * dh * EB
    return Launch(kernel="triton:_attn_fwd_kernel", grid_ctas=grid, ctas_per_sm=ctas, bytes_per_cta=per,
                  in_flight_bytes=per, unique_bytes=nh * 4 * L * dh * EB,
                  flops_per_cta=4.0 * (groups * lpq) * (groups * lpk) * dh, unit=unit,
                  launch_kind="triton", meta={"groups": groups, "block_m": cfg.block_m})


def attention_decode(lv: Level, hw: C.Hardware, arch: int) -> Launch:
    """tiny_attention's decode (one query per row against the KV cache, RoPE inside), mean cache length."""
    from fractal_kernels._target import target_arch
    from fractal_kernels.ops.tiny_attention.kernels import PACK_MAX_L, STREAM_BLOCK
    from fractal_kernels.ops.tiny_attention.launch import _attn_config, _packed_layout
    LK, dh = lv.tokens, lv.width // lv.heads
    t = (LK + 1) / 2.0
    nh = lv.n * lv.heads
    with target_arch(arch):
        cfg = _attn_config("decode", LK, dh, torch.bfloat16, torch.device("cuda"))
    if LK <= PACK_MAX_L:
        groups, _ = _packed_layout(LK, cfg.block_m)
        in_flight = None
    else:
        groups, in_flight = 1, max(1, cfg.num_stages - 1) * STREAM_BLOCK * dh * EB * 2
    per = groups * (2 * dh + 2 * t * dh) * EB
    ctas = aot_ctas_per_sm("_attn_fwd_kernel", arch, {"L": LK, "D": dh}) or 2
    return Launch(kernel="triton:_attn_fwd_kernel(decode)", grid_ctas=math.ceil(nh / groups), ctas_per_sm=ctas,
                  bytes_per_cta=per, in_flight_bytes=in_flight or per, unique_bytes=nh * (2 * dh + 2 * t * dh) * EB,
                  flops_per_cta=groups * 4.0 * 16 * t * dh, unit="HMMA", launch_kind="triton")


def _stack_params(lv: Level) -> Tuple[float, float]:
    """(16-bit matrix bytes, fp32 vector bytes) of a level's block stack."""
    mats = lv.depth * sum(o * i for o, i in lv.linears) * EB
    vecs = (lv.depth * (sum(o for o, _ in lv.linears) + 4 * lv.width) + 2 * lv.width) * F32
    return mats, vecs


def mar_stack(lv: Level, hw: C.Hardware, arch: int) -> Launch:
    """``_mar_stack_kernel``: a persistent grid, one sequence per program at a time, every weight per sequence."""
    from fractal_kernels.ops.mar_stack.launch import mar_stack_config, workspace_floats
    cfg = mar_stack_config(lv.width, lv.hidden, lv.width // lv.heads, lv.tokens, torch.bfloat16,
                           torch.device("cuda"))
    max_programs = 2 * hw.sms  # cfg.max_programs is 2 x the SMs of the device
    grid = max(1, min(lv.n, max_programs))
    mats, vecs = _stack_params(lv)
    ws = workspace_floats(cfg, lv.width, lv.hidden) * F32
    act = lv.tokens * lv.width * EB * 2
    per = mats + vecs + act + 2 * lv.depth * ws
    flops = lv.depth * (2.0 * cfg.lp * sum(o * i for o, i in lv.linears) + 4.0 * cfg.lp * cfg.lp * lv.width)
    return Launch(kernel="triton:_mar_stack_kernel", grid_ctas=grid, ctas_per_sm=occupancy(cfg.maxnreg or 255,
                  cfg.num_warps, hw=hw), bytes_per_cta=per, in_flight_bytes=cfg.kc * cfg.nc * EB,
                  unique_bytes=mats + vecs + lv.n * act + grid * ws, weight_bytes=mats,
                  working_set_bytes=mats + vecs + grid * ws, flops_per_cta=flops, unit="HMMA",
                  items_per_cta=math.ceil(lv.n / grid), launch_kind="triton",
                  note="CTAs/SM from num_warps=4 and maxnreg=255 (no AOT row in full.json)",
                  meta={"lp": cfg.lp, "kc": cfg.kc, "nc": cfg.nc, "num_stages": 1})


def ar_stack(lv: Level, hw: C.Hardware, arch: int) -> Launch:
    """``_ar_stack_decode_kernel``: ``cdiv(rows, 16)`` programs, each reading every weight of the stack."""
    from fractal_kernels.ops.ar_stack.launch import BM, ar_stack_config
    cfg = ar_stack_config(lv.width, lv.width // lv.heads, torch.bfloat16, torch.device("cuda"))
    grid = math.ceil(lv.n / BM)
    rows = min(BM, lv.n)
    mats, vecs = _stack_params(lv)
    t = (lv.tokens + 1) / 2.0
    kv = rows * lv.depth * 2 * (t + 1) * lv.width * EB
    ws = BM * (5 * lv.width + lv.hidden) * F32
    per = mats + vecs + kv + 2 * lv.depth * ws + 2 * rows * lv.width * EB
    flops = lv.depth * (2.0 * BM * sum(o * i for o, i in lv.linears) + 4.0 * BM * t * lv.width)
    return Launch(kernel="triton:_ar_stack_decode_kernel", grid_ctas=grid,
                  ctas_per_sm=occupancy(cfg.maxnreg or 255, cfg.num_warps, hw=hw), bytes_per_cta=per,
                  in_flight_bytes=cfg.kc * cfg.nc * EB, unique_bytes=mats + vecs + grid * (kv + ws),
                  weight_bytes=mats, working_set_bytes=mats + vecs + grid * ws, flops_per_cta=flops, unit="HMMA",
                  launch_kind="triton", note="CTAs/SM from num_warps=4 and maxnreg=255 (no AOT row in full.json)",
                  meta={"kc": cfg.kc, "nc": cfg.nc, "num_stages": 1})


SKINNY_REGS = 80  # registers of the widest specialization compiled for sm_90 (32-80: norm + qkv; no spills)


def skinny(name: str, M: int, N: int, K: int, hw: C.Hardware, arch: int, *, gate: bool = False, norm: bool = False,
           residual: bool = False, x_bytes: int = F32) -> Launch:
    """``_skinny_linear_kernel`` (``skinny_linear``): ``cdiv(N, BN) x cdiv(M, BM)`` programs from the launcher's own
    config at ``arch`` (>= one per SM), each streaming its ``[BN, K]`` weight rows (two with a gate) once; ``x``
    re-read by every program (twice with the RMSNorm prologue). In flight: one weight tile per program (Triton's
    pipeliner stages only loads that feed a ``tl.dot``; this kernel has none, so ``num_stages`` buys nothing)."""
    from fractal_kernels.ops.skinny_linear.launch import grid as sk_grid
    from fractal_kernels.ops.skinny_linear.launch import skinny_linear_config
    cfg = skinny_linear_config(M, N, K, gate, torch.device("cuda"), arch=arch, interpret=False)
    gx, gy = sk_grid(cfg, M, N)
    mats = 2 if gate else 1
    rows = min(cfg.bm, M)
    per = (mats * cfg.bn * K * EB + rows * K * x_bytes * (2 if norm else 1)
           + rows * cfg.bn * (F32 * 2 if residual else EB))
    ctas = aot_ctas_per_sm("_skinny_linear_kernel", arch, {}) or occupancy(SKINNY_REGS, cfg.num_warps, hw=hw)
    return Launch(kernel=f"triton:skinny_linear {name} {N}x{K}", grid_ctas=gx * gy, ctas_per_sm=ctas,
                  bytes_per_cta=per, in_flight_bytes=mats * cfg.bn * min(cfg.bk, K) * EB,
                  unique_bytes=gy * mats * N * K * EB + M * K * x_bytes + M * N * (F32 * 2 if residual else EB),
                  weight_bytes=mats * N * K * EB, flops_per_cta=2.0 * cfg.bm * cfg.bn * K * mats, unit="FMA",
                  launch_kind="triton", note=f"CTAs/SM from {SKINNY_REGS} registers x {cfg.num_warps} warps",
                  meta=cfg._asdict())


# (registers, shared memory bytes) of _fused_linear_kernel's 16-bit specializations per output tile, the worst of
# this session's sm_90 compiles (benchmarks/aot capture; 0 spills): occupancy from them and the config's warps
FUSED_LINEAR_RESOURCES = {(128, 128): (202, 90880), (64, 128): (214, 91136), (64, 64): (118, 57344)}


def fused_gemm(name: str, M: int, N: int, K: int, hw: C.Hardware, arch: int, *, norm: bool = False,
               gelu: bool = False, residual: bool = False, x_bytes: int = F32) -> Launch:
    """``_fused_linear_kernel`` (``fused_linear``): the launcher's own tile at ``arch`` (the largest with a program
    per SM), ``num_stages - 1`` A and W tiles in flight a program; the LayerNorm prologue re-reads the program's
    rows twice more (from L2); HBM: the input, the weight and the output once (plus the residual), blocked past
    the L2 as :func:`gemm`."""
    from fractal_kernels.ops.fused_linear.launch import fused_linear_config, grid as fl_grid
    cfg = fused_linear_config(M, N, K, torch.bfloat16, torch.device("cuda"), arch=arch, interpret=False)
    out_b = F32 if residual else EB
    rows = min(cfg.bm, M)
    per = (rows * K * x_bytes * (3 if norm else 1) + cfg.bn * K * EB + rows * cfg.bn * (out_b + (F32 if residual else 0)))
    unique = N * K * EB + M * K * x_bytes + M * N * (out_b + (F32 if residual else 0))
    b = math.sqrt(hw.l2_plan_bytes / (3 * EB))
    hbm = max(unique, 2.0 * M * N * K * EB / b + M * N * out_b) if N * K * EB > hw.l2_plan_bytes else unique
    regs, smem = FUSED_LINEAR_RESOURCES.get((cfg.bm, cfg.bn), (255, 0))
    return Launch(kernel=f"triton:fused_linear {name} {N}x{K}", grid_ctas=fl_grid(cfg, M, N)[0],
                  ctas_per_sm=occupancy(regs, cfg.num_warps, smem, hw=hw), bytes_per_cta=per,
                  in_flight_bytes=max(1, cfg.num_stages - 1) * (cfg.bm + cfg.bn) * cfg.bk * EB, unique_bytes=hbm,
                  weight_bytes=N * K * EB, working_set_bytes=min(hbm, hw.l2_plan_bytes),
                  flops_per_cta=2.0 * cfg.bm * cfg.bn * K,
                  unit="HGMMA" if arch >= 90 and cfg.bm >= 64 else "HMMA", launch_kind="triton",
                  note="registers / shared memory from this session's sm_90 compiles (FUSED_LINEAR_RESOURCES)",
                  meta=cfg._asdict())
