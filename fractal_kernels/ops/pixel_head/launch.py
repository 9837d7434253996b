"""Fused pixel head: the launch configuration per (width, weight dtype, arch), the Triton launcher, the C++ CPU
kernel's launcher and the input checks of :func:`pixel_head_sample`."""
from __future__ import annotations

import ctypes
import math
from typing import List, NamedTuple, Optional

import torch

from fractal_kernels._scratch import workspace
from fractal_kernels._target import device_arch, sm_count as _sm_count
from fractal_kernels.dispatch import BackendUnavailable, triton_interpreting
from fractal_kernels.ops.pixel_head.kernels import HAS_TRITON
from fractal_kernels.reference.pixel_head import VOCAB, PixelHeadWeights

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.pixel_head.kernels import _pixel_head_kernel


class PixelHeadConfig(NamedTuple):
    """Launch configuration of :func:`_pixel_head_kernel` for one (width, dtype, device)."""
    block_b: int  # pixels per tile
    kc: int  # K chunk of the staged dots
    nc: int  # logits column chunk
    hc: int  # MLP hidden chunk
    bk: int  # condition K chunk
    dot16: int  # 16-bit weights: 1 tensor cores, 2 interpreter emulation (0 unused: fp32 weights ignore it)
    num_warps: int
    num_stages: int
    max_programs: int  # persistent grid cap (programs loop over tiles)
    maxnreg: Optional[int]  # ptxas register cap (None: ptxas' choice)


def _gpu_launch(width: int, fp32: bool, arch: int) -> tuple:
    """(num_warps, maxnreg) per (width, weight dtype, arch family), read off the AOT probes: the fewest spills.
    W=64 fp32 spills 8-32 B at 8 warps, none at 4; on sm_80 (ptxas 12.9) W=32 and W=16 settle at 128
    registers and spill (W=32 ~110 B, W=16 20 B) unless told they may take 255."""
    if fp32 and width == 64:
        return 4, None
    return 8, (255 if arch < 90 and width <= 32 else None)


def pixel_head_config(width: int, hidden: int, c_in: int, bsz: int, guided: bool, wdtype: torch.dtype,
                      device: torch.device, *, arch: Optional[int] = None,
                      interpret: Optional[bool] = None) -> PixelHeadConfig:
    """The one place the pixel head's launch configuration is chosen (per width, guidance, weight dtype, arch).
    ``arch`` defaults to :func:`~fractal_kernels._target.device_arch` of ``device``; ``interpret`` (default: CPU
    tensors under the interpreter) picks the interpreter-speed configuration, tests pass ``interpret=False``.

    GPU (also replayed for sm_80 / sm_90 by the AOT gate under ``fractal_kernels._target.target_arch``):
    16-row tiles (8 pixels guided, 16 unguided: 32-row tiles spill on sm_80 at W=128, and 16 is the smallest
    M of a dot), K chunks of 16 (fp32 "ieee" dots are FMA loops whose operands must stay small; 32 for 16-bit
    weights), 64-column
    logit and MLP hidden chunks, no software pipelining (the chunk loops are short and stages only cost
    shared memory), warps / register cap from :func:`_gpu_launch`, a persistent grid of 2 programs per SM.
    The interpreter (CPU tensors under ``TRITON_INTERPRET=1``) pays per op, not per row: big tiles and
    whole-K chunks."""
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    if arch is None:
        arch = device_arch(device)
    if interpret:
        kc = max(16, width)
        return PixelHeadConfig(block_b=max(16, min(128, triton.next_power_of_2(bsz))), kc=kc, nc=VOCAB,
                               hc=max(16, min(256, triton.next_power_of_2(hidden))),
                               bk=min(512, max(16, triton.next_power_of_2(c_in))), dot16=2, num_warps=4,
                               num_stages=1, max_programs=4, maxnreg=None)
    fp32 = wdtype == torch.float32
    num_warps, maxnreg = _gpu_launch(width, fp32, arch)
    kc = 16 if fp32 or width < 32 else 32  # 16-bit weights: K chunks of 16 spill 8-16 B more than 32
    return PixelHeadConfig(block_b=8 if guided else 16, kc=kc, nc=64,
                           hc=min(64, max(16, triton.next_power_of_2(hidden))), bk=kc, dot16=1,
                           num_warps=num_warps, num_stages=1, max_programs=_sm_count(device, arch) * 2,
                           maxnreg=maxnreg)


