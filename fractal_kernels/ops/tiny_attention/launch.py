"""Tiny-sequence attention: launch configuration per GPU arch, the launchers of the Triton kernels (and the
CUDA extension's entry), the ``[N, L, H, D]`` output layout and the input checks shared by the entry points.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch

from fractal_kernels._checks import host_checks
from fractal_kernels._target import device_arch
from fractal_kernels.dispatch import _cuda_ext, triton_interpreting
from fractal_kernels.ops.tiny_attention.kernels import (HAS_TRITON, MAX_D, PACK_MAX_L, STREAM_BLOCK, SUPPORTED_D,
                                                        TILE)

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.tiny_attention.kernels import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,
                                                            _attn_bwd_packed_kernel, _attn_fwd_kernel)


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _Cfg(NamedTuple):
    """Launch configuration of one kernel call: tile rows ``block_m`` (packed kernels: rows of the whole tile),
    key block ``block_n`` (packed: 0 = the tile's keys in one pass), warps and software-pipelining depth."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _attn_config(kind: str, L: int, D: int, dtype: torch.dtype, device, arch: Optional[int] = None) -> _Cfg:
    """Tile sizes, warps and stages of every attention launch, per (kind, L, D, dtype, GPU arch).

    ``kind``: "fwd" (L <= PACK_MAX_L: packed, one key pass), "fwd_stream", "decode" (packed or streaming
    over the cache), "bwd" (packed), "dkdv" and "dq" (the streaming backward). Chosen from the ahead-of-time
    compile data (registers, spills, shared memory on sm_80 and sm_90): a packed kernel's key loop runs
    once, so software pipelining only buys shared memory (``num_stages=1``; decode at 3 needs 184-200 KB
    and cannot launch on an A100); fp32 inputs keep "ieee" dots, which are FMA loops holding both operands
    in registers, so they get smaller tiles. ``arch`` defaults to :func:`device_arch` of ``device`` (tests pick
    sm_80 / sm_90 with :func:`fractal_kernels._target.target_arch`); the interpreter runs these tiles too."""
    if arch is None:
        arch = device_arch(device)
    f32 = dtype == torch.float32
    bd = _block_d(D)
    lp = triton.next_power_of_2(max(L, 1))
    if L <= PACK_MAX_L and kind in ("fwd", "bwd", "decode"):
        # Packed tiles. sm_90: 64 rows feed wgmma (a warpgroup's M is 64); sm_80 (mma.sync) and fp32 (FMA
        # dots hold a thread's rows of both operands over the whole K in registers): 32 rows keep the
        # [tile, tile] scores, masks and operands under 255 registers (64 rows: 0.1-2.8 KB of spills on
        # sm_80, the 32-register fallback with 8 KB of stack in fp32). The backward holds q, k, v, o, dO and
        # three [tile, tile] fp32 products: 32 rows everywhere, 8 warps for fp32 and for D = 80 (padded to 128).
        # fp32 at D = 80 takes 32 warps: five [32, 128] fp32 operands plus the FMA dots' operand copies do not
        # fit a thread's 255 registers at 8 warps (28 B of spills on sm_80) nor 128 at 16 (4-32 B); at 32
        # warps ptxas needs 46 registers and spills nothing on either arch.
        if kind == "decode":
            return _Cfg(max(64 if arch >= 90 else 32, lp), 0, 4, 1)
        if kind == "fwd":
            # fp32 takes twice the warps of 16-bit (8 at D <= 64, 16 at D = 80): at 4 warps Triton 3.6's
            # sm_90 code for MAR L=21 D=64 spills 16 B (168 registers), and at 8 warps D = 80 spills 84/56 B;
            # with 8 / 16 warps neither Triton 3.6 nor 3.9 spills on sm_80 or sm_90 (56-80 registers).
            tile = 64 if arch >= 90 and not f32 else 32
            warps = (16 if bd >= 128 else 8) if f32 else (8 if bd >= 128 else 4)
            return _Cfg(max(tile, lp), 0, warps, 1)
        return _Cfg(max(32, lp), 0, 32 if f32 and bd >= 128 else 8 if bd >= 128 or f32 else 4, 1)
    if kind == "decode":  # a few queries streaming over a long cache
        return _Cfg(16, STREAM_BLOCK, 4, 1)
    # Streaming kernels (L > PACK_MAX_L): 64 x 64 blocks spill on sm_80 and at D = 128 (dk/dv up to 1.5 KB).
    # fp32: 32 x 32 blocks, the backward's with 8 warps and no pipelining (the FMA dots' operands fill the
    # registers that the pipeline's buffers would take).
    if kind == "fwd_stream":
        return _Cfg(32, 32, 8 if bd >= 128 else 4, 2) if f32 else _Cfg(64, 32, 4, 3)
    if kind == "dkdv":  # one program: BLOCK_N keys held (k, v, dk, dv), BLOCK_M queries streamed
        # fp32 sm_80 at D = 80: 16 warps (ptxas settles at 80 registers and spills 8 B with 8; 64 with 16, none)
        if f32:
            return _Cfg(32, 32, 8, 1) if arch >= 90 else _Cfg(16, 32, 16 if bd >= 128 else 8, 1)
        return _Cfg(32, 32, 4, 2)
    if kind == "dq":  # one program: BLOCK_M queries held (q, dO, dq), BLOCK_N keys streamed
        return _Cfg(32, 32, 8, 1) if f32 else _Cfg(32, 64, 4, 2)
    raise ValueError(f"kind: unknown attention launch {kind!r}")


def _packed_layout(L: int, tile: int = TILE) -> Tuple[int, int]:
    """(pairs per program G, padded length Lp) of the packed kernels for a length L <= PACK_MAX_L."""
    lp = triton.next_power_of_2(max(L, 1))
    return max(1, tile // lp), lp


def _precision(q: torch.Tensor) -> str:
    """``tl.dot`` precision: fp32 inputs keep true fp32 products ("ieee": the reference's fp32 attention; Triton's
    default would be TF32); fp16/bf16 inputs use the tensor cores (the backward's fp32-upcast dots as TF32)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _out_like_heads_last(q: torch.Tensor, L: int) -> torch.Tensor:
    """An ``[N, H, L, D]`` view of a fresh ``[N, L, H, D]`` buffer: ``o.transpose(1, 2).reshape(N, L, H*D)``
    is then free for the output projection."""
    N, H, _, D = q.shape
    return torch.empty(N, L, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)


def _seed_words(seed: int) -> Tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def _triton_fwd(q, k, v, o, lse, lens, causal, scale, decode=False, freqs=None, p_drop=0.0, seed=0):
    N, H, LQ, D = q.shape
    LK = k.shape[2]
    NH = N * H
    dot_f32 = triton_interpreting() or q.dtype == torch.float32
    lens_arg = lens if lens is not None else lse
    freqs_arg = freqs if freqs is not None else lse
    P = freqs.shape[0] if freqs is not None else 1
    if LK <= PACK_MAX_L:
        # whole sequences, several pairs per program (decode: a few queries against a short cache)
        cfg = _attn_config("decode" if decode else "fwd", LK, D, q.dtype, q.device)
        groups, lpk = _packed_layout(LK, cfg.block_m)
        lpq = max(triton.next_power_of_2(LQ), 16 // groups)  # tl.dot needs >= 16 rows
        bm, bn = groups * lpq, groups * lpk
        grid = (triton.cdiv(NH, groups), 1)
    else:
        cfg = _attn_config("decode" if decode else "fwd_stream", LK, D, q.dtype, q.device)
        groups, lpq, lpk = 1, 1, 1
        bm, bn = (cfg.block_m if LQ > 16 else 16), cfg.block_n
        grid = (NH, triton.cdiv(LQ, bm))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, lens_arg, freqs_arg, NH, H, LQ, LK, D, P, scale, p_drop, *_seed_words(seed), 0,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        CAUSAL=causal, HAS_LENS=lens is not None, DECODE=decode, ROPE=freqs is not None, DOT_F32=dot_f32,
        GROUPS=groups, LPQ=lpq, LPK=lpk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), PREC=_precision(q),
        DROPOUT=p_drop > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _triton_bwd(do, q, k, v, o, lse, lens, causal, scale, dq, dk, dv, p_drop=0.0, seed=0):
    N, H, L, D = q.shape
    NH = N * H
    bd = _block_d(D)
    lens_arg = lens if lens is not None else lse
    if L <= PACK_MAX_L:
        cfg = _attn_config("bwd", L, D, q.dtype, q.device)
        groups, lp = _packed_layout(L, cfg.block_m)
        _attn_bwd_packed_kernel[(triton.cdiv(NH, groups),)](
            q, k, v, o, do, lse, lens_arg, dq, dk, dv, NH, H, L, D, scale, p_drop, *_seed_words(seed), 0,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
            *_strides(dq), *_strides(dk), *_strides(dv),
            CAUSAL=causal, HAS_LENS=lens is not None, GROUPS=groups, LP=lp, BLOCK=groups * lp, BLOCK_D=bd,
            PREC=_precision(q), DROPOUT=p_drop > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    delta = (do.float() * o.float()).sum(-1).reshape(NH, L)  # [N*H, L]
    args = (H, L, D, scale, p_drop, *_seed_words(seed), 0, *_strides(q), *_strides(k), *_strides(v), *_strides(do))
    c = _attn_config("dkdv", L, D, q.dtype, q.device)
    _attn_bwd_dkdv_kernel[(NH, triton.cdiv(L, c.block_n))](
        q, k, v, do, lse, delta, lens_arg, dk, dv, *args, *_strides(dk), *_strides(dv), CAUSAL=causal,
        HAS_LENS=lens is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=bd, PREC=_precision(q),
        DROPOUT=p_drop > 0, num_warps=c.num_warps, num_stages=c.num_stages)
    c = _attn_config("dq", L, D, q.dtype, q.device)
    _attn_bwd_dq_kernel[(NH, triton.cdiv(L, c.block_m))](
        q, k, v, do, lse, delta, lens_arg, dq, *args, *_strides(dq), CAUSAL=causal, HAS_LENS=lens is not None,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=bd, PREC=_precision(q), DROPOUT=p_drop > 0,
        num_warps=c.num_warps, num_stages=c.num_stages)


def _fwd_into(q, k, v, o, lse, lens, causal, scale, backend, p_drop=0.0, seed=0):
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return
    if backend == "cuda":
        _cuda_ext().tiny_attention_fwd(q, k, v, o, lse, lens, causal, scale)
    else:
        _triton_fwd(q, k, v, o, lse, lens, causal, scale, p_drop=p_drop, seed=seed)


def _bwd_into(do, q, k, v, o, lse, lens, causal, scale, backend, dq, dk, dv, p_drop=0.0, seed=0):
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return
    if backend == "cuda":
        _cuda_ext().tiny_attention_bwd(do, q, k, v, o, lse, dq, dk, dv, lens, causal, scale)
    else:
        _triton_bwd(do, q, k, v, o, lse, lens, causal, scale, dq, dk, dv, p_drop=p_drop, seed=seed)



# ---- input checks ----------------------------------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name}: expected float32, float16 or bfloat16 (float64: torch backend), got {dtype}")


def _check_head_dim_scale(name: str, D: int, scale) -> None:
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{name}: head dim D={D} unsupported (1..{MAX_D}; tuned for {SUPPORTED_D})")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")


def _check_qkv(q, k, v, scale, same_length: bool = True) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a [N, H, L, D] tensor, got {_shape(t)}")
        _check_dtype(name, t.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them to one dtype")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: on different devices q {q.device}, k {k.device}, v {v.device}")
    N, H, L, D = q.shape
    if same_length and (k.shape != q.shape or v.shape != q.shape):
        raise ValueError(f"k, v: expected the shape of q {tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not same_length and (k.shape[:2] != q.shape[:2] or k.shape[3] != D or v.shape != k.shape):
        raise ValueError(f"k_cache, v_cache: expected [N={N}, H={H}, Lmax, D={D}], got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    _check_head_dim_scale("q", D, scale)


def _check_lens(seqlens, N: int, L: int, device, name: str = "seqlens") -> Optional[torch.Tensor]:
    if seqlens is None:
        return None
    if not isinstance(seqlens, torch.Tensor) or seqlens.shape != (N,) or seqlens.dtype.is_floating_point:
        raise ValueError(f"{name}: expected an integer tensor of shape [N={N}], got {_shape(seqlens)}")
    if seqlens.device != device:
        raise ValueError(f"{name}: expected it on {device} like q, got {seqlens.device}")
    # the value check reads the device (a host sync per call on CUDA): CPU tensors or FRACTAL_KERNELS_DEBUG=1
    # only; the kernels treat values outside [0, L] as clamped to it (never out of bounds)
    if seqlens.numel() and host_checks(device) and (int(seqlens.min()) < 0 or int(seqlens.max()) > L):
        raise ValueError(f"{name}: values must lie in [0, {L}], got [{int(seqlens.min())}, {int(seqlens.max())}]")
    return seqlens.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=1024)
def _uniform_lens(n: int, length: int, device: torch.device) -> torch.Tensor:
    """``[n]`` int32 lengths all equal to ``length``, made once: a decode step would otherwise spend an op
    (a launch on a GPU) building it. The kernels only read it."""
    return torch.full((n,), length, dtype=torch.int32, device=device)


def _check_strides(which: str, **tensors) -> None:
    if which in ("triton", "cuda"):
        for name, t in tensors.items():
            if t.stride(-1) != 1:
                raise ValueError(f"{name}: the head dim must be contiguous (stride(-1) == 1) for the {which} "
                                 f"kernel, got strides {t.stride()}")



def _dropout_seed(dropout_p, dropout_seed) -> int:
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a number in [0, 1), got {dropout_p!r}")
    if dropout_p == 0.0:
        return 0
    if dropout_seed is None:  # from torch's CPU generator, so torch.manual_seed makes a run reproducible
        return int(torch.randint(0, 2 ** 62, (1,)))
    from operator import index  # local: keeps this fix inside the helper
    try:
        seed = index(dropout_seed) & ((1 << 64) - 1)  # any int, taken mod 2^64 on every backend
    except TypeError:
        raise TypeError(f"dropout_seed: expected an int (any value, taken mod 2**64) or None, got "
                        f"{type(dropout_seed).__name__}") from None
    # the custom ops' schema holds an int64: pass the same 64 bits as a signed value (the Philox key words
    # _seed_words and the reference take are unchanged)
    return seed - (1 << 64) if seed >= 1 << 63 else seed

