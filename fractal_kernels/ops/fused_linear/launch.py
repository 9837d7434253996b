"""Fused linear: the launch configuration, the Triton launcher and the input checks of
:func:`fractal_kernels.ops.fused_linear.fused_linear`."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fractal_kernels._target import device_arch, sm_count
from fractal_kernels.dispatch import triton_interpreting
from fractal_kernels.ops._linear import check_core, check_eps, check_output, check_vector
from fractal_kernels.ops.fused_linear.kernels import HAS_TRITON
from fractal_kernels.reference.fused_linear import ACTS

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.fused_linear.kernels import _fused_linear_kernel

#: GPU output tiles, largest first: the largest whose grid still gives every SM a program is taken
TILES_16 = ((128, 128), (64, 128), (64, 64))
TILES_32 = ((64, 64), (32, 64), (32, 32))


class FusedLinearConfig(NamedTuple):
    """Launch configuration of :func:`_fused_linear_kernel` for one (M, N, K, weight dtype, device)."""
    bm: int
    bn: int
    bk: int
    group_m: int
    dot16: int       # 0: fp32 weights (ieee dot); 1: 16-bit tensor cores; 2: interpreter emulation
    num_warps: int
    num_stages: int


def fused_linear_config(m: int, n: int, k: int, wdtype: torch.dtype, device: torch.device, *,
                        arch: Optional[int] = None, interpret: Optional[bool] = None) -> FusedLinearConfig:
    """The one place the launch configuration is chosen, for ``arch`` (default: ``device``'s).

    GPU, 16-bit weights: 64-deep K chunks and 3 pipeline stages (two tiles in flight), or at 128 x 128 32-deep
    chunks and 4 stages (three in flight; 64-deep ones with 3 stages took 115-132 KB of shared memory, one CTA per
    H100 SM), and the largest of 128 x 128 / 64 x 128 / 64 x 64 output tiles whose grid has at least one program per SM (a GEMM whose few big tiles leave SMs idle
    streams its weights through a fraction of the chip: the MAR levels at batch 1). 8 warps at 128 x 128, else 4.
    fp32 weights (exact "ieee" dots: FMA loops): 32-deep chunks and tiles of at most 64 x 64, 2 stages. Bands of
    8 row tiles share weight columns in L2. ``interpret`` (default: CPU tensors under the interpreter), which
    pays per program and per op: 64 x 128 tiles and K chunks up to 256."""
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    if arch is None:
        arch = device_arch(device)
    fp32 = wdtype == torch.float32
    if interpret:
        return FusedLinearConfig(bm=64, bn=128, bk=min(256, max(16, triton.next_power_of_2(k))), group_m=8,
                                 dot16=0 if fp32 else 2, num_warps=4, num_stages=1)
    sms = sm_count(device, arch)
    tiles = TILES_32 if fp32 else TILES_16
    bm, bn = next(((a, b) for a, b in tiles if triton.cdiv(m, a) * triton.cdiv(n, b) >= sms), tiles[-1])
    big = bm * bn >= 128 * 128
    return FusedLinearConfig(bm=bm, bn=bn, bk=32 if fp32 or big else 64, group_m=8, dot16=0 if fp32 else 1,
                             num_warps=8 if big else 4, num_stages=2 if fp32 else 4 if big else 3)


def grid(cfg: FusedLinearConfig, m: int, n: int):
    return (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn),)


def launch_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], norm_eps: float, act: str,
                  residual: Optional[torch.Tensor], out: torch.Tensor,
                  config: Optional[FusedLinearConfig] = None) -> None:
    """Run the kernel into ``out`` ``[M, N]`` (inputs checked by the caller); ``config`` replaces
    :func:`fused_linear_config`'s choice (tests)."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or fused_linear_config(m, n, k, weight.dtype, x.device)
    # bf16 tl.dot is wrong in the interpreter: a GPU configuration's tensor-core dot runs as its emulation there
    dot16 = 2 if cfg.dot16 == 1 and x.device.type == "cpu" and triton_interpreting() else cfg.dot16
    dummy = weight
    _fused_linear_kernel[grid(cfg, m, n)](
        x, weight, bias if bias is not None else dummy, norm_weight if norm_weight is not None else dummy,
        norm_bias if norm_bias is not None else dummy, residual if residual is not None else dummy, out,
        m, n, k, x.stride(0), x.stride(1), weight.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), float(norm_eps),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, NORM=norm_weight is not None, BIAS=bias is not None,
        ACT=ACTS.index(act), RES=residual is not None, DOT16=dot16, EVEN_K=k % cfg.bk == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# ---- input checks ------------------------------------------------------------------------------------------

def check(x, weight, bias, norm_weight, norm_bias, norm_eps, act, residual, out_dtype) -> torch.dtype:
    """Validate the op's arguments (ValueError / TypeError naming the argument); returns the output dtype."""
    m, n, k = check_core(x, weight, bias, (("norm_weight", norm_weight), ("norm_bias", norm_bias),
                                           ("residual", residual)))
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("norm_weight / norm_bias: give both (a LayerNorm's weight and bias) or neither")
    if norm_weight is not None:
        check_vector("norm_weight", norm_weight, k, "K")
        check_vector("norm_bias", norm_bias, k, "K")
        check_eps(norm_eps)
    if act not in ACTS:
        raise ValueError(f"act: expected one of {ACTS}, got {act!r}")
    return check_output(residual, m, n, weight, out_dtype)
