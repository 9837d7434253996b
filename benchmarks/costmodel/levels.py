"""Levels of a config at a batch, and the launches of one level step on each path (a MODEL).

:func:`build_levels` reads the level structure off the full-size model (meta device) and the exact launch counts
of ``benchmarks.launches``; :func:`step_launches` lists ``(Launch, launches per step)`` of one step of a level on
a path; :func:`level_time` sums them (``launches x modeled time``, plus the host syncs).
"""
from __future__ import annotations

import copy
import functools
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import arstep, pixel
from . import constants as C
from .launch import Launch, launch_time
from .workload import (BLOCK_LAUNCHES, EB, STACK_KERNELS, Level, ar_stack, attention_decode,
                                           attention_mar, elementwise, fused_gemm, gemm, mar_stack, skinny)

LAUNCHES_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "launches",
                             "launches.json")
PATHS = ("fast", "op_by_op", "skinny", "fused_linear", "fused", "pre28_default", "reference", "op_by_op_graph",
         "fast_graph", "fast_persistent")
# pixel heads: their schedule per path is report.pixel_schedule (tiles / phases / persistent, pixel.SCHEDULES);
# AR levels may take the phased step (level paths ar_phases / ar_persistent, arstep.py) where its crossover wins;
# fast_persistent: the fast path with the pixel heads' and AR steps' phases in one launch with grid barriers
# where that wins (GPU-only options, never run)
# skinny: op by op with the AR levels' linears as skinny_linear launches (norm / SwiGLU / residual / the KV-cache write
# fused: 5 launches a block, not 13; issue #28 item 4); fast_graph: the fast path with the AR levels' blocks replayed from per-position
# CUDA graphs (the engine's step_graphs option: GPU-only, never run); fused_linear: op by op with the MAR levels'
# linears as fused_linear launches (LayerNorm prologue, bias / GELU / residual epilogues: 5 launches a block, not 10;
# issue #28 item 5)
# op_by_op_graph: a what-if, not a path of the library: the op-by-op launches replayed from a CUDA graph (every
# launch at the graph-node cost, kernels unchanged; issue #28 item 4 asks for it), to show what launches cost
PRE28_MAX_WIDTH = 512  # the width rule of dispatch before issue #28: levels up to it fused by default