def _launch_triton(cond, weights: PixelHeadWeights, num_heads, guided, cfg_t, cfg_scalar, inv_temp, filter_threshold,
                   top_p, greedy, uniforms, seed_lo, seed_hi, offset, ids, logits=None, block_b=None,
                   exponentials=None, max_programs=None, config: Optional[PixelHeadConfig] = None,
                   value_table=None, values=None) -> None:
    """Run the kernel: ``ids`` ``[B, 3]`` int64 out; ``logits`` (debug) ``[3, rows, 256]`` fp32 raw logits out;
    with ``value_table`` ``[3, 257]`` fp32 also ``values`` ``[B, 3]`` fp32 out (``value_table[c, ids[:, c]]``,
    column 256 for id -1).
    ``config`` replaces :func:`pixel_head_config`'s choice, ``block_b`` / ``max_programs`` its tile size /
    persistent grid (tests)."""
    w = PixelHeadWeights(*(t.contiguous() for t in weights))
    rows, c_in = cond.shape
    bsz = ids.shape[0]
    width = w.ln_w.shape[0]
    depth = w.qkv_w.shape[0]
    hidden = w.fc1_w.shape[1]
    head_dim = width // num_heads
    cfg = config or pixel_head_config(width, hidden, c_in, bsz, guided, w.qkv_w.dtype, cond.device)
    block_b = block_b or cfg.block_b
    n_rows = 2 * bsz if guided else bsz
    n_tiles = triton.cdiv(bsz, block_b)
    nprog = max(1, min(n_tiles, max_programs or cfg.max_programs))
    r = (2 if guided else 1) * block_b
    ws_stride = r * (2 * width + 2 * cfg.hc + VOCAB + max(depth, 1) * 2 * 2 * width)
    ws = workspace(nprog * ws_stride, cond.device)
    # bf16 tl.dot is wrong in the interpreter (it reads bf16 bit patterns as integers): a GPU configuration's
    # tensor-core dots (DOT16=1) run as the fp32 emulation there; everything else runs as the GPU would
    dot16 = 2 if cond.device.type == "cpu" and triton_interpreting() and cfg.dot16 == 1 else cfg.dot16
    # fixed argument dtypes whatever is absent (one compiled variant): fp32 dummies are the scratch, fp64 one
    # element; uniforms are fp64 and the noise fp32 here, exactly what the kernel made of them on load before
    uni = uniforms.double().contiguous() if uniforms is not None else torch.empty(1, dtype=torch.float64,
                                                                                   device=cond.device)
    exp = exponentials.float().contiguous() if exponentials is not None else ws
    draw = 3 if greedy else 2 if exponentials is not None else 1 if uniforms is not None else 0
    _pixel_head_kernel[(nprog,)](
        cond, *w,
        cfg_t if cfg_t is not None else ws, uni, exp, ids, ws, logits if logits is not None else ws,
        value_table if value_table is not None else ws, values if values is not None else ws,
        bsz, c_in, n_rows, cond.stride(0), depth, n_tiles, ws_stride,
        head_dim ** -0.5, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
        int(cfg_t is not None), draw, int(top_p < 1.0), int(logits is not None), int(value_table is not None),
        GUIDED=guided, W=width, H=num_heads, DH=head_dim, HID=hidden, HC=cfg.hc, BK=cfg.bk, KC=cfg.kc, NC=cfg.nc,
        BLOCK_B=block_b, V=VOCAB, DOT16=dot16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )


_TRANSPOSED: List[tuple] = []  # (source tensors, their versions, transposed copies), most recent first


