"""The result document and its tables: :func:`build_document` (counts + roofline MODEL + calibration),
:func:`markdown`, :func:`plot`, the lever analysis and the timing note."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .roofline_model import (BYTES, CALIBRATION, HARDWARE, LAUNCH_COST_S, SYNC_COST_S, floors,
                             predict_s_per_image, roofline)
from .runs import SAMPLING


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}".replace(",", " ")
    if abs(x) >= 1:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _si(x: float, unit: str) -> str:
    for f, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def build_document(results: List[Dict[str, Any]], batches: Sequence[int]) -> Dict[str, Any]:
    from ..harness import machine_info
    doc: Dict[str, Any] = {"schema": "fractal-bench/launches/1", "machine": machine_info(torch.device("cpu")),
                           "sampling": SAMPLING, "batches": list(batches),
                           "assumptions": {"launch_cost_s": LAUNCH_COST_S, "sync_cost_s": SYNC_COST_S,
                                           "bytes_per_element": BYTES, "hardware": HARDWARE},
                           "configs": [], "calibration": []}
    for r in results:
        entry = {"config": r["config"], "narrow_clone": r["narrow_clone"], "wall_s": r["wall_s"], "batches": {},
                 "counted_at": r.get("commits")}
        for b in sorted(r["ref"]):
            ref, fast = r["ref"][b], r["fast"].get(b)
            model = roofline(r["config"], b, ref["num_iter_list"])
            row: Dict[str, Any] = {"ref": ref, "fast": fast, "model": model}
            if fast is not None:
                row["launch_ratio"] = ref["launches"] / max(1, fast["launches"])
                row["floors"] = {hw: {p: floors(model, p, hw) for p in ("ref", "fast")} for hw in ("H100", "A100")}
                row["predicted"] = {hw: {"ref": predict_s_per_image(model, "ref", hw, ref["launches_per_image"],
                                                                    ref["syncs_per_image"]),
                                         "fast": predict_s_per_image(model, "fast", hw, fast["launches_per_image"],
                                                                     fast["syncs_per_image"])}
                                    for hw in ("H100", "A100")}
            entry["batches"][str(b)] = row
        doc["configs"].append(entry)
    for cal in CALIBRATION:
        for entry in doc["configs"]:
            row = entry["batches"].get(str(cal["batch"]))
            if entry["config"] == cal["config"] and row is not None:
                ref = row["ref"]
                pred = predict_s_per_image(row["model"], "ref", cal["hardware"], ref["launches_per_image"],
                                           ref["syncs_per_image"])
                device_s = pred["floor_s"]
                host_per_launch = (cal["measured_s_per_image"] - device_s) / max(1.0, ref["launches_per_image"])
                doc["calibration"].append({**cal, "predicted": pred,
                                           "ratio_measured_over_predicted": cal["measured_s_per_image"] /
                                           pred["predicted_s"],
                                           "implied_host_s_per_launch": host_per_launch})
    return doc


def markdown(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    counted = sorted({c for e in doc["configs"] for c in (e.get("counted_at") or [])})
    where = f"commit `{m['commit']}`"
    if counted and counted != [m["commit"]]:
        where = f"counted at commit {', '.join(f'`{c}`' for c in counted)}, tables built at commit `{m['commit']}`"
    L = ["# Kernel launches, syncs, bytes and FLOPs per image (counted on a CPU; floors are a MODEL)", "",
         f"Counted on {m['device']} · torch {m['torch']} · triton {m['triton']} · {where} · "
         f"{m['date']}. Sampling: cfg {doc['sampling']['cfg']} (linear schedule), temperature "
         f"{doc['sampling']['temperature']}, the reference's iterations; random weights. `ref` = the reference loop "
         "(`generate(fast=False)`), `fast` = the fast engine on the kernel backend (`backend=\"triton\"`, Triton "
         "launches counted as a GPU makes them). Launches include host<->device copies; per image = per batch / "
         "batch. Counts are exact for the classification in `benchmarks/launches/classification.py`, through reductions each "
         "tested exactly in `tests/test_launches.py`: narrow clones, memoised sub-level calls, count-only kernels, "
         "every generator level counted at depths 1 and 2 and extrapolated to its depth (affine), and for the "
         "published configs batch 1 counted, larger batches derived (counts per batch do not depend on the "
         "batch).", "",
         "## Per image", "",
         "| config | batch | launches ref | launches fast | ref / fast | syncs ref | syncs fast | copies ref | "
         "copies fast | FLOPs | weight bytes ref | weight bytes fast | act. bytes ref (unfused, fp32 scores incl.) | "
         "act. bytes fast (fused) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["configs"]:
        for b, row in e["batches"].items():
            if row.get("fast") is None:
                continue
            ref, fast, t = row["ref"], row["fast"], row["model"]["totals"]
            lb = "≥ " if fast.get("lower_bound") else ""
            L.append(f"| {e['config']} | {b} | {_fmt(ref['launches_per_image'])} | {lb}{_fmt(fast['launches_per_image'])} | "
                     f"**{'≤ ' if lb else ''}{row['launch_ratio']:.1f}×** | {_fmt(ref['syncs_per_image'])} | {_fmt(fast['syncs_per_image'])} | "
                     f"{_fmt(ref['copies_per_image'])} | {_fmt(fast['copies_per_image'])} | {_si(t['ref_flops'], 'FLOP')} "
                     f"(fast {_si(t['fast_flops'], 'FLOP')}) | {_si(t['ref_weight_bytes'], 'B')} | "
                     f"{_si(t['fast_weight_bytes'], 'B')} | {_si(t['ref_act_bytes'], 'B')} | {_si(t['fast_act_bytes'], 'B')} |")
    L += ["", "## MODEL: time per image on an H100 / A100 (floor + launch term)", "",
          f"Floor = per level max(FLOPs / peak, bytes / bandwidth), summed over levels (bf16, "
          f"{BYTES} bytes per element; H100 989 TFLOP/s, 3.0 TB/s; A100 312 TFLOP/s, 2.0 TB/s). Launch term = "
          f"launches × {LAUNCH_COST_S * 1e6:.0f} µs + syncs × {SYNC_COST_S * 1e6:.0f} µs (ASSUMED host costs of an "
          "eager launch / a round trip). The reference's floor counts unfused activations (the fp32 attention scores in memory included), the fast engine's the "
          "fused floor (block inputs/outputs once).", "",
          "| config | batch | H100 floor ref | H100 floor fast | H100 launch term ref | H100 launch term fast | "
          "H100 MODEL ref | H100 MODEL fast | A100 MODEL ref | A100 MODEL fast |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["configs"]:
        for b, row in e["batches"].items():
            if row.get("fast") is None:
                continue
            h, a = row["predicted"]["H100"], row["predicted"]["A100"]
            L.append(f"| {e['config']} | {b} | {h['ref']['floor_s'] * 1e3:.3g} ms | {h['fast']['floor_s'] * 1e3:.3g} ms | "
                     f"{(h['ref']['launch_s'] + h['ref']['sync_s']) * 1e3:.3g} ms | "
                     f"{(h['fast']['launch_s'] + h['fast']['sync_s']) * 1e3:.3g} ms | "
                     f"{h['ref']['predicted_s']:.3g} s | {h['fast']['predicted_s']:.3g} s | "
                     f"{a['ref']['predicted_s']:.3g} s | {a['fast']['predicted_s']:.3g} s |")
    if doc["calibration"]:
        L += ["", "## Calibration of the MODEL against the upstream figures (reference loop)", "",
              "| figure | config | batch | hardware | measured s/image | MODEL s/image (floor + launches + syncs) | "
              "measured / MODEL | implied host time per launch |", "|---|---|---|---|---|---|---|---|"]
        for c in doc["calibration"]:
            p = c["predicted"]
            L.append(f"| {c['name']} ({c['note']}) | {c['config']} | {c['batch']} | {HARDWARE[c['hardware']]['note']} | "
                     f"{c['measured_s_per_image']} | {p['predicted_s']:.3g} (floor {p['floor_s']:.3g} + launches "
                     f"{p['launch_s']:.3g} + syncs {p['sync_s']:.3g}) | **{c['ratio_measured_over_predicted']:.2f}** | "
                     f"{c['implied_host_s_per_launch'] * 1e6:.2f} µs |")
    L += ["", "## Where the launches go (per image, per level)", ""]
    for e in doc["configs"]:
        for b, row in e["batches"].items():
            if row.get("fast") is None:
                continue
            L += [f"### {e['config']}, batch {b}", "",
                  "| level | calls / batch | launches ref | launches fast | syncs ref | syncs fast | fast: top op kinds (launches per image) |",
                  "|---|---|---|---|---|---|---|"]
            ref_l, fast_l = row["ref"]["levels"], row["fast"]["levels"]
            bb = int(b)
            for lbl in sorted(set(ref_l) | set(fast_l), key=_level_order):
                rl, fl = ref_l.get(lbl, {}), fast_l.get(lbl, {})
                kinds = ", ".join(f"{k} {_fmt(n / bb)}" for k, n in list(fl.get("kinds", {}).items())[:6])
                L.append(f"| {lbl} | {rl.get('calls', fl.get('calls', 0))} | {_fmt(rl.get('launches', 0) / bb)} | "
                         f"{_fmt(fl.get('launches', 0) / bb)} | {_fmt(rl.get('syncs', 0) / bb)} | "
                         f"{_fmt(fl.get('syncs', 0) / bb)} | {kinds} |")
            L.append("")
    return "\n".join(L) + "\n"


def _level_order(lbl: str) -> Tuple[int, str]:
    if lbl == "generate":
        return (-1, lbl)
    if lbl.startswith("L"):
        return (int(lbl[1:].split()[0]), lbl)
    return (99, lbl)


def plot(doc: Dict[str, Any], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    entries = [(e["config"], b, row) for e in doc["configs"] for b, row in e["batches"].items() if row.get("fast")]
    if not entries:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    names = [f"{c}\nB={b}" for c, b, _ in entries]
    x = range(len(entries))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], [r["ref"]["launches_per_image"] for _, _, r in entries], 0.4, label="reference loop")
    ax.bar([i + 0.2 for i in x], [r["fast"]["launches_per_image"] for _, _, r in entries], 0.4,
           label="fast engine (triton)")
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("kernel launches per image (log)")
    ax.set_title("launches per image (counted)")
    ax.legend()
    ax = axes[1]
    labels = sorted({lbl for _, _, r in entries for lbl in r["fast"]["levels"]}, key=_level_order)
    bottom = [0.0] * len(entries)
    for lbl in labels:
        vals = [100.0 * r["fast"]["levels"].get(lbl, {}).get("launches", 0) / max(1, r["fast"]["launches"])
                for _, _, r in entries]
        ax.bar(list(x), vals, 0.6, bottom=bottom, label=lbl)
        bottom = [a + v for a, v in zip(bottom, vals)]
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of the fast engine's launches (%)")
    ax.set_title("fast engine: where the launches go, by level")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path



# Launches per transformer block in one fast-engine step, read off the code (fractal_models/engine/mar.py _block_fast on a
# kernel backend: norm1, qkv, packed attention, proj, add, norm2, fc1, gelu, fc2, add; engine/ar.py sample: rms_norm,
# wqkv, cache copy, decode kernel, wo, add, rms_norm, w1, silu, w3, mul, w2, add). Used only by the lever analysis.
BLOCK_LAUNCHES = {"MAR": 10, "AR": 13}


def timing_note(doc: Dict[str, Any]) -> str:
    run = doc.get("run", {})
    la = lambda v: "n/a" if not v else ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    head = ""
    if run.get("wall_s") is not None and not run.get("build_only"):
        head = (f"Full run: {run['wall_s']:.0f} s wall counting ({run.get('workers', 1)} worker process(es), one "
                f"intra-op thread each), {run['total_wall_s']:.0f} s end to end including the tables; load average "
                f"(1, 5, 15 min) {la(run.get('loadavg_before'))} before, {la(run.get('loadavg_after'))} after "
                "(the machine is shared). ")
    return (f"\n{head}Sum over the counted pieces: {doc['wall_s']:.0f} s wall, {doc['cpu_s']:.0f} s CPU.\n")


def lever_analysis(doc: Dict[str, Any], batch: str = "1") -> List[str]:
    """Item 4 of the issue, as analysis: what each lever would leave, from the counted per-level tables. The
    launches of one block in one step are counted too: a depth-extrapolated level's depth-2 minus depth-1 count
    over its steps (``BLOCK_LAUNCHES``, read off the code, where a level was counted at one depth only)."""
    from fractal_models import config_kwargs
    lines = ["## Which levers cut the fast engine's launches most (analysis of the counted tables, batch "
             f"{batch})", "",
             "Per level: launches per step of one call = launches / (calls × steps); launches per block and step "
             "= (count at depth 2 - count at depth 1) / (calls × steps), counted (the code has "
             f"{BLOCK_LAUNCHES['MAR']} per MAR block: norm1, qkv, attention, proj, add, norm2, fc1, gelu, fc2, add; "
             f"{BLOCK_LAUNCHES['AR']} per AR block step: rms_norm, wqkv, cache copy, decode attention, wo, add, "
             "rms_norm, w1, silu, w3, mul, w2, add); a level whose blocks already run as one fused block-stack "
             "launch per step (fused_stack=True, or policy.BLOCK_STACK_MAX_WIDTH) counts 0 per block: its stack launch is in "
             "the glue; the rest is per-step glue (embedding, mask/where, gathers, scatter, the final norm). "
             "Scenarios, from today's engine: **A** the wide levels' blocks one fused launch per block too; **B** "
             "one launch per level step (all blocks and the glue of a step in one persistent kernel); **C** = B "
             "plus the pixel heads' value lookup folded into the pixel-head kernel (done: today's pixel heads are "
             "one launch per call, so C = B).", "",
             "| config | level | calls × steps / batch | launches per step | blocks | glue per step | today | A | B | C |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for e in doc["configs"]:
        row = e["batches"].get(batch)
        if not row or not row.get("fast"):
            continue
        kw = config_kwargs(e["config"])
        iters = row["fast"]["num_iter_list"]
        b = int(batch)
        tot = {"today": 0.0, "A": 0.0, "B": 0.0, "C": 0.0}
        for lbl, v in sorted(row["fast"]["levels"].items(), key=lambda kv: _level_order(kv[0])):
            n = v["launches"]
            if lbl.startswith("L") and ("MAR" in lbl or "AR" in lbl) and "guiding" not in lbl:
                lvl = int(lbl[1:].split()[0])
                kind = "MAR" if "MAR" in lbl else "AR"
                side = kw["img_size_list"][lvl] // kw["img_size_list"][lvl + 1]
                steps = min(side * side, iters[lvl]) if kind == "MAR" else side * side
                depth = kw["num_blocks_list"][lvl]
                cs = v["calls"] * steps
                per_step = n / cs
                per_block = BLOCK_LAUNCHES[kind]
                if "at_depth_1" in v:
                    per_block = (v["at_depth_2"] - v["at_depth_1"]) / cs
                glue = per_step - depth * per_block
                # a fused stack (one launch per step for every block: per_block 0) is past A already
                a = n - cs * depth * (per_block - 1) if per_block >= 1 else n
                bb = min(n, cs * 1.0)
                cc = bb
                lines.append(f"| {e['config']} | {lbl} | {_fmt(cs / b)} | {per_step:.1f} | {depth} × "
                             f"{per_block:.4g} | {glue:.1f} | {_fmt(n / b)} | {_fmt(a / b)} | {_fmt(bb / b)} | "
                             f"{_fmt(cc / b)} |")
            else:
                a = bb = n
                cc = min(n, v["calls"]) if "pixel" in lbl else n  # kernel (+ value lookup) -> kernel
                lines.append(f"| {e['config']} | {lbl} | {_fmt(v['calls'] / b)} calls | | | | {_fmt(n / b)} | "
                             f"{_fmt(a / b)} | {_fmt(bb / b)} | {_fmt(cc / b)} |")
            tot["today"] += n
            tot["A"] += a
            tot["B"] += bb
            tot["C"] += cc
        ref = row["ref"]["launches"]
        summary.append(f"| {e['config']} | " + " | ".join(f"{_fmt(tot[k] / b)} ({ref / tot[k]:.1f}×)"
                                                            for k in ("today", "A", "B", "C"))
                       + f" | {_fmt(ref / 20 / b)} | {tot['today'] / (ref / 20):.2f}× |")
    lines += ["", f"Launches per image and ratio reference / fast at batch {batch} (target: ≥ 20× for "
              "fractalar_in64 and fractalmar_large_in256):", "",
              "| config | today | A: + wide blocks fused | B: one launch per step | C: B + fused lookup | 20× allows | "
              "today / allowed |", "|---|---|---|---|---|---|---|"]
    return lines + summary + [""]
