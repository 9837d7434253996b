"""Fused pixel cross-entropy: the public entry points :func:`pixel_cross_entropy` and :func:`pixel_log_probs`
(validation, backend choice, the torch path or the autograd function of :mod:`.register`)."""
from __future__ import annotations

from typing import Optional

import torch

from fractal_kernels._checks import host_checks
from fractal_kernels.dispatch import resolve, shape_class
from fractal_kernels.ops.pixel_cross_entropy.launch import _check
from fractal_kernels.ops.pixel_cross_entropy.register import _PixelCrossEntropy
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference


def pixel_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                        reduction: str = "mean", ignore_index: int = -100, backend: Optional[str] = None) -> torch.Tensor:
    """``cross_entropy(x @ weight^T + bias, target)`` without materialising the logits; differentiable in
    ``x``, ``weight`` and ``bias``. ``x`` ``[N, C]``, ``weight`` ``[V, C]``, ``bias`` ``[V]`` (or ``[1, V]``),
    ``target`` int64 ``[N]`` in ``[0, V)`` or ``ignore_index`` (ignored rows add 0 and are not counted by
    "mean"). Returns a scalar ("mean", "sum") or fp32 ``[N]`` ("none"). Empty batch: "mean" is NaN like
    PyTorch's, "sum" 0, "none" empty. The logits are fp32 on every backend, also under ``torch.autocast``
    (which is turned off inside the op).

    Target values are checked on CPU tensors (a ValueError). On CUDA that check would synchronise with the
    host every call, so it runs only with ``FRACTAL_KERNELS_DEBUG=1``; otherwise an out-of-range target makes
    its row's loss (and gradient) NaN on the fused kernels, and trips PyTorch's device-side assert on the
    torch backend.

    Math:
        ``loss[n] = logsumexp(z[n]) - z[n, target[n]]`` with ``z = x @ weight^T + bias`` computed in fp32 chunk by
        chunk (never kept as ``[N, V]``); "mean" divides the sum by the number of rows whose target is not
        ``ignore_index``. Gradients ``dz = softmax(z) - onehot(target)`` (scaled by the reduction), then
        ``dx = dz @ weight``, ``dweight = dz^T x``, ``dbias = sum_n dz``.

    Shapes:
        x ``[N, C]``, weight ``[V, C]``, bias ``[V]`` or ``[1, V]``, target int64 ``[N]`` -> a scalar, or fp32 ``[N]``
        with "none". Dtypes: x, weight, bias any float (fp32 / bf16 / fp16), the logits fp32. Backends: "torch",
        "triton", "cuda" (V <= 1024; picked by auto only once listed in ``cuda_verified.json``).
    """
    _check(x, weight, bias, target, reduction)
    bias = bias.reshape(-1)
    v = weight.shape[0]
    if target.numel() and host_checks(target.device):
        live = target[target != ignore_index]
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= v):
            raise ValueError(f"target: values must be in [0, {v}) or ignore_index={ignore_index}; got min "
                             f"{int(live.min())}, max {int(live.max())}")
    which = resolve("pixel_cross_entropy", backend, x.device, shape_class=shape_class(V=v))
    with torch.autocast(x.device.type, enabled=False):  # documented fp32 logits; autocast would make them 16-bit
        if which == "torch" or x.shape[0] == 0:
            return pixel_cross_entropy_reference(x, weight, bias, target.long(), reduction, ignore_index)
        return _PixelCrossEntropy.apply(x, weight, bias, target.long().contiguous(), reduction, ignore_index, which)


def pixel_log_probs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``log p(target)`` per row, fp32 ``[N]`` (for NLL evaluation): ``-pixel_cross_entropy(..., "none")``.

    Math:
        ``log p[n] = z[n, target[n]] - logsumexp(z[n])`` with ``z = x @ weight^T + bias`` in fp32, the logits never
        materialised.

    Shapes:
        x ``[N, C]``, weight ``[V, C]``, bias ``[V]``, target int64 ``[N]`` -> fp32 ``[N]``. Dtypes: any float
        inputs, fp32 logits. Backends: as :func:`pixel_cross_entropy` ("torch", "triton", "cuda" with V <= 1024).
    """
    return -pixel_cross_entropy(x, weight, bias, target, reduction="none", backend=backend)