def _transposed_cpu(w: List[torch.Tensor]) -> List[torch.Tensor]:
    """cond_w, codebooks, qkv_w, proj_w, fc1_w, fc2_w transposed to ``[..., K, N]`` for the CPU kernel, cached
    for the last few weight sets. An entry holds its source tensors, so a hit (same tensor objects, same version
    counters) cannot be a new tensor that reuses freed memory."""
    src = (w[0], w[2], w[8], w[10], w[14], w[16])
    versions = tuple(t._version for t in src)
    for entry in _TRANSPOSED:
        if all(a is b for a, b in zip(entry[0], src)) and entry[1] == versions:
            return entry[2]
    out = [t.transpose(-2, -1).contiguous() for t in src]
    _TRANSPOSED.insert(0, (src, versions, out))
    del _TRANSPOSED[4:]
    return out


def _launch_cpu(cond, weights: PixelHeadWeights, num_heads, guided, cfg_t, cfg_scalar, inv_temp, filter_threshold,
                top_p, greedy, uniforms, seed_lo, seed_hi, offset, ids, logits=None, exponentials=None) -> None:
    """Run the compiled C++ kernel (``fractal_kernels/cpu/pixel_head_cpu.cpp``) on CPU tensors; same arguments
    as :func:`_launch_triton`. Every buffer it reads is made contiguous fp32 (uniforms fp64) here, and kept
    alive by this frame for the duration of the call."""
    from fractal_kernels import cpu
    lib = cpu.library()
    if lib is None:
        raise BackendUnavailable(f"pixel_head_sample: backend 'cpu' unavailable: {cpu.status()[1]}")
    w = [t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in weights]
    w += _transposed_cpu(w)
    ptrs = (ctypes.c_void_p * len(w))(*[t.data_ptr() for t in w])
    cond = cond.float().contiguous()
    rows, c_in = cond.shape
    width, depth, hidden = w[4].shape[0], w[8].shape[0], w[14].shape[1]
    cfg_c = cfg_t.float().contiguous() if cfg_t is not None else None
    uni = uniforms.double().contiguous() if uniforms is not None else None
    exp = exponentials.float().contiguous() if exponentials is not None else None
    draw = 3 if greedy else 2 if exp is not None else 0 if uni is not None else 1
    ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
    rc = lib.fk_pixel_head_sample_f32(
        cond.data_ptr(), rows, c_in, ptrs, width, depth, hidden, num_heads, int(guided), ptr(cfg_c),
        float(cfg_scalar), float(inv_temp), float(filter_threshold), float(top_p), draw, ptr(uni), ptr(exp),
        (seed_hi << 32) | seed_lo, offset & ((1 << 64) - 1), ids.data_ptr(), ptr(logits))
    if rc != 0:
        raise RuntimeError(f"pixel_head_sample: the CPU kernel rejected its arguments (code {rc})")



# ---- input checks ------------------------------------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_weights(weights, cond: torch.Tensor, num_heads) -> PixelHeadWeights:
    if not isinstance(weights, tuple) or len(weights) != len(PixelHeadWeights._fields):
        raise TypeError(f"weights: expected a PixelHeadWeights (see fractal_kernels.reference.pixel_head."
                        f"pack_pixel_head_weights), got {type(weights).__name__}")
    w = PixelHeadWeights(*weights)
    for name, t in zip(w._fields, w):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"weights.{name}: expected a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != cond.device:
            raise ValueError(f"weights.{name}: on {t.device}, cond on {cond.device}")
    if w.ln_w.dim() != 1:
        raise ValueError(f"weights.ln_w: expected [W], got {_shape(w.ln_w)}")
    width = w.ln_w.shape[0]
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 or width % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing the width W={width}, got {num_heads!r}")
    if w.qkv_w.dim() != 3 or w.fc1_w.dim() != 3:
        raise ValueError(f"weights.qkv_w / fc1_w: expected [depth, 3W, W] / [depth, M, W], got "
                         f"{_shape(w.qkv_w)} / {_shape(w.fc1_w)}")
    depth, hidden, c_in = w.qkv_w.shape[0], w.fc1_w.shape[1], cond.shape[1]
    expected = dict(
        cond_w=(width, c_in), cond_b=(width,), codebooks=(3, VOCAB, width), mlm_bias=(3, VOCAB), ln_w=(width,),
        ln_b=(width,), norm1_w=(depth, width), norm1_b=(depth, width), qkv_w=(depth, 3 * width, width),
        qkv_b=(depth, 3 * width), proj_w=(depth, width, width), proj_b=(depth, width), norm2_w=(depth, width),
        norm2_b=(depth, width), fc1_w=(depth, hidden, width), fc1_b=(depth, hidden), fc2_w=(depth, width, hidden),
        fc2_b=(depth, width), norm_w=(width,), norm_b=(width,))
    for name, t in zip(w._fields, w):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"weights.{name}: expected shape {expected[name]} (W={width}, C={c_in} from cond, "
                             f"depth={depth}, M={hidden}), got {tuple(t.shape)}")
    return w


