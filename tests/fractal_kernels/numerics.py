"""Numerics checks that do not depend on the CPU's BLAS (issue #27).

A kernel with 16-bit storage rounds at fixed points (each linear's input to the weight dtype, cache writes to
the cache dtype, the output to its dtype). Its reference for a 16-bit check is the op's torch reference run in
**float64** with the same rounding points (``compute_dtype=torch.float64``): exact everywhere else, so it does
not change with the machine's fp32 summation order (MKL's AVX-512 vs AVX2 kernels, a GPU's tensor-core order).

The kernel's own fp32 arithmetic still puts a value that sits within ~1e-7 of a 16-bit rounding midpoint on the
other side now and then: a *flip*, one 16-bit ulp at that element, carried by the later math to the rest of its
row (AR: one sequence's step; MAR: one sequence). :func:`check_flips` therefore asks that

* every element agrees with the reference to fp32 accuracy (``atol + rtol * |want|``), except
* elements of at most ``max_rows`` rows (:func:`allowed_rows`: a stated fraction of the rows, at least one),
  each off by at most ``max_ulps`` units in the last place of ``flip_dtype`` at ``max(|want|, floor)``
  (``floor`` 1: the outputs are normalised, O(1)). For a 16-bit output that is 1 ulp of its own dtype (the last
  rounding); for an fp32 value after a 16-bit linear, :data:`FLIP_ULPS` ulps of the weight dtype (a flip is one
  ulp at an input, scaled by a unit-gain weight row; two may meet in one row).

Measured on this project's grids (AR step, D 32..64, 1..17 rows, bf16/fp16): the kernel saw flips in at most 2
of 17 rows, at most 0.95 ulp at the output and 1.3 at a cache slot; the fp32 reference with its sums permuted
and split (another BLAS order, :mod:`tests.fractal_kernels.test_numerics`) in at most 4 of 17 rows, 1.25 ulps.

No mean-error bound: a mean over chained steps lets one flip decide. Multi-step tests restart every step from
the reference's state (its cache), so a flip cannot propagate into the next step.
"""
from __future__ import annotations

from typing import Dict

import math

import torch

FLIP_FRACTION = 0.3  # rows that may carry a rounding flip: at most this fraction (at least one row)
FLIP_ULPS = 2.0  # fp32 values after 16-bit linears: ulps of the weight dtype a flip may move them


def allowed_rows(rows: int, fraction: float = FLIP_FRACTION) -> int:
    """How many of ``rows`` may carry a flip: ``floor(fraction * rows)``, at least 1."""
    return max(1, math.floor(fraction * rows))


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at ``|x|`` (fp64): one unit in the last place (normal range; at least the
    spacing at the smallest normal)."""
    info = torch.finfo(dtype)
    a = x.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * info.eps


def flips(got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float, flip_dtype: torch.dtype,
          floor: float = 1.0) -> Dict[str, object]:
    """Where ``got`` leaves the reference ``want`` by more than fp32 accuracy, per row (the last dim is the row's
    elements, the leading dims are rows): ``rows`` (row indices), ``max_ulps`` (largest difference in ulps of
    ``flip_dtype`` at ``max(|want|, floor)``), ``elements`` (count), ``nonfinite`` (elements finite on one side
    only, or NaN on one side only)."""
    g, w = got.double(), want.double()
    g2, w2 = g.reshape(-1, max(1, g.shape[-1] if g.dim() else 1)), w.reshape(-1, max(1, w.shape[-1] if w.dim() else 1))
    fin = torch.isfinite(g2) & torch.isfinite(w2)
    same_special = (~torch.isfinite(g2)) & (~torch.isfinite(w2)) & ((g2 == w2) | (torch.isnan(g2) & torch.isnan(w2)))
    nonfinite = int((~fin & ~same_special).sum())
    err = torch.where(fin, (g2 - w2).abs(), torch.zeros_like(g2))
    off = err > atol + rtol * w2.abs().where(fin, torch.zeros_like(w2))
    unit = ulp(w2.abs().clamp_min(floor).where(fin, torch.ones_like(w2)), flip_dtype)
    ulps = (err / unit).where(off, torch.zeros_like(err))
    rows = off.any(dim=-1).nonzero().flatten().tolist()
    return {"rows": rows, "max_ulps": float(ulps.max()) if ulps.numel() else 0.0, "elements": int(off.sum()),
            "nonfinite": nonfinite}


def check_flips(got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float, flip_dtype: torch.dtype,
                max_rows: int, max_ulps: float = 1.0, floor: float = 1.0, what: str = "") -> Dict[str, object]:
    """Assert the module docstring's rule; returns :func:`flips`' report (for tests that count across cases)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    r = flips(got, want, atol=atol, rtol=rtol, flip_dtype=flip_dtype, floor=floor)
    assert r["nonfinite"] == 0, f"{what}: {r['nonfinite']} elements finite (or NaN) on one side only"
    assert len(r["rows"]) <= max_rows, (f"{what}: rows {r['rows']} leave the fp64 reference by more than "
                                        f"atol={atol} rtol={rtol} (at most {max_rows} may, by a rounding flip)")
    assert r["max_ulps"] <= max_ulps, (f"{what}: a difference of {r['max_ulps']:.3g} ulps of {flip_dtype} "
                                       f"(at most {max_ulps}: one rounding flip)")
    return r
