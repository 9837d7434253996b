"""Fused MAR block stack: the launch configuration (:func:`mar_stack_config`), the Triton launcher and the input
checks of :func:`fractal_kernels.ops.mar_stack.mar_block_stack`."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fractal_kernels._scratch import workspace
from fractal_kernels._target import device_arch, sm_count as _sm_count
from fractal_kernels.dispatch import MAR_STACK_MAX_L, triton_interpreting
from fractal_kernels.ops.mar_stack.kernels import HAS_TRITON
from fractal_kernels.reference.mar_stack import WEIGHT_DTYPES, MarStackWeights

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.mar_stack.kernels import _mar_stack_kernel

_MATRICES = ("qkv_w", "proj_w", "fc1_w", "fc2_w")


class MarStackConfig(NamedTuple):
    """Launch configuration of ``_mar_stack_kernel`` for one (width, length, weight dtype, device)."""
    lp: int  # padded sequence length: rows of every tile (a power of two >= 16, the smallest dot M)
    nc: int  # output-column chunk of the GEMMs and LayerNorms
    kc: int  # K chunk of the GEMMs
    dc: int  # head-dim chunk of the attention
    dot16: int  # 16-bit weights: 1 tensor cores, 2 interpreter emulation
    num_warps: int
    maxnreg: Optional[int]  # ptxas register cap (None: ptxas' choice)
    max_programs: int  # persistent grid cap (each program loops over sequences; bounds the workspace)


def mar_stack_config(width: int, hidden: int, head_dim: int, seq: int, wdtype: torch.dtype, device: torch.device,
                     *, arch: Optional[int] = None, interpret: Optional[bool] = None) -> MarStackConfig:
    """The one place the fused stack's launch configuration is chosen, for ``arch`` (default
    :func:`~fractal_kernels._target.device_arch` of ``device``). ``interpret`` (default: CPU tensors under the
    interpreter) picks the interpreter-speed configuration; tests pass ``interpret=False`` to run a GPU's.

    GPU: 64-column output chunks (32 at LP = 64), K chunks of 16 for fp32 weights ("ieee" dots are FMA loops:
    small operands) and 32 for 16-bit ones, 16-wide head-dim chunks, 4 warps; registers hold one [LP, NC]
    accumulator, one operand pair and the [LP, LP] scores, so they do not grow with the width; a 255-register
    cap; a persistent grid of 2 programs per SM.
    The interpreter pays per op, not per element: whole-width chunks."""
    lp = max(16, triton.next_power_of_2(max(seq, 1)))
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    if arch is None:
        arch = device_arch(device)
    if interpret:
        wide = min(256, triton.next_power_of_2(max(3 * width, hidden)))
        return MarStackConfig(lp=lp, nc=wide, kc=min(256, triton.next_power_of_2(max(width, hidden))),
                              dc=max(16, triton.next_power_of_2(head_dim)), dot16=2, num_warps=4, maxnreg=None,
                              max_programs=4)
    kc = 16 if wdtype == torch.float32 else 32
    # Spills (AOT, ptxas 12.9 / 13.4): the kernel passes D, H, DH, HID again as runtime loop bounds (constexpr
    # ones were unrolled), drops the column masks when the chunks divide the shapes (EVEN), builds offset tiles
    # inside the chunk loops (tiles hoisted out of the block loop stayed live across it: 255 registers and
    # 28-32 B spills on sm_90) and caps registers at 255 (ptxas' own 128-168 spilled 4 B on sm_80 16-bit rows).
    # LP = 64 (the longest L) takes 32-column chunks: its [64, 64] scores leave no room for [64, 64] accumulators.
    maxnreg = 255
    return MarStackConfig(lp=lp, nc=64 if lp <= 32 else 32, kc=kc, dc=16, dot16=1, num_warps=4, maxnreg=maxnreg,
                          max_programs=2 * _sm_count(device, arch))


def workspace_floats(cfg: MarStackConfig, width: int, hidden: int) -> int:
    """fp32 scratch per program: X, A [LP, D], qkv [LP, 3D], MLP hidden [LP, M]."""
    return cfg.lp * (5 * width + hidden)


def even(cfg: MarStackConfig, width: int, hidden: int, head_dim: int) -> bool:
    """The kernel's EVEN: the chunks divide every width (no column masks)."""
    return all(m % c == 0 for m in (width, hidden) for c in (cfg.nc, cfg.kc)) and head_dim % cfg.dc == 0


