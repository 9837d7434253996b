"""Fused pixel head: the ``torch.library`` custom op ``fractal_kernels::pixel_head_sample`` (one op in a profiler
or a ``torch.compile`` graph) and its fake kernel; it runs a launcher of :mod:`.launch`."""
from __future__ import annotations

from typing import List, Optional

import torch

from fractal_kernels.ops.pixel_head.launch import _launch_cpu, _launch_triton
from fractal_kernels.ops.pixel_head.phased import launch_phased
from fractal_kernels.reference.pixel_head import PixelHeadWeights


@torch.library.custom_op("fractal_kernels::pixel_head_sample", mutates_args=())
def _pixel_head_op(cond: torch.Tensor, weights: List[torch.Tensor], num_heads: int, guided: bool,
                   cfg: Optional[torch.Tensor], cfg_scalar: float, inv_temp: float, filter_threshold: float,
                   top_p: float, greedy: bool, uniforms: Optional[torch.Tensor], seed_lo: int, seed_hi: int,
                   offset: int, exponentials: Optional[torch.Tensor], kernel: str,
                   value_table: Optional[torch.Tensor] = None, schedule: str = "tiles") -> torch.Tensor:
    # ids [B, 3] int64, or with value_table [3, 257] the values [B, 3] fp32 (the kernel writes both)
    bsz = cond.shape[0] // 2 if guided else cond.shape[0]
    ids = torch.empty(bsz, 3, dtype=torch.int64, device=cond.device)
    w = PixelHeadWeights(*weights)
    if kernel == "cpu":
        _launch_cpu(cond, w, num_heads, guided, cfg, cfg_scalar, inv_temp, filter_threshold, top_p, greedy,
                    uniforms, seed_lo, seed_hi, offset, ids, exponentials=exponentials)
        if value_table is None:
            return ids
        return value_table[torch.arange(3, device=ids.device).view(1, 3), ids]  # id -1: column -1, i.e. 256
    values = None if value_table is None else torch.empty(bsz, 3, dtype=torch.float32, device=cond.device)
    if schedule == "tiles":
        _launch_triton(cond, w, num_heads, guided, cfg, cfg_scalar, inv_temp, filter_threshold, top_p, greedy,
                       uniforms, seed_lo, seed_hi, offset, ids, exponentials=exponentials, value_table=value_table,
                       values=values)
    else:
        launch_phased(cond, w, num_heads, guided, cfg, cfg_scalar, inv_temp, filter_threshold, top_p, greedy,
                      uniforms, seed_lo, seed_hi, offset, ids, exponentials=exponentials, value_table=value_table,
                      values=values, schedule=schedule)
    return ids if values is None else values


@_pixel_head_op.register_fake
def _(cond, weights, num_heads, guided, cfg, cfg_scalar, inv_temp, filter_threshold, top_p, greedy, uniforms,
      seed_lo, seed_hi, offset, exponentials, kernel, value_table=None, schedule="tiles"):
    bsz = cond.shape[0] // 2 if guided else cond.shape[0]
    if value_table is not None:
        return cond.new_empty(bsz, 3, dtype=torch.float32)
    return cond.new_empty(bsz, 3, dtype=torch.int64)