def _check(cond, weights, num_heads, guided, cfg, temperature, filter_threshold, top_p, uniforms, offset,
           exponentials=None):
    if not isinstance(cond, torch.Tensor) or cond.dim() != 2:
        raise ValueError(f"cond: expected a [rows, C] tensor, got {_shape(cond)}")
    if not cond.is_floating_point():
        raise TypeError(f"cond: expected a floating-point tensor, got {cond.dtype}")
    if cond.shape[1] < 1:
        raise ValueError(f"cond: expected C >= 1 channels, got shape {tuple(cond.shape)}")
    w = _check_weights(weights, cond, num_heads)
    if guided is None:
        guided = isinstance(cfg, torch.Tensor) or float(cfg) != 1.0
    rows = cond.shape[0]
    if guided and rows % 2:
        raise ValueError(f"cond: guided sampling takes [2B, C] rows (cond rows then uncond rows), got {rows} rows")
    bsz = rows // 2 if guided else rows
    if isinstance(cfg, torch.Tensor):
        if not guided:
            raise ValueError("cfg: a per-row guidance tensor needs guided=True (cond rows [cond; uncond])")
        if cfg.numel() not in (1, bsz):
            raise ValueError(f"cfg: expected a scalar or {bsz} per-pixel values, got shape {tuple(cfg.shape)}")
        if cfg.device != cond.device:
            raise ValueError(f"cfg: on {cfg.device}, cond on {cond.device}")
    else:
        if not (isinstance(cfg, (int, float)) and math.isfinite(cfg)):
            raise ValueError(f"cfg: expected a finite number or a tensor, got {cfg!r}")
        if not guided and float(cfg) != 1.0:
            raise ValueError(f"cfg: guidance scale {cfg} needs guided=True (cond rows [cond; uncond])")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(filter_threshold, (int, float)) and 0.0 <= filter_threshold <= 1.0):
        raise ValueError(f"filter_threshold: expected a probability in [0, 1], got {filter_threshold!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
    if uniforms is not None:
        if (not isinstance(uniforms, torch.Tensor) or tuple(uniforms.shape) != (3, bsz)
                or not uniforms.is_floating_point()):
            raise ValueError(f"uniforms: expected a float tensor of shape (3, {bsz}) (channel-major), got "
                             f"{_shape(uniforms) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__}")
        if uniforms.device != cond.device:
            raise ValueError(f"uniforms: on {uniforms.device}, cond on {cond.device}")
    if exponentials is not None:
        if uniforms is not None:
            raise ValueError("exponentials: give uniforms or exponentials, not both")
        if (not isinstance(exponentials, torch.Tensor) or tuple(exponentials.shape) != (3, bsz, VOCAB)
                or not exponentials.is_floating_point()):
            raise ValueError(f"exponentials: expected a float tensor of shape (3, {bsz}, {VOCAB}) of Exp(1) noise, got "
                             f"{_shape(exponentials) if isinstance(exponentials, torch.Tensor) else type(exponentials).__name__}")
        if exponentials.device != cond.device:
            raise ValueError(f"exponentials: on {exponentials.device}, cond on {cond.device}")
    if not (isinstance(offset, int) and 0 <= offset < 2 ** 63):
        raise ValueError(f"offset: expected an int in [0, 2^63), got {offset!r}")
    return w, guided, bsz
