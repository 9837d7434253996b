"""The GPU session's measurements (``benchmarks/gpu_session.sh``, phase ``measure``), in priority order.

    python -m benchmarks.gpu_measure --json measure.json --budget-s 150     # on a GPU
    python -m benchmarks.gpu_measure --dry-run --json measure.json          # CPU: tiny sizes, same code, no timings

(``--files-dir DIR``: where a section writes a file beside the JSON, default the JSON's folder.)

Sections (each timed with ``torch.cuda.Event``, the JSON rewritten after each, a section that would start past
the budget recorded as ``"skipped: budget"``):

1. ``crossover``: per MAR level whose stack fuses (L <= ``MAR_STACK_MAX_L``), the fused block stack
   (``mar_block_stack``, one launch) vs op-by-op (``engine.mar.blocks_eval``: the level's blocks on the kernel
   backend) at N in {2, 64, 2048} rows, 16-bit as sampling runs it; the cost model's crossover data;
2. ``attention``: ``tiny_attention_packed`` vs every SDPA backend torch offers here (and flash-attn's
   ``flash_attn_qkvpacked_func`` if installed) at the target shape (MAR L=21 D=64 H=8 bf16, N=4096);
   then ``benchmarks.attention.crossover_rows``: the Triton/SDPA crossover, written to the policy overlay;
3. ``sampler``: ``sample_logits`` Triton vs torch (V=256, 4096 rows, CFG);
4. ``ar_step`` (:mod:`benchmarks.gpu_ar_step`, at most 36 s): ``fractalar_in64``'s level 1 at batch 1 with CFG, one
   decode step op by op eager vs replayed from its CUDA graph (``step_graphs``) vs the fused stack, each checked
   against eager (max abs diff), and a whole level call eager vs step graphs; then the step eager vs skinny vs
   fused at rows 64 and 2048 too (``by_rows``: fused vs op by op at N in {2, 64, 2048});
5. ``pixel_head`` (:mod:`benchmarks.gpu_pixel_head`, at most 15 s): ``fractalar_in64``'s pixel head (fp32, cfg 3)
   at B in {1, 8, 64, 512}: ``schedule="persistent"`` first, in a child process killed if it hangs, then
   "tiles" vs "phases" (medians, ids equal, debug logits' max abs diff); a candidate dispatch overlay from the
   medians (``pixel_head_schedule_measured.json`` in ``--files-dir``, and in the section's JSON), never installed
   by the run: a human reviews it;
6. ``images_per_s``: ``fractalar_in64`` at batch 1 and ``fractalmar_large_in256`` at batch 64 (random
   weights): the reference loop (``fast=False``) vs the fast engine; one warm call, one timed;
7. ``cuda_graphs`` (last: its first call runs ``torch.compile``): ``generate(cuda_graphs=True)`` vs the same call
   without: images equal?, seconds.

On a CPU every section runs its code on tiny shapes (the fused stack with ``backend="torch"``, the reference
math of each op) so the dry run exercises it; every timing is ``"skipped: no GPU"``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from .gpu_ar_step import ar_step
from .gpu_pixel_head import pixel_head

SKIPPED = "skipped: no GPU"


class Ctx:
    def __init__(self, gpu: bool, budget_s: float, path: Optional[str], files_dir: Optional[str] = None):
        self.gpu, self.path = gpu, path
        self.files_dir = files_dir or (os.path.dirname(os.path.abspath(path)) if path else None)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.deadline = time.perf_counter() + budget_s
        self.doc: Dict[str, Any] = {"device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
                                    "torch": torch.__version__, "gpu": gpu, "budget_s": budget_s, "sections": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def time(self, fn: Callable[[], Any], repeats: int = 5, warmup: int = 1):
        """Median seconds between CUDA events (GPU) or SKIPPED after one call (CPU: the code path only)."""
        if not self.gpu:
            fn()
            return SKIPPED
        from .harness import median_time
        return median_time(fn, torch.device("cuda"), warmup=warmup, repeats=repeats)

    def save(self) -> None:
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1, default=str)
            os.replace(tmp, self.path)


def _ratio(a, b):
    return round(a / b, 3) if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def crossover(c: Ctx) -> List[Dict[str, Any]]:
    from fractal_kernels import mar_block_stack, pack_mar_stack
    from fractal_kernels.dispatch import MAR_STACK_MAX_L
    from fractal_models import build_model
    from fractal_models.engine.mar import blocks_eval
    from fractal_models.mar import MAR
    config = "fractalmar_large_in256" if c.gpu else "tiny_mar"
    ns = (2, 64, 2048) if c.gpu else (2, 3)
    dtype = torch.bfloat16 if c.gpu else torch.float32
    torch.manual_seed(0)
    model = build_model(config).to(c.device).eval().set_backend("auto")
    rows = []
    for level, m in enumerate(model.levels()[:-1]):
        if not isinstance(m, MAR):
            continue
        L = m.pos_embed_learned.shape[1]
        D = m.norm.normalized_shape[0]
        if L > MAR_STACK_MAX_L:
            rows.append({"config": config, "level": level, "L": L, "D": D, "status": f"not fusible: L > {MAR_STACK_MAX_L}"})
            continue
        heads = m.blocks[0].attn.num_heads
        with torch.no_grad():
            w = pack_mar_stack(m.blocks, m.norm, dtype)
            for n in ns:
                if c.left() < 5:
                    rows.append({"config": config, "level": level, "N": n, "status": "skipped: budget"})
                    continue
                x = torch.randn(n, L, D, device=c.device)
                xd = x.to(dtype)
                fused = c.time(lambda: mar_block_stack(xd, w, heads, backend="triton" if c.gpu else "torch"))
                with torch.autocast(c.device.type, dtype=dtype, enabled=c.gpu):
                    opby = c.time(lambda: blocks_eval(m, x))
                diff = float((mar_block_stack(xd, w, heads, backend="triton" if c.gpu else "torch").float()
                              - blocks_eval(m, x).float()).abs().max())
                rows.append({"config": config, "level": level, "L": L, "D": D, "H": heads, "depth": len(m.blocks),
                             "N": n, "dtype": str(dtype), "fused_s": fused, "op_by_op_s": opby,
                             "fused_speedup": _ratio(opby, fused), "max_abs_diff": diff})
    return rows


def cuda_graphs(c: Ctx) -> Dict[str, Any]:
    from fractal_models import build_model, generate
    config = "fractalmar_in64" if c.gpu else "tiny_mar"
    torch.manual_seed(0)
    model = build_model(config).to(c.device).eval()
    labels = torch.arange(8, device=c.device) % model.num_classes
    iters = [8, 4] if c.gpu else [2, 1]
    out: Dict[str, Any] = {"config": config, "batch": 8, "num_iter_list": iters}
    base = generate(model, labels, num_iter_list=iters, seed=0)
    out["plain_s"] = c.time(lambda: generate(model, labels, num_iter_list=iters, seed=0), repeats=3)
    if not c.gpu:
        out["graphs"] = "skipped: no GPU (cuda_graphs needs a CUDA device)"
        return out
    t0 = time.perf_counter()
    graphs = generate(model, labels, num_iter_list=iters, seed=0, cuda_graphs=True)
    out["graphs_first_call_s"] = round(time.perf_counter() - t0, 2)  # torch.compile + capture
    out["graphs_s"] = c.time(lambda: generate(model, labels, num_iter_list=iters, seed=0, cuda_graphs=True), repeats=3)
    out["images_equal"] = bool(torch.equal(base, graphs))
    out["pixels_differing"] = int((base != graphs).sum())
    out["speedup"] = _ratio(out["plain_s"], out["graphs_s"])
    return out


def attention(c: Ctx) -> Dict[str, Any]:
    import torch.nn.functional as F
    from fractal_kernels import tiny_attention_packed
    N, L, H, D = (4096, 21, 8, 64) if c.gpu else (4, 21, 2, 16)
    dtype = torch.bfloat16 if c.gpu else torch.float32
    qkv = torch.randn(N, L, 3 * H * D, device=c.device, dtype=dtype)
    q, k, v = qkv.view(N, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    out: Dict[str, Any] = {"shape": dict(N=N, L=L, H=H, D=D, dtype=str(dtype)),
                           "triton_s": c.time(lambda: tiny_attention_packed(qkv, H, backend="triton" if c.gpu else "torch"))}
    ref = F.scaled_dot_product_attention(q, k, v)
    sdpa = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            be = getattr(SDPBackend, name, None)
            if be is None:
                continue
            try:
                with sdpa_kernel([be]):
                    sdpa[name] = c.time(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as e:  # backend not available for this shape/dtype/device
                sdpa[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
    except ImportError as e:
        sdpa["error"] = str(e)
    try:
        from flash_attn import flash_attn_qkvpacked_func  # noqa: F401  (absent on the GPU image)
        fa = qkv.view(N, L, 3, H, D)
        sdpa["flash_attn package"] = c.time(lambda: flash_attn_qkvpacked_func(fa)) if c.gpu else SKIPPED
    except ImportError:
        sdpa["flash_attn package"] = "not installed"
    out["sdpa_s"] = sdpa
    timed = {k: v for k, v in sdpa.items() if isinstance(v, float)}
    if timed:
        best = min(timed, key=timed.get)
        out.update(best_sdpa=best, triton_speedup_vs_best=_ratio(timed[best], out["triton_s"]))
    mine = tiny_attention_packed(qkv, H, backend="triton" if c.gpu else "torch")
    out["max_abs_diff_vs_sdpa"] = float((mine.float().reshape(N, L, H, D).transpose(1, 2) - ref.float()).abs().max())
    if c.gpu and c.left() > 30:
        from .attention import crossover_rows
        rows = crossover_rows(c.device, repeats=5, warmup=1)  # writes the policy overlay ($FRACTAL_HOME)
        out["crossover"] = [dict(r.shape, timing=r.timing, metrics=r.metrics, check=r.check, skipped=r.skipped)
                            for r in rows]
    else:
        out["crossover"] = SKIPPED if not c.gpu else "skipped: budget"
    return out


def sampler(c: Ctx) -> Dict[str, Any]:
    from fractal_kernels import sample_logits
    n, V = (4096, 256) if c.gpu else (8, 256)
    cond = torch.randn(n, V, device=c.device)
    unc = torch.randn(n, V, device=c.device)
    res = {}
    for be in (("triton", "torch") if c.gpu else ("torch",)):
        res[f"{be}_s"] = c.time(lambda: sample_logits(cond, unc, cfg=2.0, temperature=1.0, filter_threshold=1e-4,
                                                      seed=0, backend=be))
    res["speedup"] = _ratio(res.get("torch_s"), res.get("triton_s"))
    return {"rows": n, "V": V, **res}


def images_per_s(c: Ctx) -> List[Dict[str, Any]]:
    from fractal_models import build_model, generate
    runs = ([("fractalar_in64", 1, None), ("fractalmar_large_in256", 64, [64, 16, 16])] if c.gpu
            else [("tiny_ar", 1, None), ("tiny_mar", 2, [2, 1])])
    rows = c.doc["sections"].setdefault("images_per_s", {"status": "running"}).setdefault("partial", [])
    models = {}
    # the fast engine for both configs first, then the reference loops (long: they may not fit the budget);
    # fast: one warm call (first launches) then one timed; the reference loop (torch ops): one timed call
    for fast in (True, False):
        for config, batch, iters in runs:
            if c.left() < 10:
                rows.append({"config": config, "batch": batch, "fast": fast, "status": "skipped: budget"})
                continue
            if config not in models:
                torch.manual_seed(0)
                models[config] = build_model(config).to(c.device).eval()
            model = models[config]
            labels = torch.arange(batch, device=c.device) % model.num_classes
            run = lambda: generate(model, labels, num_iter_list=iters, seed=0, fast=fast)  # noqa: E731
            s = c.time(run, repeats=1, warmup=1 if fast else 0)
            rows.append({"config": config, "batch": batch, "fast": fast, "num_iter_list": iters, "seconds": s,
                         "images_per_s": round(batch / s, 3) if isinstance(s, float) else s})
            c.save()  # a kill at the phase budget keeps the rows so far
    return list(rows)


#: priority order; cuda_graphs last: its first call runs torch.compile, the longest and least predictable step
SECTIONS = (("crossover", crossover), ("attention", attention), ("sampler", sampler), ("ar_step", ar_step),
            ("pixel_head", pixel_head), ("images_per_s", images_per_s), ("cuda_graphs", cuda_graphs))


def run(dry_run: bool, budget_s: float, path: Optional[str], only: Optional[List[str]] = None,
        files_dir: Optional[str] = None) -> Dict[str, Any]:
    gpu = torch.cuda.is_available() and not dry_run
    c = Ctx(gpu, budget_s, path, files_dir)
    for name, fn in SECTIONS:
        if only and name not in only:
            continue
        if c.left() <= 0:
            c.doc["sections"][name] = {"status": "skipped: budget"}
            continue
        t0 = time.perf_counter()
        try:
            c.doc["sections"][name] = {"status": "ok", "result": fn(c)}
        except Exception as e:  # one failing section does not cost the others
            import traceback
            c.doc["sections"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc()[-2000:]}
        c.doc["sections"][name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"gpu_measure: {name}: {c.doc['sections'][name]['status']} ({c.doc['sections'][name]['seconds']} s)",
              flush=True)
        c.save()
    c.doc["ok"] = all(s["status"] != "failed" for s in c.doc["sections"].values())
    c.save()
    return c.doc


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes through the same code, no timings")
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--only", action="append", default=None, help="run only this section (repeatable)")
    p.add_argument("--json", default=None)
    p.add_argument("--files-dir", default=None, help="where sections write other files (default: the JSON's folder)")
    args = p.parse_args(argv)
    doc = run(args.dry_run or not torch.cuda.is_available(), args.budget_s, args.json, args.only, args.files_dir)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
