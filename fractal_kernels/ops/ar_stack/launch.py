"""Fused AR block stack decode step: the launch configuration, the Triton launcher and the input checks of
:func:`fractal_kernels.ops.ar_stack.ar_block_stack_decode`."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fractal_kernels._scratch import workspace
from fractal_kernels._target import device_arch
from fractal_kernels.dispatch import triton_interpreting
from fractal_kernels.ops.ar_stack.kernels import HAS_TRITON
from fractal_kernels.reference.ar_stack import ArStackWeights

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.ar_stack.kernels import _ar_stack_decode_kernel

BM = 16  # rows per program: the smallest M of a tensor-core dot


class ArStackConfig(NamedTuple):
    """Launch configuration of :func:`_ar_stack_decode_kernel` for one (width, head dim, weight dtype, device)."""
    kc: int  # K chunk of the dots
    nc: int  # output-column chunk of the dots and of the row-wise stages
    kb: int  # keys per attention chunk ([BM, KB, HD] products)
    dot16: int  # 16-bit weights: 1 tensor cores, 2 interpreter emulation
    num_warps: int
    maxnreg: Optional[int]  # ptxas register cap (None: ptxas' choice)


def ar_stack_config(width: int, head_dim: int, wdtype: torch.dtype, device: torch.device, *,
                    arch: Optional[int] = None, interpret: Optional[bool] = None) -> ArStackConfig:
    """The one place the kernel's launch configuration is chosen, for ``arch`` (default
    :func:`~fractal_kernels._target.device_arch` of ``device``; sm_80 and sm_90 take the same configuration
    today). ``interpret`` (default: CPU tensors under the interpreter) picks the interpreter-speed configuration;
    tests pass ``interpret=False`` to run a GPU's.

    GPU: K chunks of 16 for fp32 weights (an "ieee" fp32 dot is an FMA loop whose operands must stay small),
    32 for 16-bit ones; 64-column output chunks; attention chunks of ``2048 / HD`` keys so the ``[16, KB, HD]``
    products stay at 16 fp32 registers a thread; 4 warps and a register cap of 255 (ptxas' own choice, 128-168,
    spills 4-40 B at D=512; with the cap 0 B, ~200 registers, still 2 CTAs/SM). The interpreter pays per op, not
    per element: whole-K chunks, wide columns and 16 keys at once."""
    hdp = triton.next_power_of_2(head_dim)
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    if arch is None:
        arch = device_arch(device)
    if interpret:
        wide = max(16, min(256, triton.next_power_of_2(width)))
        return ArStackConfig(kc=wide, nc=max(64, wide), kb=16, dot16=2, num_warps=4, maxnreg=None)
    fp32 = wdtype == torch.float32
    return ArStackConfig(kc=16 if fp32 else 32, nc=64, kb=max(1, min(16, 2048 // (BM * hdp))),
                         dot16=1, num_warps=4, maxnreg=255)


def even(cfg: ArStackConfig, width: int, hidden: int) -> bool:
    """The kernel's EVEN: the chunks divide D and the MLP width (no column masks)."""
    return all(n % c == 0 for n in (width, hidden) for c in (cfg.kc, cfg.nc))


def launch_triton(x: torch.Tensor, w: ArStackWeights, cache: torch.Tensor, pos: int, freqs_cis: torch.Tensor,
                  num_heads: int, out: torch.Tensor, config: Optional[ArStackConfig] = None) -> None:
    """Run the kernel: ``out`` ``[B, D]`` written, ``cache`` written at ``pos`` (inputs checked by the caller).
    ``config`` replaces :func:`ar_stack_config`'s choice (tests)."""
    bsz, dim = x.shape
    head_dim = dim // num_heads
    hidden = w.w1.shape[1]
    cfg = config or ar_stack_config(dim, head_dim, w.wqkv.dtype, x.device)
    n_prog = triton.cdiv(bsz, BM)
    ws_stride = BM * (5 * dim + hidden)
    ws = workspace(n_prog * ws_stride, x.device)
    # bf16 tl.dot is wrong in the interpreter (it reads bf16 bit patterns as integers): a GPU configuration's
    # tensor-core dots (DOT16=1) run as the fp32 emulation there; everything else runs as the GPU would
    dot16 = 2 if x.device.type == "cpu" and triton_interpreting() else cfg.dot16
    _ar_stack_decode_kernel[(n_prog,)](
        x, out, w.wqkv, w.wo, w.w1, w.w3, w.w2, w.attn_norm, w.ffn_norm, w.rms_eps, w.norm_w, w.norm_b, cache,
        freqs_cis, ws, bsz, x.stride(0), out.stride(0), w.wqkv.shape[0], pos, cache.shape[3], ws_stride,
        head_dim ** -0.5, float(w.norm_eps), dim, num_heads, hidden,
        D=dim, H=num_heads, HD=head_dim, HDP=triton.next_power_of_2(head_dim), HID=hidden, BM=BM, KC=cfg.kc,
        NC=cfg.nc, KB=cfg.kb, EVEN=even(cfg, dim, hidden), DOT16=dot16, num_warps=cfg.num_warps, num_stages=1, maxnreg=cfg.maxnreg,
    )


