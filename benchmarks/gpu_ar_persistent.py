"""The GPU session's check of the persistent AR step (``benchmarks.gpu_measure`` section ``ar_step``, part 4):
``ar_block_stack_decode(schedule="persistent")`` -- one launch with grid barriers, never run before -- against the
phased schedule on ``fractalar_in64``'s level 1 (width 512, 8 blocks, random fp16 weights, fp32 cache) at 2 and 16
rows, one step at position ``seq_len // 2`` (its cache filled by phased steps).

A barrier that is never reached hangs the launch, so the step runs in a child process
(``python -m benchmarks.gpu_ar_persistent --child``) under :func:`benchmarks.gpu_pixel_head.run_child`: killed
5 s into a wait on the GPU ("hung") or at its timeout. The child prints JSON lines: stages, then per row count
``persistent_s`` / ``phases_s`` (CUDA-event medians) and the max abs difference of the outputs and of the cache
slot. Nothing is installed: a human reads the figures (``docs/first-gpu-run.md``) and writes the
``ar_step_persistent`` overlay entry if they hold.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

ROWS = (2, 16)
REPEATS = 30


def level(config: str, index: int, device: torch.device):
    """Level ``index`` of ``config`` built alone, with the constructor arguments ``FractalGen`` gives it."""
    from fractal_models.ar import AR
    from fractal_models.configs import config_kwargs
    k = config_kwargs(config)
    sizes = k["img_size_list"]
    m = AR(seq_len=(sizes[index] // sizes[index + 1]) ** 2, patch_size=sizes[index + 1],
           cond_embed_dim=k["embed_dim_list"][index - 1] if index > 0 else k["embed_dim_list"][0],
           embed_dim=k["embed_dim_list"][index], num_blocks=k["num_blocks_list"][index],
           num_heads=k["num_heads_list"][index])
    for b in m.blocks:
        b.attention.backend = "auto"  # generate's default backend
    return m.to(device).eval()


def child_command(until: float, rows: Sequence[int] = ROWS) -> List[str]:
    return [sys.executable, "-m", "benchmarks.gpu_ar_persistent", "--child", "--until", f"{until:.1f}",
            "--rows", ",".join(map(str, rows))]


def _child(until: float, rows_list: Sequence[int]) -> int:
    say = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
    if not torch.cuda.is_available():
        say(stage="no GPU")
        return 2
    from fractal_kernels import ar_block_stack_decode, ar_stack_cache, pack_ar_stack
    from .harness import median_time
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = level("fractalar_in64", 1, dev)
    stack = pack_ar_stack(m.blocks, m.norm, torch.float16)
    freqs = m.freqs_cis_on(dev)
    pos = m.seq_len // 2
    say(stage="ready")
    for rows in rows_list:
        if until - time.time() < 2:
            say(result={"rows": rows, "status": "skipped: budget"})
            continue
        xs = torch.randn(pos + 1, rows, m.config.dim, device=dev)
        cache = ar_stack_cache(stack, rows, m.seq_len, dev)
        run = lambda sched: ar_block_stack_decode(xs[pos], stack, cache, pos, freqs, m.config.n_head,  # noqa: E731
                                                  backend="triton", schedule=sched)
        say(stage="phases", B=rows)
        for p in range(pos):
            ar_block_stack_decode(xs[p], stack, cache, p, freqs, m.config.n_head, backend="triton", schedule="phases")
        ref = run("phases").float()
        slot = cache[:, :, :, pos].float().clone()
        torch.cuda.synchronize()
        say(stage="persistent launch", B=rows)
        got = run("persistent")
        say(stage="persistent wait", B=rows)
        torch.cuda.synchronize()
        diff = float((got.float() - ref).abs().max())
        slot_diff = float((cache[:, :, :, pos].float() - slot).abs().max())
        say(stage="persistent timing", B=rows)
        pers = median_time(lambda: run("persistent"), dev, warmup=2, repeats=REPEATS)
        say(stage="phases timing", B=rows)
        ph = median_time(lambda: run("phases"), dev, warmup=2, repeats=REPEATS)
        say(result={"rows": rows, "persistent_s": pers, "phases_s": ph, "max_abs_diff": diff,
                    "cache_slot_max_abs_diff": slot_diff})
    say(stage="done")
    return 0


def measure(gpu: bool, left_s: float) -> Dict[str, Any]:
    """Part 4 of ``ar_step``: the child's record (status, stage, per row count), or why it did not run."""
    if not gpu:
        return {"status": "skipped: no GPU"}
    if left_s < 12:
        return {"status": "skipped: budget"}
    from .gpu_pixel_head import run_child
    timeout = min(25.0, left_s - 2)
    rec = run_child(child_command(time.time() + timeout - 3), timeout)
    rec["by_rows"] = rec.pop("by_batch")
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_ar_persistent", description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help="run the measurement (the parent runs it under a watchdog)")
    p.add_argument("--until", type=float, default=time.time() + 20)
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    a = p.parse_args(argv)
    if not a.child:
        print(json.dumps(measure(torch.cuda.is_available(), 30.0), indent=1))
        return 0
    return _child(a.until, [int(r) for r in a.rows.split(",")])


if __name__ == "__main__":
    sys.exit(main())
