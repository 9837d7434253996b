"""Skinny fused linear: the launch configuration, the Triton launcher and the input checks of
:func:`fractal_kernels.ops.skinny_linear.skinny_linear`."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fractal_kernels._target import device_arch, sm_count
from fractal_kernels.dispatch import triton_interpreting
from fractal_kernels.ops._linear import check_core, check_eps, check_output, check_vector, shape_of
from fractal_kernels.ops.skinny_linear.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    from fractal_kernels.ops.skinny_linear.kernels import _skinny_linear_kernel

MAX_BM = 16      # rows per program; past it the row tiles re-read the weights (dispatch keeps M small)
MAX_BN = 64
ACC_PER_THREAD = 32  # fp32 accumulator registers a thread may hold (the [BM, BN, BK] product tiles)


class SkinnyLinearConfig(NamedTuple):
    """Launch configuration of :func:`_skinny_linear_kernel` for one (M, N, K, gate, device)."""
    bm: int         # rows per program (M padded to a power of two, at most MAX_BM)
    bn: int         # output columns per program
    bk: int         # K chunk of one loop trip
    num_warps: int
    num_stages: int  # K-loop pipelining: num_stages - 1 weight tiles in flight per program


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def skinny_linear_config(m: int, n: int, k: int, gate: bool, device: torch.device, *, arch: Optional[int] = None,
                         interpret: Optional[bool] = None) -> SkinnyLinearConfig:
    """The one place the launch configuration is chosen, for ``arch`` (default: ``device``'s).

    GPU: the output columns split so that the grid has at least one program per SM (``BN`` the largest power of
    two with ``cdiv(N, BN) >= SMs``, 1..64, and at most what 16-wide K chunks leave of the register budget): a
    matrix-vector product is bound by streaming the weights, and a stream needs every SM's load units. 8 warps; ``BK`` as wide as ``ACC_PER_THREAD`` fp32 accumulators a thread
    allow (``BM * BN * BK <= 32 * 256``, halved with a gate), so a loop trip loads a ``[BN, BK]`` weight tile
    of 4-16 KB; 3 pipeline stages (two tiles in flight a program). sm_80 and sm_90 take the same shape (only
    the SM count differs). ``interpret`` (default: CPU tensors under the interpreter), which pays per program
    and per op, not per element: 64 columns and the whole K (up to 4096) a program."""
    if interpret is None:
        interpret = device.type == "cpu" and triton_interpreting()
    if arch is None:
        arch = device_arch(device)
    bm = min(MAX_BM, triton.next_power_of_2(max(1, m)))
    kp = triton.next_power_of_2(max(1, k))
    if interpret:
        return SkinnyLinearConfig(bm=bm, bn=min(MAX_BN, triton.next_power_of_2(max(1, n))), bk=min(kp, 4096),
                                  num_warps=4, num_stages=1)
    num_warps = 8
    budget = ACC_PER_THREAD * 32 * num_warps // (2 if gate else 1)
    bn = max(1, min(MAX_BN, _pow2_floor(max(1, n // sm_count(device, arch))), budget // (bm * 16)))
    bk = max(16, min(kp, 1024, _pow2_floor(max(1, budget // (bm * bn)))))
    return SkinnyLinearConfig(bm=bm, bn=bn, bk=bk, num_warps=num_warps, num_stages=3)


def grid(cfg: SkinnyLinearConfig, m: int, n: int):
    return (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm))


def launch_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  norm_weight: Optional[torch.Tensor], norm_eps: float, gate: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], out: torch.Tensor,
                  config: Optional[SkinnyLinearConfig] = None, kv_out: Optional[torch.Tensor] = None) -> None:
    """Run the kernel into ``out`` ``[M, N]`` (``[M, N - 2 H D]``, the q columns, with ``kv_out`` ``[2, M, H, D]``
    taking the rest; inputs checked by the caller); ``config`` replaces :func:`skinny_linear_config`'s choice
    (tests)."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or skinny_linear_config(m, n, k, gate is not None, x.device)
    rnd = {torch.bfloat16: 1, torch.float16: 2}.get(weight.dtype, 0)
    dummy = weight
    kv = kv_out if kv_out is not None else out
    nq, hd, skv = (n - 2 * kv.shape[2] * kv.shape[3], kv.shape[3], kv.stride()) if kv_out is not None \
        else (n, 1, (0, 0, 0, 0))
    _skinny_linear_kernel[grid(cfg, m, n)](
        x, weight, gate if gate is not None else dummy, bias if bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy, residual if residual is not None else dummy, out, kv,
        m, n, k, x.stride(0), x.stride(1), weight.stride(0), gate.stride(0) if gate is not None else 0,
        residual.stride(0) if residual is not None else 0, out.stride(0), float(norm_eps), nq, hd, *skv,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, NORM=norm_weight is not None, GATE=gate is not None,
        BIAS=bias is not None, RES=residual is not None, ROUND=rnd, EVEN_K=k % cfg.bk == 0, KV=kv_out is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# ---- input checks ------------------------------------------------------------------------------------------

def check(x, weight, bias, norm_weight, norm_eps, gate, residual, out_dtype, kv_out=None) -> torch.dtype:
    """Validate the op's arguments (ValueError / TypeError naming the argument); returns the output dtype."""
    m, n, k = check_core(x, weight, bias, (("norm_weight", norm_weight), ("gate", gate), ("residual", residual)))
    if kv_out is not None:
        ok = isinstance(kv_out, torch.Tensor) and kv_out.dim() == 4 and kv_out.shape[0] == 2
        if not (ok and kv_out.shape[1] == m and 3 * kv_out.shape[2] * kv_out.shape[3] == n
                and kv_out.device == x.device and kv_out.is_floating_point() and residual is None and gate is None):
            raise ValueError(f"kv_out: expected a float [2, M={m}, H, D] tensor on {x.device} with 3 H D = N={n} "
                             f"(an attention projection [q | k | v]; no residual, no gate), got "
                             f"{shape_of(kv_out)}{' ' + str(kv_out.dtype) if isinstance(kv_out, torch.Tensor) else ''}")
    if norm_weight is not None:
        check_vector("norm_weight", norm_weight, k, "K", " (RMSNorm weight)")
        check_eps(norm_eps)
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (n, k) or gate.dtype != weight.dtype \
                or gate.stride(1) != 1:
            raise ValueError(f"gate: expected a [N={n}, K={k}] {weight.dtype} tensor with unit stride along K "
                             f"(SwiGLU's w3, like weight), got {shape_of(gate)}"
                             f"{' ' + str(gate.dtype) if isinstance(gate, torch.Tensor) else ''}")
    return check_output(residual, m, n, weight, out_dtype)
