"""Fused pixel sampler: the public entry point :func:`sample_logits` (validation, backend choice, the torch path,
the Triton launcher of :mod:`.launch` or the CUDA extension)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fractal_kernels.dispatch import resolve, shape_class
from fractal_kernels.ops.sample_logits.launch import _check, _launch_triton
from fractal_kernels.reference.philox import philox_uniform
from fractal_kernels.reference.pixel_sampling import sample_logits_reference


def sample_logits(
    cond_logits: torch.Tensor,
    uncond_logits: Optional[torch.Tensor] = None,
    *,
    cfg: Union[float, torch.Tensor] = 1.0,
    temperature: float = 1.0,
    filter_threshold: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
    out_probs: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Draw one index per row from CFG-mixed, filtered, truncated logits; returns int64 ``[N]``.

    ``cond_logits``/``uncond_logits`` ``[N, V]`` (any float dtype; rows may be strided). The pipeline:
    ``logits / temperature`` (computed as ``logits * (1 / temperature)``; ``temperature = 0`` is greedy:
    no scaling, argmax), the reference's filter (unconditional logit lifted to
    ``max(uncond, cond - max(cond) + max(uncond))`` where the conditional probability is below
    ``filter_threshold``), CFG ``uncond + cfg * (cond - uncond)`` with a scalar or per-row ``cfg`` (no
    ``uncond_logits``, or ``cfg == 1``, skips it), softmax, top-k (``0`` = off; ``>= V`` = off), top-p (ties
    kept together; the argmax always survives), then the inverse-CDF draw: the first index whose cumulative
    probability exceeds ``u * total``, never a zero-probability index (the exact contract:
    ``fractal_kernels.reference.pixel_sampling``).

    Randomness: ``uniforms`` ``[N]`` if given, else Philox ``(seed, offset + row)``; ``seed=None`` draws a
    seed from ``generator`` (or the global torch RNG). NaN logits are never drawn, ``+inf`` logits share the
    mass; a row with no finite logit returns ``-1``. ``out_probs`` (float32 ``[N, V]``) receives the final
    probabilities. ``backend``: ``None``/"auto", "torch", "triton", "cuda" (see ``fractal_kernels.dispatch``).

    Note: the FractalGen reference *multiplies* logits by its temperature; pass ``1 / t`` to match it.

    Math:
        Per row: ``c, u = cond / temperature, uncond / temperature``; where ``softmax(c) < filter_threshold``,
        ``u`` is lifted to ``max(u, c - max(c) + max(u))``; ``z = u + cfg * (c - u)``, ``p = softmax(z)``, top-k
        then top-p truncation (renormalised), and ``id = min{i : cdf[i] > r * total}`` on the fixed-point CDF
        ``cdf = cumsum(trunc(p * 2**52))`` in int64, ``total = cdf[-1]``, ``r`` the row's uniform. Softmax and
        CDF in fp32 / int64 whatever the logits' dtype; the same ids on every backend for the same ``r``.

    Shapes:
        cond_logits, uncond_logits ``[N, V]`` (V <= 4096; rows may be strided, ``stride(-1) == 1``); ``cfg`` a
        scalar or ``[N]``; ``uniforms`` ``[N]``; ``out_probs`` float32 ``[N, V]`` -> int64 ``[N]``. Dtypes: any
        float logits (fp32 / bf16 / fp16 on the kernels). Backends: "torch" (any), "triton" (V <= 4096),
        "cuda" (V <= 1024; picked by auto only once listed in ``cuda_verified.json``).
    """
    _check(cond_logits, uncond_logits, cfg, temperature, filter_threshold, top_p, top_k, uniforms, out_probs)
    n, v = cond_logits.shape
    device = cond_logits.device
    which = resolve("sample_logits", backend, device, dtype=cond_logits.dtype, shape_class=shape_class(V=v))
    ids = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return ids
    greedy = temperature == 0
    inv_temp = 1.0 if greedy else 1.0 / float(temperature)
    if isinstance(cfg, torch.Tensor) and cfg.numel() == 1:
        cfg = float(cfg)
    if uncond_logits is not None and not isinstance(cfg, torch.Tensor) and float(cfg) == 1.0:
        uncond_logits = None  # cfg = 1 is the conditional distribution: skip the unconditional half
    if uniforms is None and not greedy and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    seed = int(seed or 0)

    if which == "torch":
        u = uniforms if uniforms is not None else (None if greedy else philox_uniform(seed, offset, n, device))
        out, probs = sample_logits_reference(cond_logits, uncond_logits, cfg=cfg, inv_temperature=inv_temp,
                                             filter_threshold=filter_threshold, top_p=top_p, top_k=top_k,
                                             uniforms=u, greedy=greedy)
        if out_probs is not None:
            out_probs.copy_(probs)
        return out
    cfg_t = cfg.reshape(-1).float().contiguous() if isinstance(cfg, torch.Tensor) else None
    cfg_scalar = 1.0 if cfg_t is not None else float(cfg)
    uni = uniforms.contiguous() if uniforms is not None else None
    if which == "triton":
        _launch_triton(cond_logits, uncond_logits, cfg_t, cfg_scalar, inv_temp, float(filter_threshold), float(top_p),
                       int(top_k), uni, seed, int(offset), greedy, ids, out_probs)
    else:
        from fractal_kernels.dispatch import _cuda_ext
        _cuda_ext().sample_logits(cond_logits, uncond_logits, cfg_t, uni, ids, out_probs, inv_temp, cfg_scalar,
                                  float(filter_threshold), float(top_p), int(top_k), seed, int(offset), greedy)
    return ids
