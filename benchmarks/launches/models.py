"""Walking the model: the levels whose ``sample`` calls are labelled (and memoised), the narrow clones of the
published configs, and :func:`count_generate`, which counts one ``generate`` per batch and summarises it per
level."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .classification import Counts
from .hooks import _ACTIVE, counting


def _levels(model) -> List[Tuple[Any, str, str]]:
    """(object whose ``sample`` to wrap, label, kind) for every level, top first: the FractalGen node of each
    generator level, the guiding-pixel heads of MAR levels, the last pixel head."""
    from fractal_models.fractalgen import FractalGen
    from fractal_models.mar import MAR
    out, node, lvl = [], model, 0
    while isinstance(node, FractalGen):
        gen = node.generator
        kind = "MAR" if isinstance(gen, MAR) else "AR"
        out.append((node, f"L{lvl} {kind}", kind))
        if isinstance(gen, MAR) and gen.guiding_pixel:
            out.append((gen.guiding_pixel_loss, f"L{lvl} guiding pixel", "pixel"))
        node, lvl = node.next_fractal, lvl + 1
    out.append((node, "pixel head", "pixel"))
    return out


def _narrow_width(heads: int, head_dim: int) -> int:
    """Width of a narrowed level: ``heads`` heads of ``head_dim`` (at least 16, a power of two: what the fused
    pixel-head kernel takes)."""
    return max(16, 1 << max(0, (heads * head_dim - 1).bit_length()))


def narrow_clone(config: str, head_dim: int = 8, **overrides: Any):
    """The config with every head ``head_dim`` wide (generator level width = heads x head_dim; the pixel heads --
    the last level's and the MAR guiding-pixel heads, 128 wide in the model -- at least 16 and a power of two):
    same levels, grids, depths, steps, conditions and **heads** (an ``embed_dim_list`` override names the
    original's widths: they decide which levels fuse their blocks, :func:`pin_fused_stacks`) (the head count changes counts: with one head ``o.transpose(1, 2).reshape`` is a view, with several
    a copy). Random weights (seed 0)."""
    from fractal_models import config_kwargs
    from fractal_models.fractalgen import FractalGen
    from fractal_models.mar import MAR
    from fractal_models.pixelloss import PixelLoss
    kw = config_kwargs(config, **overrides)
    full_widths = kw["embed_dim_list"]
    heads = kw["num_heads_list"]
    # generator levels: exactly heads x head_dim (12 heads x 8 is 96: a power of two would not divide by 12);
    # the pixel head (last entry): a power of two, what its fused kernel takes
    kw["embed_dim_list"] = tuple(h * head_dim for h in heads[:-1]) + (_narrow_width(heads[-1], head_dim),)
    torch.manual_seed(0)
    model = FractalGen(**kw)
    for m in list(model.modules()):
        if isinstance(m, MAR) and m.guiding_pixel:
            old = m.guiding_pixel_loss
            heads = old.blocks[0].attn.num_heads if len(old.blocks) else 1
            m.guiding_pixel_loss = PixelLoss(c_channels=old.cond_proj.in_features,
                                             width=_narrow_width(heads, head_dim), depth=len(old.blocks),
                                             num_heads=heads, r_weight=old.r_weight)
    pin_fused_stacks(model, full_widths)
    return model.eval()


def pin_fused_stacks(model, widths: Sequence[int]) -> None:
    """Fix every generator level's ``fused_stack`` to what the default rule decides at the original ``widths``
    (``policy.block_stack_rule``): a narrow clone must fuse exactly the levels its original fuses, not every
    level (all clone levels are narrow)."""
    from fractal_kernels import policy
    for level, width in zip(model.levels()[:-1], widths):
        level.fused_stack = policy.block_stack_rule(width)[0]


def _host_attributes(model: torch.nn.Module) -> List[torch.Tensor]:
    """Plain tensor attributes of the modules (not parameters/buffers): ``model.to`` leaves them on the CPU."""
    out = []
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def _skey(name: str, v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), str(v.dtype))
    if isinstance(v, (list, tuple)):
        return tuple(_skey(name, x) for x in v)
    if name == "cfg" and isinstance(v, (int, float)):
        return ("cfg", float(v) == 1.0)  # the value never steers control flow, cfg == 1 does
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return type(v).__name__


@contextlib.contextmanager
def instrumented(model, memo: bool) -> Iterator[None]:
    """Wrap every level's ``sample``: counts are attributed to the innermost level running, and with ``memo`` a
    sub-level call is executed once per structural key and replayed afterwards (see the module docstring)."""
    import inspect
    cache: Dict[Any, Any] = {}
    installed = []
    for obj, label, _ in _levels(model):
        orig = obj.sample
        sig = inspect.signature(orig)
        top = obj is model

        def wrapper(*args, _orig=orig, _sig=sig, _label=label, _top=top, **kwargs):
            st = _ACTIVE[-1] if _ACTIVE else None
            if st is None:
                return _orig(*args, **kwargs)
            bound = _sig.bind(*args, **kwargs)
            conds = bound.arguments.get("cond_list")
            rows = int(conds[0].shape[0]) if conds else 0
            key = None
            if memo and not _top:
                key = (_label,) + tuple((k, _skey(k, v)) for k, v in sorted(bound.arguments.items()))
                hit = cache.get(key)
                if hit is not None:
                    st.counts.add(hit[0])
                    st.suppress += 1
                    try:
                        return hit[1].clone()
                    finally:
                        st.suppress -= 1
            snap = st.counts.snapshot() if key is not None else None
            st.counts.calls[_label] += 1
            st.counts.rows[_label] += rows
            st.labels.append(_label)
            try:
                out = _orig(*args, **kwargs)
            finally:
                st.labels.pop()
            if key is not None:
                st.suppress += 1
                try:
                    cache[key] = (st.counts.delta_since(snap), out.clone())
                finally:
                    st.suppress -= 1
            return out
        obj.sample = wrapper
        installed.append(obj)
    try:
        yield
    finally:
        for obj in installed:
            del obj.sample


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread (restored afterwards). Counting is many small ops: on a shared
    2-core machine a second OpenMP thread only spins at every op's barrier waiting for a core (measured: one
    fractalar_in64 job 41.5 s with 2 threads, 5.2 s with 1, same counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_generate(model, batches: Sequence[int], *, fast: bool, backend: str,
                   num_iter_list: Optional[Sequence[int]] = None, cfg: float = 11.0, temperature: float = 1.03,
                   memo: bool = True, execute_kernels: bool = False, warmup: bool = True,
                   seed: int = 0) -> Dict[int, Dict[str, Any]]:
    """Count one ``generate`` batch of ``model`` (on the CPU) per entry of ``batches``; with ``warmup`` each after
    an uncounted call at the same batch (steady state: the per-module tables, and the per-process caches keyed by
    the batch rows such as the decode kernels' length tensors, are built by then). The first call's extra launches
    are reported as ``first_call_extra`` (without ``memo`` only: a memoised warm-up would replay its cache
    building into every replayed call)."""
    from fractal_models import generate
    from fractal_models.sampling import default_num_iter_list
    iters = list(num_iter_list) if num_iter_list is not None else default_num_iter_list(model)
    host = _host_attributes(model)

    def run(batch: int):
        labels = torch.arange(batch) % model.num_classes
        t0 = time.perf_counter()
        with instrumented(model, memo), counting(execute_kernels, host) as st:
            generate(model, labels, num_iter_list=iters, cfg=cfg, temperature=temperature, seed=seed, fast=fast,
                     backend=backend)
        return st.counts, time.perf_counter() - t0

    out = {}
    with one_thread():
        for b in batches:
            cold = run(b) if warmup else None
            c, wall = run(b)
            out[b] = summarize_counts(c, b, cold=cold[0] if cold is not None and not memo else None, wall_s=wall,
                                      path="fast" if fast else "ref", warmup_s=cold[1] if cold is not None else 0.0,
                                      num_iter_list=iters)
    return out


def summarize_counts(c: Counts, batch: int, cold: Optional[Counts] = None, **extra: Any) -> Dict[str, Any]:
    levels = sorted({lbl for lbl, _ in c.launches} | {lbl for lbl, _ in c.syncs} | set(c.calls))
    per_level = {}
    for lbl in levels:
        kinds = {k: n for (l2, k), n in c.launches.items() if l2 == lbl}
        per_level[lbl] = {
            "launches": sum(kinds.values()), "copies": sum(n for (l2, _), n in c.copies.items() if l2 == lbl),
            "syncs": sum(n for (l2, _), n in c.syncs.items() if l2 == lbl),
            "calls": c.calls.get(lbl, 0), "rows": c.rows.get(lbl, 0),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "sync_kinds": {k: n for (l2, k), n in c.syncs.items() if l2 == lbl},
        }
    tot = c.totals()
    out = {"batch": batch, **tot, "launches_per_image": tot["launches"] / batch,
           "copies_per_image": tot["copies"] / batch, "syncs_per_image": tot["syncs"] / batch,
           "levels": per_level,
           "implicit_h2d": {f"{l}|{k}": n for (l, k), n in c.unclassified_implicit.items()}, **extra}
    if cold is not None:
        ct = cold.totals()
        out["first_call_extra"] = {k: ct[k] - tot[k] for k in tot}
    return out