def _launch_triton(x: torch.Tensor, w: MarStackWeights, num_heads: int, out: torch.Tensor,
                   config: Optional[MarStackConfig] = None, max_programs: Optional[int] = None) -> None:
    """Run the kernel on ``x`` ``[N, L, D]`` (contiguous, N, L >= 1) into ``out`` (same shape, x's dtype).
    ``config`` replaces :func:`mar_stack_config`'s choice, ``max_programs`` its persistent grid cap (tests)."""
    n, seq, width = x.shape
    depth, hidden = w.fc1_w.shape[0], w.fc1_w.shape[1]
    head_dim = width // num_heads
    cfg = config or mar_stack_config(width, hidden, head_dim, seq, w.qkv_w.dtype, x.device)
    if cfg.lp < seq:
        raise ValueError(f"config: lp={cfg.lp} under the sequence length {seq}")
    nprog = max(1, min(n, max_programs or cfg.max_programs))
    ws_stride = workspace_floats(cfg, width, hidden)
    ws = workspace(nprog * ws_stride, x.device)
    # bf16 tl.dot is wrong in the interpreter (it reads bf16 bit patterns as integers): a GPU configuration's
    # tensor-core dots (DOT16=1) run as the fp32 emulation there; everything else runs as the GPU would
    dot16 = 2 if x.device.type == "cpu" and triton_interpreting() else cfg.dot16
    _mar_stack_kernel[(nprog,)](
        x, out, ws, w.norm1_w, w.norm1_b, w.qkv_w, w.qkv_b, w.proj_w, w.proj_b, w.norm2_w, w.norm2_b,
        w.fc1_w, w.fc1_b, w.fc2_w, w.fc2_b, w.norm_w, w.norm_b,
        n, seq, depth, ws_stride, head_dim ** -0.5, float(w.eps), width, num_heads, head_dim, hidden,
        D=width, H=num_heads, DH=head_dim, HID=hidden, LP=cfg.lp, NC=cfg.nc, KC=cfg.kc, DC=cfg.dc,
        EVEN=even(cfg, width, hidden, head_dim), DOT16=dot16, num_warps=cfg.num_warps, num_stages=1, maxnreg=cfg.maxnreg,
    )


# ---- input checks ------------------------------------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check(x, weights, num_heads) -> MarStackWeights:
    """Validate the arguments of ``mar_block_stack`` (any backend); returns the weights as a MarStackWeights."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected an [N, L, D] tensor, got {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not isinstance(weights, tuple) or len(weights) != len(MarStackWeights._fields):
        raise ValueError(f"weights: expected a MarStackWeights (fractal_kernels.reference.mar_stack.pack_mar_stack), "
                         f"got {type(weights).__name__}")
    w = MarStackWeights(*weights)
    for name, t in zip(w._fields[:-1], w[:-1]):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"weights.{name}: expected a floating-point tensor, got {_shape(t)}")
        if t.device != x.device:
            raise ValueError(f"weights.{name}: on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"weights.{name}: expected a contiguous tensor (pack_mar_stack makes them)")
    if not isinstance(w.eps, float) or not w.eps >= 0:
        raise ValueError(f"weights.eps: expected a float >= 0, got {w.eps!r}")
    if w.norm_w.dim() != 1 or w.fc1_w.dim() != 3:
        raise ValueError(f"weights.norm_w / fc1_w: expected [D] / [depth, M, D], got {_shape(w.norm_w)} / "
                         f"{_shape(w.fc1_w)}")
    width = w.norm_w.shape[0]
    depth, hidden = w.fc1_w.shape[0], w.fc1_w.shape[1]
    expected = dict(norm1_w=(depth, width), norm1_b=(depth, width), qkv_w=(depth, 3 * width, width),
                    qkv_b=(depth, 3 * width), proj_w=(depth, width, width), proj_b=(depth, width),
                    norm2_w=(depth, width), norm2_b=(depth, width), fc1_w=(depth, hidden, width),
                    fc1_b=(depth, hidden), fc2_w=(depth, width, hidden), fc2_b=(depth, width), norm_w=(width,),
                    norm_b=(width,))
    for name, shape in expected.items():
        t = getattr(w, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"weights.{name}: expected shape {shape} (D={width}, depth={depth}, M={hidden}), "
                             f"got {tuple(t.shape)}")
        want = w.qkv_w.dtype if name in _MATRICES else torch.float32
        if name == "qkv_w" and want not in WEIGHT_DTYPES:
            raise ValueError(f"weights.qkv_w: dtype {want} unsupported (takes {WEIGHT_DTYPES})")
        if t.dtype != want:
            raise ValueError(f"weights.{name}: expected dtype {want} (matrices share qkv_w's dtype, the rest are "
                             f"fp32), got {t.dtype}")
    if x.shape[2] != width:
        raise ValueError(f"x: expected last dim D={width} (the weights' width), got shape {tuple(x.shape)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 or width % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing the width D={width}, got {num_heads!r}")
    return w


def check_triton(x: torch.Tensor) -> None:
    """What only the Triton kernel limits: the sequence length (one program holds a sequence's [L, L] scores)."""
    if x.shape[1] > MAR_STACK_MAX_L:
        raise ValueError(f"x: sequence length L={x.shape[1]} over the triton kernel's limit {MAR_STACK_MAX_L} "
                         f"(the fused stack targets the small MAR levels); use backend='torch'")
