"""Fused pixel head: the public entry point :func:`pixel_head_sample` (validation, backend choice, the torch
path or the custom op of :mod:`.register`); the backend choice is ``fractal_kernels.dispatch.choose_pixel_head``."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fractal_kernels.dispatch import choose_pixel_head as _choose
from fractal_kernels.dispatch import choose_schedule as _schedule
from fractal_kernels.ops.pixel_head.launch import _check
from fractal_kernels.ops.pixel_head.register import _pixel_head_op
from fractal_kernels.reference.philox import philox_uniform
from fractal_kernels.reference.pixel_head import PixelHeadWeights, pixel_head_sample_reference


def pixel_head_sample(
    cond: torch.Tensor,
    weights: PixelHeadWeights,
    num_heads: int,
    *,
    guided: Optional[bool] = None,
    cfg: Union[float, torch.Tensor] = 1.0,
    temperature: float = 1.0,
    filter_threshold: float = 0.0,
    top_p: float = 1.0,
    uniforms: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
    exponentials: Optional[torch.Tensor] = None,
    value_table: Optional[torch.Tensor] = None,
    schedule: Optional[str] = None,
) -> torch.Tensor:
    """Sample whole pixels with FractalGen's pixel head; returns int64 ids ``[B, 3]`` (R, G, B in 0..255).

    ``cond``: the pixel head's conditions, ``[2B, C]`` (B conditional rows, then the B unconditional rows)
    when ``guided``, else ``[B, C]``; any float dtype. ``weights``: :class:`PixelHeadWeights` from
    :func:`fractal_kernels.reference.pixel_head.pack_pixel_head_weights` (fp32 / bf16 / fp16, upcast on load;
    all math fp32). ``num_heads`` divides the width W. ``guided`` defaults to ``cfg`` being a tensor or != 1.

    Per channel: the head's logits, then exactly :func:`fractal_kernels.sample_logits`: ``logits /
    temperature`` (``0`` = greedy argmax), the reference's low-probability filter, CFG with a scalar or
    per-pixel ``cfg`` ``[B]``, softmax, top-p, inverse-CDF draw. The id drawn for pixel ``b`` is the next
    token of both its cond and uncond rows. Guided with a scalar ``cfg == 1`` samples the conditional rows only.
    Note: ``PixelLoss.sample``'s temperature *multiplies* the logits; pass ``1 / t`` here.

    Randomness: ``uniforms`` ``[3, B]`` (channel-major) if given, else Philox ``(seed, offset + channel * B +
    pixel)`` (``seed=None`` draws one from ``generator`` or the global RNG); identical on every backend. Or
    ``exponentials`` ``[3, B, 256]`` of Exp(1) noise: channel ``c`` takes ``argmax(probs / exponentials[c])``,
    ``torch.multinomial``'s algorithm, so passing the noise it would draw (``torch.empty(B, 256).exponential_()``
    per channel) picks what ``torch.multinomial(probs, 1)`` picks (``PixelLoss`` uses this to keep the
    reference's random stream on a CPU).
    A pixel whose channel-``c`` logits have no finite value (NaN condition or weights) gets -1 for channel
    ``c`` and every later channel. ``backend``: None/"auto" (Triton on CUDA tensors, the compiled C++ kernel
    on CPU tensors when it builds, else PyTorch), "torch", "triton", "cpu"; there is no "cuda" kernel (forcing
    it raises ``BackendUnavailable``). The Triton kernel takes widths that are powers of two in 16..128; auto
    dispatch runs other widths on the torch backend. The CPU kernel takes any width; its logits agree with the
    torch backend's to ~1e-6 (another summation order), so ids can differ where two candidates nearly tie.

    ``schedule`` (the Triton backend's work split; None/"auto": :func:`fractal_kernels.dispatch.
    choose_schedule`, the cost MODEL's crossover at this call's rows): "tiles" (a program runs its pixels'
    whole 3-channel loop: fills the GPU from ~132 tiles of 8 pixels up), "phases" (the loop cut into ``1 + 3 (4
    depth + 2)`` phases, each split over the grid by output columns, a launch per phase: batch 1 uses ~100
    programs, not one), "persistent" (those phases in one launch with grid barriers: CUDA only, never the default
    until a GPU run has measured it). Every schedule draws the same ids (fp32 math; logits to ~1e-6).

    ``value_table`` ``[3, 257]`` float32 (the channel's value of each id, column 256 that of id -1): return the
    values ``value_table[c, ids[:, c]]`` ``[B, 3]`` float32 instead of the ids, looked up inside the kernel (no
    separate gather launch).

    Math:
        For channel ``c`` in R, G, B: ``h = blocks(tokens[:c + 1])[c]`` (the pixel head's causal transformer
        over the condition and the ids drawn so far, keys/values of earlier tokens cached), ``logits_c = head_c(h)``
        ``[2B, 256]``, then ``id_c = sample_logits(logits_c[:B], logits_c[B:], cfg, temperature, filter_threshold,
        top_p)`` (see :func:`fractal_kernels.sample_logits`): ``softmax((uncond + cfg * (cond - uncond)) /
        temperature)`` after the filter, top-p, then the first id whose fixed-point CDF exceeds ``u * total``.
        All math fp32 (weights upcast on load).

    Shapes:
        ``cond`` ``[2B, C]`` guided or ``[B, C]``; weights of width W (``num_heads`` divides W); ``uniforms``
        ``[3, B]``; ``exponentials`` ``[3, B, 256]``; ``cfg`` a scalar or ``[B]``; ``value_table`` ``[3, 257]``
        fp32 -> int64 ids ``[B, 3]`` (float32 values ``[B, 3]`` with ``value_table``). Dtypes: ``cond`` any
        float; weights fp32 / bf16 / fp16. Backends: "triton" (CUDA tensors; W a power of two in 16..128),
        "cpu" (the compiled C++ kernel, CPU tensors, any W), "torch" (any); no "cuda".
    """
    if value_table is not None and (not isinstance(value_table, torch.Tensor) or value_table.shape != (3, 257)
                                    or value_table.dtype != torch.float32 or value_table.device != cond.device):
        got = (f"{tuple(value_table.shape)} {value_table.dtype} on {value_table.device}"
               if isinstance(value_table, torch.Tensor) else type(value_table).__name__)
        raise ValueError(f"value_table: expected a [3, 257] float32 tensor on {cond.device}, got {got}")
    w, guided, bsz = _check(cond, weights, num_heads, guided, cfg, temperature, filter_threshold, top_p, uniforms,
                            offset, exponentials)
    which = _choose(backend, cond.device, w.ln_w.shape[0])
    if schedule not in (None, "auto", "tiles") and which != "triton":
        raise ValueError(f"schedule: {schedule!r} is a split of the Triton kernel; backend {which!r} runs the whole "
                         f"head its own way (use schedule=None, or backend='triton')")
    sched = "tiles"
    if which == "triton":
        sched, _ = _schedule("pixel_head", schedule, cond.device, w.ln_w.shape[0], cond.shape[0], w.qkv_w.dtype)
    if bsz == 0:
        return torch.empty(0, 3, dtype=torch.int64 if value_table is None else torch.float32, device=cond.device)
    greedy = temperature == 0
    inv_temp = 1.0 if greedy else 1.0 / float(temperature)
    if isinstance(cfg, torch.Tensor) and cfg.numel() == 1:
        cfg = float(cfg)
    if guided and not isinstance(cfg, torch.Tensor) and float(cfg) == 1.0:
        # cfg = 1 is the conditional distribution (as in sample_logits): the uncond rows never matter
        guided, cond = False, cond[:bsz]
    if uniforms is None and exponentials is None and not greedy and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    seed = int(seed or 0) & ((1 << 64) - 1)

    if which == "torch":
        u = uniforms
        if u is None and not greedy and exponentials is None:
            u = philox_uniform(seed, offset, 3 * bsz, cond.device).reshape(3, bsz)
        ids = pixel_head_sample_reference(cond, w, num_heads, guided=guided, cfg=cfg, inv_temperature=inv_temp,
                                          filter_threshold=float(filter_threshold), top_p=float(top_p), uniforms=u,
                                          greedy=greedy, exponentials=exponentials)
        if value_table is None:
            return ids
        return value_table[torch.arange(3, device=ids.device).view(1, 3), ids]  # id -1: column -1, i.e. 256
    cfg_t = cfg.reshape(-1).float().contiguous() if isinstance(cfg, torch.Tensor) else None
    cfg_scalar = 1.0 if cfg_t is not None else float(cfg)
    uni = uniforms.contiguous() if uniforms is not None else None  # fp64 uniforms stay fp64, as in sample_logits
    exp = exponentials.contiguous() if exponentials is not None and not greedy else None
    return _pixel_head_op(cond if cond.stride(1) == 1 else cond.contiguous(), list(w), num_heads, guided, cfg_t,
                          cfg_scalar, inv_temp, float(filter_threshold), float(top_p), greedy, uni,
                          seed & 0xFFFFFFFF, seed >> 32, int(offset), exp, which,
                          None if value_table is None else value_table.contiguous(), sched)
