"""Which path each level of a model takes in the fast engine, and why: for ``fractalgen info`` and the
``fractal-bench`` generate rows (a user reading a timing must know whether a level ran fused or op by op).

Reads the levels through their attributes only (the engine never imports the paper's modules)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from fractal_kernels import policy
from fractal_kernels._target import device_arch
from fractal_models.engine.ar import explain_fused_stack, explain_skinny_step
from fractal_models.engine.graphs import explain_step_graphs
from fractal_models.engine.mar import explain_fused_blocks, explain_fused_linear_step


def _mar_tokens(m) -> int:
    """Tokens of one MAR step: the patches plus the prefix (conditions, and the guiding pixel)."""
    return m.seq_len + m.num_conds + int(bool(m.guiding_pixel))


def level_paths(model, device: torch.device, backend: Optional[str] = None,
                policy_only: bool = False) -> List[Dict[str, Any]]:
    """One row per level, top first: ``level``, ``kind`` (MAR / AR / PixelLoss), ``width``, ``path``
    (``fused`` / ``phased`` (AR: the step split over the grid, ``ar_block_stack_decode(schedule=...)``) / ``skinny``
    (AR: op by op, linears as ``skinny_linear``) / ``fused_linear`` (MAR: op by op,
    linears as ``fused_linear``) / ``op_by_op`` for generator levels; the
    pixel head's own description) and ``why``; AR levels also ``step_graphs`` (whether the op-by-op step is
    replayed from per-position CUDA graphs) and ``step_graphs_why``.

    ``backend`` is what ``generate(backend=...)`` would set (None: each level's own). ``policy_only`` answers
    for a machine where the Triton kernels run (the dispatch rule alone), without resolving backends here."""
    rows = []
    levels = model.levels()
    for i, m in enumerate(levels[:-1]):
        kind = type(m).__name__
        ar = hasattr(m, "config")  # AR level, else MAR
        if ar:
            which, why = explain_fused_stack(m, device, backend, policy_only=policy_only)
            width = m.config.dim
            graphed, graphs_why = (False, "fused stack: one launch per step already") if which else \
                explain_step_graphs(m, device)
        else:
            which, why = explain_fused_blocks(m, device, _mar_tokens(m), backend, policy_only=policy_only)
            width = m.norm.normalized_shape[0]
        path = ("phased" if which and why.startswith("the phased step") else "fused") if which else "op_by_op"
        if not which:  # op by op: aten linears, or skinny_linear (AR) / fused_linear (MAR) launches (issue #28)
            explain_alt, alt_path = ((explain_skinny_step, "skinny") if ar else
                                     (explain_fused_linear_step, "fused_linear"))
            alt, alt_why = explain_alt(m, device, backend, policy_only=policy_only)
            path, why = (alt_path, alt_why) if alt else (path, f"{why}; linears: {alt_why}")
        rows.append(dict(level=i, kind=kind, width=int(width), path=path, why=why))
        if ar:
            rows[-1].update(step_graphs=graphed, step_graphs_why=graphs_why)
    head = levels[-1]
    width = int(head.cond_proj.out_features)
    # the Triton kernel's schedule is chosen per call (its rows): say the rule for this GPU
    arch = device_arch(device) if device.type == "cuda" else None
    _, sched = policy.pixel_head_schedule_rule(width, rows=None, dtype=str(head.cond_proj.weight.dtype)[6:],
                                               arch=arch)
    rows.append(dict(level=len(levels) - 1, kind=type(head).__name__, width=width, path="pixel_head",
                     why=f"one pixel_head_sample call per pixel step on a kernel backend (Triton schedule: {sched}), "
                         f"else the KV-cached PyTorch head"))
    return rows


def describe(rows: List[Dict[str, Any]]) -> List[str]:
    """Human lines for :func:`level_paths` rows."""
    return [f"level {r['level']} {r['kind']:<9} width {r['width']:<5} {r['path']:<10} {r['why']}"
            + (f"; step graphs: {r['step_graphs_why']}" if "step_graphs_why" in r else "") for r in rows]
