"""The GPU session's AR decode-step measurement (``benchmarks.gpu_measure`` section ``ar_step``; issue #28 item 7).

``fractalar_in64``'s level 1 built alone (width 512, 8 blocks, 8 heads, 16 positions, random weights: the same
shapes as in the full model, without building its 432M parameters), rows = 2 (batch 1 with CFG; part 3: more
rows), fp16 autocast and the default backend ("auto": the decode kernel per block), as ``generate`` samples on a GPU:

1. one decode step at position ``seq_len // 2`` (its cache filled by the steps before it, the same random inputs on
   every path): op by op eager (``engine.ar._blocks_step``), op by op replayed from its CUDA graph
   (``engine.graphs``, ``step_graphs``; includes the copy into the static input), the fused stack
   (``ar_block_stack_decode``, ``schedule="tiles"``), the phased step (``schedule="phases"``: the step split over
   the grid, a launch per phase), and the step with its linears as ``skinny_linear``
   launches, eager and graphed; CUDA-event medians; each output's max abs diff vs eager;
   the host time per capture (warm-up + capture + first replay);
2. one whole level call (``engine.ar.sample``, 16 steps, a stub next level): eager vs step graphs;
3. the same one-step timings at more rows (:data:`MORE_ROWS`: 64 and 2048, fused vs op by op per level at N in
   {2, 64, 2048}; no graphs there): eager, the skinny-linear step, the fused stack and the phased step, each max
   abs diff vs eager; ``by_rows`` lists every row count, rows 2 with the figures of part 1. A few hundred ms a row
   count on a GPU (an estimate, nothing measured), plus any compile the prewarm did not cover;
4. ``persistent``: the step in one launch with grid barriers against the phased one, in a watched child process
   (:mod:`benchmarks.gpu_ar_persistent`: a barrier never reached would hang the launch).

Capped at :data:`CAP_S` seconds (and the measure budget): a part that would start past it is recorded
``"skipped: budget"``. On a CPU (dry run): ``tiny_ar``'s level 1, the graphs replaced by the CPU recorder, the
fused stack on ``backend="torch"``, rows :data:`DRY_MORE_ROWS`; timings ``"skipped: no GPU"``.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

from .gpu_ar_persistent import level as _level, measure as _persistent

CAP_S = 36.0      # of the measure phase's ~95 s: the sections after this one keep the rest
STEP_REPEATS = 50  # one step is ~0.1-1 ms: 50 CUDA-event timings cost well under a second
CALL_REPEATS = 10
MORE_ROWS = (64, 2048)    # part 3 on a GPU (batch 32 / 1024 with CFG)
DRY_MORE_ROWS = (4, 8)    # and on the CPU dry run (tiny_ar)
ROWS_REPEATS = 20         # a step at 2048 rows is milliseconds, not tenths
ROW_KEYS = ("eager_s", "skinny_s", "fused_s", "phases_s", "skinny_max_abs_diff", "fused_max_abs_diff",
            "phases_max_abs_diff")


def ar_step(c) -> Dict[str, Any]:
    """The section (``c``: ``gpu_measure.Ctx``); see the module docstring."""
    from fractal_kernels import ar_block_stack_decode, ar_stack_cache
    from fractal_models.engine import ar as engine_ar
    from fractal_models.engine import graphs
    from fractal_models.layers import use_kernel
    stop = time.perf_counter() + min(CAP_S, c.left() - 5)
    left = lambda: stop - time.perf_counter()  # noqa: E731
    config = "fractalar_in64" if c.gpu else "tiny_ar"
    dev = c.device
    torch.manual_seed(0)
    m = _level(config, 1, dev)
    rows, pos, E = 2, m.seq_len // 2, m.config.dim
    freqs = m.freqs_cis_on(dev)
    hs = torch.randn(pos + 1, rows, 1, E, device=dev)  # the inputs of steps 0..pos, the same on every path
    out: Dict[str, Any] = {"config": config, "level": 1, "width": E, "blocks": len(m.blocks), "rows": rows,
                           "position": pos, "seq_len": m.seq_len, "precision": "fp16 autocast" if c.gpu else "fp32",
                           "path": "kernel" if use_kernel(m.blocks[0].attention.backend, dev) else "torch"}
    step = engine_ar._blocks_step
    amp = torch.autocast(dev.type, dtype=torch.float16) if c.gpu else torch.autocast(dev.type, enabled=False)
    off_cuda, threads = graphs._OFF_CUDA, torch.get_num_threads()
    if not c.gpu:
        graphs._OFF_CUDA = graphs._Recorder  # the dry run drives the same plumbing without CUDA graphs
        torch.set_num_threads(1)  # tiny CPU ops: threads only contend on a shared machine
    try:
        with torch.no_grad(), amp:
            m.setup_caches(rows, m.seq_len, device=dev, freqs_cis=freqs)
            for p in range(pos + 1):
                ref = step(m, hs[p], p, freqs)
            ref = ref.float().clone()
            out["eager_s"] = c.time(lambda: step(m, hs[pos], pos, freqs), repeats=STEP_REPEATS, warmup=3)
            m.clear_caches()

            # the same step with the linears as skinny_linear launches (what dispatch picks at 2 rows on a GPU),
            # eager and replayed from its graphs; on the dry run through skinny_linear's torch backend
            sk_step = engine_ar._blocks_step_skinny_linears if c.gpu else (
                lambda mm, h, p, f: engine_ar._blocks_step(mm, h, p, f, "torch"))
            if left() > 10:
                m.setup_caches(rows, m.seq_len, device=dev, freqs_cis=freqs)
                for p in range(pos + 1):
                    got = sk_step(m, hs[p], p, freqs)
                out["skinny_max_abs_diff"] = float((got.float() - ref).abs().max())
                out["skinny_s"] = c.time(lambda: sk_step(m, hs[pos], pos, freqs), repeats=STEP_REPEATS, warmup=3)
                m.clear_caches()
                runner = graphs.begin(m, rows, dev, freqs, sk_step, enabled=True)
                for p in range(pos + 1):
                    got = runner.step(hs[p], p)
                out["skinny_graph_max_abs_diff"] = float((got.float() - ref).abs().max())
                out["skinny_graph_s"] = c.time(lambda: runner.step(hs[pos], pos), repeats=STEP_REPEATS, warmup=3)
                m.clear_caches()
                m.release_step_graphs()
            else:
                out["skinny_s"] = out["skinny_graph_s"] = "skipped: budget"
            out["call_linears"] = engine_ar.explain_skinny_step(m, dev, rows=rows)[1]

            if left() > 5:
                runner = graphs.begin(m, rows, dev, freqs, step, enabled=True)
                t0 = time.perf_counter()
                for p in range(pos + 1):
                    got = runner.step(hs[p], p)
                if c.gpu:
                    torch.cuda.synchronize(dev)
                out["capture_host_s_per_position"] = round((time.perf_counter() - t0) / (pos + 1), 4)
                out["graph_max_abs_diff"] = float((got.float() - ref).abs().max())
                out["graph_s"] = c.time(lambda: runner.step(hs[pos], pos), repeats=STEP_REPEATS, warmup=3)
                out["graph_info"] = {k: v for k, v in graphs.info(m).items() if k in ("captures", "failed")}
                m.clear_caches()
            else:
                out["graph_s"] = "skipped: budget"

            if left() > 10:  # the fused stack's first call may compile (the prewarm may not have)
                stack = engine_ar._packed_stack(m, dev)
                cache = ar_stack_cache(stack, rows, m.seq_len, dev)
                backend = "triton" if c.gpu else "torch"
                for sched in ("tiles", "phases"):  # the one-program-per-tile stack, then the step over the grid
                    key = "fused" if sched == "tiles" else "phases"
                    if left() <= 8:
                        out[f"{key}_s"] = "skipped: budget"
                        continue
                    fused = lambda p: ar_block_stack_decode(  # noqa: E731
                        hs[p][:, 0], stack, cache, p, freqs, m.config.n_head, backend=backend,
                        schedule=sched if c.gpu else None)
                    for p in range(pos + 1):
                        got = fused(p)
                    out[f"{key}_max_abs_diff"] = float((got.float() - ref).abs().max())
                    out[f"{key}_s"] = c.time(lambda: fused(pos), repeats=STEP_REPEATS, warmup=3)
            else:
                out["fused_s"] = out["phases_s"] = "skipped: budget"

            cond = [torch.randn(rows, m.cond_emb.in_features, device=dev)]
            stub_patch = torch.zeros(rows // 2, 3 * m.patch_size ** 2, device=dev)
            stub = lambda cond_list, cfg, temperature, filter_threshold: stub_patch  # noqa: E731
            for name, flag in (("call_eager_s", False), ("call_graphs_s", True)):
                if left() > 3:
                    out[name] = c.time(lambda: engine_ar.sample(m, cond, 2.0, "linear", 1.0, 1e-4, stub,
                                                                step_graphs=flag), repeats=CALL_REPEATS, warmup=1)
                else:
                    out[name] = "skipped: budget"

            out["by_rows"] = [{"rows": rows, **{k: out[k] for k in ROW_KEYS if k in out}}]  # part 1's figures
            for n in (MORE_ROWS if c.gpu else DRY_MORE_ROWS):
                out["by_rows"].append(_step_at(c, m, n, pos, freqs, sk_step, left) if left() > 8
                                      else {"rows": n, "status": "skipped: budget"})
        # part 4: the persistent step (grid barriers, never run) in a watched child process
        out["persistent"] = _persistent(c.gpu, left())
    finally:
        graphs._OFF_CUDA = off_cuda
        torch.set_num_threads(threads)
        m.release_step_graphs()
    for r in out.get("by_rows", ()):
        _ratios(r, (("eager_s", "fused_s"), ("eager_s", "skinny_s"), ("eager_s", "phases_s")))
    _ratios(out, (("eager_s", "graph_s"), ("eager_s", "fused_s"), ("eager_s", "skinny_s"), ("eager_s", "skinny_graph_s"),
                 ("call_eager_s", "call_graphs_s")))
    return out


def _ratios(d: Dict[str, Any], pairs) -> None:
    for a, b in pairs:
        x, y = d.get(a), d.get(b)
        if isinstance(x, float) and isinstance(y, float) and y > 0:
            d[f"{a[:-2]}_over_{b[:-2]}"] = round(x / y, 3)


def _step_at(c, m, rows: int, pos: int, freqs, sk_step, left) -> Dict[str, Any]:
    """Part 3 at ``rows`` rows (inside the section's autocast / no_grad): each path's caches filled by the steps
    before ``pos`` from the same random inputs, then the step at ``pos`` timed; max abs diffs vs eager."""
    from fractal_kernels import ar_block_stack_decode, ar_stack_cache
    from fractal_models.engine import ar as engine_ar
    dev = c.device
    hs = torch.randn(pos + 1, rows, 1, m.config.dim, generator=torch.Generator().manual_seed(rows)).to(dev)
    row: Dict[str, Any] = {"rows": rows}

    def run(name, fn):  # fn(p) -> [rows, E]
        for p in range(pos + 1):
            got = fn(p)
        got = got.float().clone()
        row[f"{name}_s"] = c.time(lambda: fn(pos), repeats=ROWS_REPEATS, warmup=2)
        return got

    m.setup_caches(rows, m.seq_len, device=dev, freqs_cis=freqs)
    ref = run("eager", lambda p: engine_ar._blocks_step(m, hs[p], p, freqs))
    m.clear_caches()
    if left() > 5:
        m.setup_caches(rows, m.seq_len, device=dev, freqs_cis=freqs)
        row["skinny_max_abs_diff"] = float((run("skinny", lambda p: sk_step(m, hs[p], p, freqs)) - ref).abs().max())
        m.clear_caches()
    else:
        row["skinny_s"] = "skipped: budget"
    if left() > 5:
        stack = engine_ar._packed_stack(m, dev)
        cache = ar_stack_cache(stack, rows, m.seq_len, dev)
        backend = "triton" if c.gpu else "torch"
        for sched in ("tiles", "phases"):
            key = "fused" if sched == "tiles" else "phases"
            if left() <= 5:
                row[f"{key}_s"] = "skipped: budget"
                continue
            got = run(key, lambda p: ar_block_stack_decode(hs[p][:, 0], stack, cache, p, freqs, m.config.n_head,
                                                           backend=backend, schedule=sched if c.gpu else None))
            row[f"{key}_max_abs_diff"] = float((got - ref).abs().max())
        del cache
    else:
        row["fused_s"] = row["phases_s"] = "skipped: budget"
    return row