# ------------------------------------------------------------------------------------------------------ counts
@functools.lru_cache(maxsize=None)
def _committed_counts() -> Dict[str, dict]:
    try:
        with open(LAUNCHES_JSON, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    return {c["config"]: c["batches"]["1"] for c in doc.get("configs", []) if "1" in c.get("batches", {})}


@functools.lru_cache(maxsize=None)
def level_counts(config: str) -> Dict[str, Dict[str, dict]]:
    """``{"ref"|"fast": {level label: {"launches", "syncs", "kinds"}}}`` per batch (batch-independent): the
    committed ``benchmarks/results/launches/launches.json`` for the published configs, else counted now on the
    model itself (the tiny configs: ~1 s each)."""
    done = _committed_counts().get(config)
    if done is None:
        from .. import launches
        res = launches.run_config(config, [1], narrow=False, depth_extrapolation=False)
        done = {p: res[p][1] for p in ("ref", "fast")}
    return {p: done[p]["levels"] for p in ("ref", "fast")}


# ------------------------------------------------------------------------------------------------------ levels
def _heads(block) -> int:
    for path in ("attn.num_heads", "attention.n_head", "attention.num_heads"):
        obj = block
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return int(obj)
        except AttributeError:
            continue
    raise AttributeError(f"no head count on {type(block).__name__}")


def _linears(block) -> List[Tuple[int, int]]:
    """(out, in) of a block's Linear layers in module order: qkv, projection, the MLP's, its last one (fc2 / w2:
    ``(width, hidden)``) last."""
    return [(m.out_features, m.in_features) for m in block.modules() if isinstance(m, torch.nn.Linear)]


@functools.lru_cache(maxsize=None)
def _structure(config: str) -> Tuple[dict, ...]:
    """Per level (launch-table label order): kind, width, depth, heads, hidden, tokens, linears, c_in."""
    from fractal_models import build_model
    from fractal_models.mar import MAR
    with torch.device("meta"):
        model = build_model(config)
    gens = model.levels()
    out = []

    def head(label, ph):
        lin = _linears(ph.blocks[0])
        width = ph.ln.normalized_shape[0]
        out.append(dict(label=label, kind="pixel", width=width, depth=len(ph.blocks), heads=_heads(ph.blocks[0]),
                        hidden=lin[-1][1], tokens=4, linears=lin,
                        c_in=ph.cond_proj.in_features))

    for lvl, gen in enumerate(gens[:-1]):
        mar = isinstance(gen, MAR)
        b = gen.blocks[0]
        lin = _linears(b)
        width = lin[0][1]
        if mar and gen.guiding_pixel:
            head(f"L{lvl} guiding pixel", gen.guiding_pixel_loss)
        tokens = gen.seq_len + gen.num_conds + int(gen.guiding_pixel) if mar else gen.seq_len + 1
        out.append(dict(label=f"L{lvl} {'MAR' if mar else 'AR'}", kind="MAR" if mar else "AR", width=width,
                        depth=len(gen.blocks), heads=_heads(b), tokens=tokens, linears=lin,
                        hidden=lin[-1][1], c_in=0,
                        uniform_heads=all(_heads(x) == _heads(b) for x in gen.blocks)))
    head("pixel head", gens[-1])
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _roofline(config: str, batch: int) -> dict:
    from ..launches import roofline
    return roofline(config, batch)


def build_levels(config: str, batch: int) -> List[Level]:
    """The levels of ``config`` at ``batch`` (CFG on), with the per-step launch counts of each path."""
    from fractal_kernels.dispatch import MAR_STACK_MAX_L
    roof = _roofline(config, batch)["levels"]
    counts = level_counts(config)
    out = []
    for s in _structure(config):
        r = roof[s["label"]]
        calls = r["calls_per_batch"]
        steps = r.get("steps_per_call", 1)
        inv_batch = calls * steps
        n = int(round(r["rows_per_image"] * batch / calls))
        fusable = s["kind"] == "AR" or (s["kind"] == "MAR" and s["tokens"] <= MAR_STACK_MAX_L
                                         and s.get("uniform_heads", True))
        lv = Level(label=s["label"], kind=s["kind"], width=s["width"], depth=s["depth"], heads=s["heads"],
                   hidden=s["hidden"], tokens=s["tokens"], linears=list(s["linears"]), n=n,
                   invocations_per_image=inv_batch / batch, roof=r, c_in=s["c_in"], fusable=fusable)
        fast, ref = counts["fast"].get(s["label"], {}), counts["ref"].get(s["label"], {})
        t_fast, t_ref = fast.get("launches", 0) / inv_batch, ref.get("launches", 0) / inv_batch
        c = {"reference": {"total": t_ref, "syncs": ref.get("syncs", 0) / inv_batch},
             "kernel_syncs": fast.get("syncs", 0) / inv_batch}
        if s["kind"] in BLOCK_LAUNCHES:
            stack = fast.get("kinds", {}).get(STACK_KERNELS[s["kind"]], 0) / inv_batch
            blocks = lv.depth * BLOCK_LAUNCHES[s["kind"]]
            # counted fused: other = the rest, op by op adds the final norm; counted op by op: the reverse
            other_fused = t_fast - stack if stack else t_fast - blocks - 1
            c["other_fused"] = max(0.0, other_fused)
            c["other_op_by_op"] = max(0.0, other_fused + 1)
            c["other_reference"] = max(0.0, t_ref - lv.depth * len(lv.linears))
        else:
            c["kernel_launches"] = t_fast
        lv.counts = c
        out.append(lv)
    return out


def generate_overhead(config: str, batch: int) -> Dict[str, Dict[str, float]]:
    """Launches and syncs per image of the top-level ``generate`` (outside every level), per counted path."""
    counts = level_counts(config)
    return {p: {"launches": counts[p].get("generate", {}).get("launches", 0) / batch,
                "syncs": counts[p].get("generate", {}).get("syncs", 0) / batch} for p in ("ref", "fast")}


# -------------------------------------------------------------------------------------------------- step lists
def step_launches(lv: Level, path: str, hw: C.Hardware = C.HARDWARE["H100"], arch: int = 90,
                  fuse: Optional[bool] = None) -> List[Tuple[Launch, float]]:
    """``(launch, launches per level step)`` of one step of ``lv`` on ``path`` ("op_by_op", "skinny" (AR),
    "fused_linear" (MAR), "fused", "reference"; "fast" is resolved by the caller into one of the first four)."""
    if path == "fast":
        raise ValueError("step_launches: resolve 'fast' to 'fused', 'skinny' or 'op_by_op' first (report.level_path)")
    c = lv.counts
    if lv.kind == "pixel":
        if path == "reference":
            per = c["reference"]["total"]
            nbytes = (lv.roof["ref_weight_bytes"] + lv.roof["ref_act_bytes"]) / max(lv.invocations_per_image, 1e-30)
            return [(elementwise("reference op", nbytes / max(per, 1.0)), per)]
        # the pixel head's schedules (pixel.SCHEDULES); a block path name means the tile kernel, as before
        return pixel.step(lv, path if path in pixel.SCHEDULES else "tiles", hw, arch)
    D, H = lv.width, lv.hidden
    M = lv.n * lv.tokens if lv.kind == "MAR" else lv.n
    act = M * D * EB
    if lv.kind == "AR" and path in ("ar_phases", "ar_persistent"):  # the phased step (arstep.py), glue as fused
        return arstep.phased(lv, hw, arch, persistent=path == "ar_persistent") + [
            (elementwise("level glue", 2 * act), c["other_fused"])]
    if path == "fused" and lv.fusable:
        stack = mar_stack(lv, hw, arch) if lv.kind == "MAR" else ar_stack(lv, hw, arch)
        return [(stack, 1.0), (elementwise("level glue", 2 * act), c["other_fused"])]
    kind = "eager"
    gemms = [(gemm(f"linear {o}x{i}", M, o, i, hw, arch, kind), float(lv.depth)) for o, i in lv.linears]
    if path == "reference":
        other = c["other_reference"]
        gemm_act = sum(g.unique_bytes - g.weight_bytes for g, _ in gemms) * lv.depth
        per_inv = lv.roof["ref_act_bytes"] / max(lv.invocations_per_image, 1e-30)
        each = max(2 * act, (per_inv - gemm_act) / max(other, 1.0))
        return gemms + [(elementwise("reference op", each), other)]
    d = float(lv.depth)
    if path == "skinny" and lv.kind == "AR":
        return [(skinny("wqkv+rmsnorm", M, 3 * D, D, hw, arch, norm=True), d),
                (skinny("wo+residual", M, D, D, hw, arch, residual=True, x_bytes=EB), d),
                (skinny("w1|w3+rmsnorm+swiglu", M, H, D, hw, arch, gate=True, norm=True), d),
                (skinny("w2+residual", M, D, H, hw, arch, residual=True, x_bytes=EB), d),
                (attention_decode(lv, hw, arch), d),  # the cache write: inside the wqkv launch (kv_out)
                (elementwise("level glue", 2 * act), c["other_op_by_op"])]
    if path == "fused_linear" and lv.kind == "MAR":
        return [(fused_gemm("ln1+qkv", M, 3 * D, D, hw, arch, norm=True), d),
                (fused_gemm("proj+residual", M, D, D, hw, arch, residual=True, x_bytes=EB), d),
                (fused_gemm("ln2+fc1+gelu", M, H, D, hw, arch, norm=True, gelu=True), d),
                (fused_gemm("fc2+residual", M, D, H, hw, arch, residual=True, x_bytes=EB), d),
                (attention_mar(lv, hw, arch), d), (elementwise("level glue", 2 * act), c["other_op_by_op"])]
    if lv.kind == "MAR":
        ops = [(attention_mar(lv, hw, arch), d), (elementwise("layer_norm", 2 * act), 2 * d),
               (elementwise("add", 3 * act), 2 * d), (elementwise("gelu", 2 * M * H * EB), d)]
    else:
        ops = [(attention_decode(lv, hw, arch), d), (elementwise("rms_norm", 2 * act), 2 * d),
               (elementwise("add", 3 * act), 2 * d), (elementwise("silu", 2 * M * H * EB), d),
               (elementwise("mul", 3 * M * H * EB), d), (elementwise("kv cache copy_", 4 * act), d)]
    return gemms + ops + [(elementwise("level glue", 2 * act), c["other_op_by_op"])]


def syncs_per_step(lv: Level, path: str) -> float:
    return lv.counts["reference"]["syncs"] if path == "reference" else lv.counts["kernel_syncs"]


def step_time(lv: Level, path: str, hw: C.Hardware = C.HARDWARE["H100"], arch: int = 90) -> float:
    """Seconds of one level step on ``path`` (a MODEL): launches x modeled time + syncs x sync cost."""
    t = sum(n * launch_time(l, hw)["seconds"] for l, n in step_launches(lv, path, hw, arch))
    return t + syncs_per_step(lv, path) * hw.sync_s


def with_n(lv: Level, n: int) -> Level:
    """The same level at ``n`` sequences / rows per call (the crossover sweep)."""
    out = copy.copy(lv)
    out.n = n
    return out
