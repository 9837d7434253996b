"""Reference math of the pixel head's sampling pipeline, and THE sampler contract every backend implements.

Per channel, with logits ``[2B, V]`` (conditional rows first, unconditional rows last) when CFG is on,
or ``[B, V]`` when ``cfg == 1``:

1. ``logits = logits * temperature`` -- the reference *multiplies* by its ``temperature`` argument;
   ``fractal_models`` keeps that convention so its behaviour matches the published code.
2. Where the conditional softmax probability is below ``filter_threshold``, the unconditional logit is
   replaced by ``max(uncond, cond - max(cond) + max(uncond))``.
3. CFG: ``uncond + cfg * (cond - uncond)``; ``cfg`` is a float or a per-row tensor ``[B]``.
4. Optional nucleus (top-p) truncation -- not in the reference; ``top_p = 1`` skips it so the result
   is bit-identical to the reference.
5. softmax; the draw is ``torch.multinomial`` in the reference, or an explicit inverse-CDF draw.

The sampler contract
--------------------
Written once, here; implemented by :func:`sample_logits_reference` / :func:`inverse_cdf_draw` (the ``torch``
backend), the Triton sampler and the Triton pixel head (their shared ``_inverse_cdf_draw`` in
``fractal_kernels/ops/sample_logits/kernels.py``), the CUDA sampler (``csrc/pixel_head/pixel_head_kernels.cu``) and the
C++ CPU pixel head (``fractal_kernels/cpu/pixel_head_cpu.cpp``). ``tests/fractal_kernels/
test_sampler_conformance.py`` runs every backend present against it. Per row of ``V`` logits:

* **Precision.** Logits of any float dtype are upcast to fp32; every step up to the final probabilities is
  fp32. ``inv_temperature``, ``cfg``, ``filter_threshold`` and ``top_p`` are used as fp32 values.
* **Temperature.** ``x * inv_temperature`` (``inv_temperature == 1`` is skipped: ``x * 1 == x``); greedy
  (``temperature = 0`` in the ops) does not scale.
* **NaN / inf.** Sanitise after scaling and again after the CFG mix: NaN -> ``-inf`` (never drawn),
  ``+inf`` -> ``FLT_MAX`` (every ``+inf`` entry ties with the others and they share the mass), ``-inf`` stays
  (probability exactly 0). ``inf - inf`` or ``0 * inf`` in the mix give NaN, hence ``-inf``.
* **Filter, CFG.** Steps 2-3 above on the sanitised logits; ``cfg`` a scalar or one fp32 value per row; a
  scalar ``cfg == 1`` skips the unconditional half entirely.
* **All-filtered rows.** A row whose (mixed) logits are all ``-inf`` has no valid id: id ``-1``, all
  probabilities 0. This is the only case that yields ``-1``.
* **softmax** ``exp(x - max x) / sum``, fp32. ``exp`` and the order of the sum are each backend's own, so
  probabilities agree across backends to a few ulp -- bit for bit only where every step is exact (e.g. tied
  surviving logits: ``exp(0) = 1``, probabilities ``1 / n``).
* **top-k** (``0`` or ``>= V``: off): keep every ``p >= `` the k-th largest ``p`` (ties at the boundary are
  all kept), zero the rest, divide by the fp32 sum of the kept ones. ``top_k = 1`` keeps the maximum's tie group.
* **top-p** (``1``: off): keep every ``p >= tau``, ``tau`` the largest ``p`` whose at-or-above mass (fp32 sum
  of all ``p_j >= p_i``, ties counted together) is ``>= top_p``; renormalise as top-k. The argmax tie group
  always survives (``top_p -> 0`` keeps exactly it); if no value's mass reaches ``top_p`` (rounding, top_p
  close to 1) everything is kept. top-k runs first, top-p on its output. The mass is an fp32 sum in each
  backend's own order (sort + scan here and in C++, bisection + tree sums on GPUs), so two backends can keep
  different nuclei when that mass lies within ~V ulp of ``top_p``.
* **Greedy**: the first index of the largest sanitised mixed logit; probabilities one-hot there.
* **The draw** (bit for bit on every backend, given the final fp32 probabilities ``p`` and the uniform ``u``):

  - ``q_i = trunc(p_i * 2^52)`` as int64 -- exact (a power-of-two scaling, then the integer part; ``p_i <
    2^-52`` gives 0, a mass of under ``V * 2^-52`` that no uniform resolves);
  - the CDF ``C_i = q_0 + ... + q_i`` and the total ``T = C_{V-1}`` (the same scan's last element) are exact
    int64 sums, so a sequential loop, a warp scan and a tree scan all give the same numbers; ``0 < T < 2^53``
    for a valid row (every row's largest ``p`` is at least ``1 / V``), so every ``C_i`` is an exact fp64 value;
  - ``u`` as fp64 (fp32 Philox uniforms and injected uniforms of any float dtype convert exactly); ``u <= 0``
    and NaN act as 0; ``u >= 1`` (outside the domain) acts as the largest double below 1, i.e. ``t = T - 1``;
  - the target ``t = u * T``, one IEEE fp64 multiply (``t < T`` for every ``u < 1``);
  - **id = the first i with C_i > t** ``= #{i : C_i <= t}``.

  Hence: the id always has ``q_id > 0`` -- never a zero-probability entry, never a padding column, and no
  clamp is needed (``t < T = C_{V-1}``); ``u = 0`` draws the first entry with ``q > 0``; a ``u`` exactly on a
  CDF step (``t == C_i``) draws the next entry with ``q > 0``: id ``i`` owns the half-open interval
  ``[C_{i-1}, C_i) / T`` of ``u``. Two backends given the same ``p`` and ``u`` return the same id, always.
  (The fixtures' rule ``cumsum(p)[i] / sum(p) >= u`` differs from this only for ``u`` within ~2^-52 of a step
  or exactly on one.)
* **Randomness**: ``u`` = Philox4x32-10 keyed by ``(seed, offset + row)``, ``(first word >> 8) * 2^-24`` in
  ``[0, 1 - 2^-24]`` (:mod:`fractal_kernels.reference.philox`), or injected ``uniforms``.
* **Exponential race** (the pixel head's ``exponentials=`` mode, ``torch.multinomial``'s algorithm, which the
  models use to stay bit-exact with the public code): ``argmax(p / e)``, first maximum, with ``e ~ Exp(1)``
  per entry -- a different draw, not an inverse CDF; the draw above does not apply to it.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

CfgLike = Union[float, torch.Tensor]


def _cfg_column(cfg: CfgLike, rows: int, like: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(cfg, torch.Tensor) and cfg.numel() > 1:
        if cfg.numel() != rows:
            raise ValueError(f"cfg: expected a scalar or {rows} per-row values, got shape {tuple(cfg.shape)}")
        return cfg.reshape(rows, 1).to(like.device)
    return cfg


def cfg_filter_mix_reference(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor, cfg: CfgLike, filter_threshold: float
) -> torch.Tensor:
    """Steps 2-3 above on already temperature-scaled logits ``[B, V]``; returns mixed logits ``[B, V]``."""
    cond_probs = torch.softmax(cond_logits, dim=-1)
    low = cond_probs < filter_threshold
    replacement = torch.maximum(
        uncond_logits,
        cond_logits - cond_logits.max(dim=-1, keepdim=True)[0] + uncond_logits.max(dim=-1, keepdim=True)[0],
    )
    uncond_logits = torch.where(low, replacement, uncond_logits)
    cfg_col = _cfg_column(cfg, cond_logits.shape[0], cond_logits)
    return uncond_logits + cfg_col * (cond_logits - uncond_logits)


def _mass_at_or_above(probs: torch.Tensor) -> torch.Tensor:
    """``S_i = sum_j p_j [p_j >= p_i]`` per entry (ties counted together), via one sort. ``[B, V]``."""
    asc, _ = probs.sort(dim=-1)
    cum = asc.cumsum(dim=-1)
    total = cum[:, -1:]
    # entries strictly below p_i: the first position of p_i in the ascending order
    below = torch.searchsorted(asc.contiguous(), probs.contiguous(), right=False)
    mass_below = torch.where(below > 0, cum.gather(-1, (below - 1).clamp(min=0)), torch.zeros_like(probs))
    return total - mass_below


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation with ties kept together; renormalises. ``[B, V]``.

    Keeps entry i iff the mass strictly above it is < ``top_p``; equivalently every entry ``>= tau*``,
    where ``tau*`` is the largest value whose at-or-above mass reaches ``top_p``. The argmax is always kept.
    """
    if top_p >= 1.0:
        return probs
    s_at = _mass_at_or_above(probs)
    tau = torch.where(s_at >= top_p, probs, torch.zeros_like(probs)).amax(dim=-1, keepdim=True)
    kept = torch.where(probs >= tau, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep every entry at least as large as the k-th largest (ties kept together); renormalises."""
    if top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    kth = probs.topk(top_k, dim=-1).values[:, -1:]
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def pixel_probs_reference(
    logits: torch.Tensor,
    *,
    temperature: float,
    cfg: CfgLike,
    filter_threshold: float,
    top_p: float = 1.0,
    guided: bool,
) -> torch.Tensor:
    """The probabilities the reference samples one channel from. ``logits`` ``[2B or B, V]`` -> ``[B, V]``."""
    if temperature != 1.0:  # x * 1.0 == x exactly: skipping it saves an op per channel on the hot path
        logits = logits * temperature
    if guided:
        bsz = logits.shape[0] // 2
        logits = cfg_filter_mix_reference(logits[:bsz], logits[bsz:], cfg, filter_threshold)
    probs = torch.softmax(logits, dim=-1)
    return top_p_filter(probs, top_p)


Q_SCALE = 2.0 ** 52  # the draw's fixed point: q = trunc(p * 2^52), exact for fp32 p in [0, 1]


def fixed_point_cdf(probs: torch.Tensor) -> torch.Tensor:
    """The contract's exact CDF: ``C_i = sum_{j <= i} trunc(p_j * 2^52)`` (int64 ``[B, V]``) of fp32 ``p``.

    ``probs`` are the final probabilities (rounded to fp32 first; negatives and NaN count as 0). Rows of other
    non-negative weights (fp64 row sum above ``1 + 2^-10``, beyond any fp32 rounding of a probability row) are
    divided by their sum first, so ``T`` stays below ``2^53``; the kernels only ever see probabilities.
    """
    p = torch.nan_to_num(probs.float(), nan=0.0).clamp_(min=0.0)
    s = p.double().sum(dim=-1, keepdim=True)
    p = torch.where(s > 1.0 + 2.0 ** -10, (p.double() / s).float(), p)
    q = (p * Q_SCALE).long()  # fp32 * 2^52 is exact; .long() truncates toward zero
    return q.cumsum(dim=-1)


def inverse_cdf_draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The contract's draw (module docstring): the first ``i`` with ``C_i > u * T``; int64 ``[B]``.

    ``probs`` ``[B, V]`` final probabilities, ``uniforms`` ``[B]`` in [0, 1) (any float dtype). Never returns a
    zero-probability index; ``u = 0`` gives the first entry with positive mass, a ``u`` exactly on a CDF step the
    next one. A row without mass (``T = 0``) returns -1.
    """
    cdf = fixed_point_cdf(probs)
    total = cdf[:, -1]
    u = uniforms.to(device=probs.device, dtype=torch.float64).reshape(-1)
    u = torch.where(u > 0, u, torch.zeros_like(u))  # NaN and u <= 0 act as 0
    tot = total.double()
    target = torch.where(u < 1, u * tot, tot - 1)  # u >= 1: the largest double below 1 would give C >= T - 1
    idx = (cdf.double() <= target[:, None]).sum(dim=-1)
    return torch.where(total > 0, idx, torch.full_like(idx, -1))


FLT_MAX = torch.finfo(torch.float32).max


def _sanitize(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never sampled), +inf -> the largest float (ties with other +inf entries)."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=FLT_MAX, neginf=float("-inf"))


def sample_logits_reference(
    cond_logits: torch.Tensor,
    uncond_logits: Optional[torch.Tensor],
    *,
    cfg: CfgLike,
    inv_temperature: float,
    filter_threshold: float,
    top_p: float,
    top_k: int,
    uniforms: Optional[torch.Tensor],
    greedy: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The math of :func:`fractal_kernels.sample_logits` (the ``torch`` backend); returns (ids, probs).

    fp32 throughout: ``logits * inv_temperature`` (greedy: no scaling), sanitise, the reference's filter
    and CFG mix when ``uncond_logits`` is given, sanitise, softmax, top-k then top-p (each renormalising),
    then the contract's inverse-CDF draw from ``uniforms`` (or the argmax when ``greedy``). Rows without a finite
    logit return id -1 and zero probabilities. See the module docstring for the contract.
    """
    x = cond_logits.float()
    scale = 1.0 if greedy else inv_temperature
    x = _sanitize(x * scale)
    if uncond_logits is not None:
        u = _sanitize(uncond_logits.float() * scale)
        x = _sanitize(cfg_filter_mix_reference(x, u, cfg, filter_threshold))
    valid = torch.isfinite(x.amax(dim=-1))
    probs = torch.softmax(x, dim=-1)
    probs = top_k_filter(probs, top_k)
    probs = top_p_filter(probs, top_p)
    probs = torch.where(valid[:, None], probs, torch.zeros_like(probs))
    if greedy:
        ids = x.argmax(dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, ids[:, None], 1.0)
    else:
        ids = inverse_cdf_draw(probs, uniforms)  # an invalid row has no mass: -1
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    probs = torch.where(valid[:, None], probs, torch.zeros_like(probs))
    return ids, probs