# ---- input checks ------------------------------------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(x, weights, cache, pos, freqs_cis, num_heads) -> ArStackWeights:
    """Validate the op's arguments (ValueError / TypeError naming the argument); returns the weights."""
    if not isinstance(weights, tuple) or len(weights) != len(ArStackWeights._fields):
        raise TypeError(f"weights: expected an ArStackWeights (fractal_kernels.reference.ar_stack.pack_ar_stack), "
                        f"got {type(weights).__name__}")
    w = ArStackWeights(*weights)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a float [B, D] tensor, got {_shape(x)}")
    bsz, dim = x.shape
    if x.stride(1) != 1 and bsz > 0:
        raise ValueError(f"x: expected unit stride along D, got strides {x.stride()}")
    if w.wo.dim() != 3:
        raise ValueError(f"weights.wo: expected [NB, D, D], got {_shape(w.wo)}")
    nb, hidden = w.wo.shape[0], w.w1.shape[1] if w.w1.dim() == 3 else -1
    expected = dict(wqkv=(nb, 3 * dim, dim), wo=(nb, dim, dim), w1=(nb, hidden, dim), w3=(nb, hidden, dim),
                    w2=(nb, dim, hidden), attn_norm=(nb, dim), ffn_norm=(nb, dim), rms_eps=(nb, 2), norm_w=(dim,),
                    norm_b=(dim,))
    for name, shape in expected.items():
        t = getattr(w, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"weights.{name}: expected a contiguous tensor of shape {shape} (D={dim} from x, "
                             f"NB={nb}, M={hidden}), got {_shape(t)}")
        if t.device != x.device:
            raise ValueError(f"weights.{name}: on {t.device}, x on {x.device}")
    if nb < 1 or hidden < 1:
        raise ValueError(f"weights: expected at least one block and hidden width >= 1, got NB={nb}, M={hidden}")
    for name in ("wqkv", "wo", "w1", "w3", "w2"):
        if getattr(w, name).dtype != w.wqkv.dtype or w.wqkv.dtype not in _LINEAR_DTYPES:
            raise ValueError(f"weights.{name}: expected every linear weight in one of fp32/bf16/fp16, got "
                             f"{getattr(w, name).dtype} (wqkv {w.wqkv.dtype})")
    for name in ("attn_norm", "ffn_norm", "rms_eps", "norm_w", "norm_b"):
        if getattr(w, name).dtype != torch.float32:
            raise ValueError(f"weights.{name}: expected fp32, got {getattr(w, name).dtype}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 or dim % num_heads \
            or (dim // num_heads) % 2:
        raise ValueError(f"num_heads: expected a positive int dividing D={dim} into an even head dim, got "
                         f"{num_heads!r}")
    if not isinstance(cache, torch.Tensor) or cache.dim() != 5 or tuple(cache.shape[:3]) != (nb, 2, bsz) \
            or cache.shape[4] != dim or not cache.is_contiguous() or cache.dtype not in _LINEAR_DTYPES:
        raise ValueError(f"cache: expected a contiguous fp32/bf16/fp16 [NB, 2, B, T, D] = [{nb}, 2, {bsz}, T, {dim}] "
                         f"tensor (fractal_kernels.reference.ar_stack.ar_stack_cache), got {_shape(cache)}"
                         f"{'' if not isinstance(cache, torch.Tensor) else ' ' + str(cache.dtype)}")
    if cache.device != x.device:
        raise ValueError(f"cache: on {cache.device}, x on {x.device}")
    max_len = cache.shape[3]
    hd = dim // num_heads
    if not isinstance(freqs_cis, torch.Tensor) or freqs_cis.dim() != 3 or tuple(freqs_cis.shape[1:]) != (hd // 2, 2) \
            or freqs_cis.dtype != torch.float32 or not freqs_cis.is_contiguous():
        raise ValueError(f"freqs_cis: expected a contiguous fp32 [T, {hd // 2}, 2] RoPE table (cos, sin), got "
                         f"{_shape(freqs_cis)}")
    if freqs_cis.device != x.device:
        raise ValueError(f"freqs_cis: on {freqs_cis.device}, x on {x.device}")
    if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < min(max_len, freqs_cis.shape[0]):
        raise ValueError(f"pos: expected an int in [0, {min(max_len, freqs_cis.shape[0])}) (cache length {max_len}, "
                         f"RoPE table length {freqs_cis.shape[0]}), got {pos!r}")
    return w
