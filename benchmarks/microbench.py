"""~30 s of microbenchmarks that check the cost model's constants (``shared/PERFORMANCE.md``) on a GPU.

    python -m benchmarks.microbench --json microbench.json          # on a GPU (about 30 s)
    python -m benchmarks.microbench --dry-run --json mb.json        # CPU: the same code on tiny sizes, no timings

Measured, each beside the constant it checks:

* one CTA streaming a buffer with 1 / 2 / 4 tiles of 4 KB in flight (independent loads per loop trip,
  ``num_stages=1``), from HBM (a buffer past the L2) and L2-resident (a small buffer read before): bytes/s,
  and the round-trip latency that Little's law implies (bytes in flight / throughput) vs 0.6 / 0.3 us;
* a grid of one CTA per SM streaming a large buffer (HBM) and a small one again and again (L2): TB/s vs 3.0 /
  5.5 TB/s;
* launch cost: an eager PyTorch op, a bare Triton launch, a node of a replayed CUDA graph (host time per
  launch of back-to-back launches) vs 5 / 3 / 2 us.

On a CPU (``--dry-run``) the kernels run in the Triton interpreter on tiny buffers and their sums are checked
against torch; every timing is recorded as ``"skipped: no GPU"`` (nothing is made up).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .harness import median_time  # noqa: E402

#: the constants of shared/PERFORMANCE.md this checks (H100 SXM column)
CONSTANTS = {"hbm_latency_us": 0.6, "l2_latency_us": 0.3, "hbm_tb_s": 3.0, "l2_tb_s": 5.5,
             "launch_eager_us": 5.0, "launch_triton_us": 3.0, "launch_graph_node_us": 2.0}
BLOCK = 1024          # fp32 elements per tile: 4 KB
SKIPPED = "skipped: no GPU"


@triton.jit
def _stream_kernel(x_ptr, out_ptr, n_chunks, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """CTA ``pid`` sums chunks ``pid*TILES + k*nprog*TILES + j`` (j < TILES): TILES independent loads per trip."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(pid * TILES, n_chunks, nprog * TILES):
        for j in tl.static_range(TILES):
            idx = (i + j) * BLOCK + offs  # < 2^31 elements: buffers up to 8 GB of fp32
            acc += tl.load(x_ptr + idx, mask=idx < n_chunks * BLOCK, other=0.0)
    tl.store(out_ptr + pid * BLOCK + offs, acc)


@triton.jit
def _tiny_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


def stream(x: torch.Tensor, ctas: int, tiles: int) -> torch.Tensor:
    n_chunks = x.numel() // BLOCK
    out = torch.empty(ctas, BLOCK, device=x.device, dtype=torch.float32)
    _stream_kernel[(ctas,)](x, out, n_chunks, BLOCK=BLOCK, TILES=tiles, num_warps=4, num_stages=1)
    return out


def _time_gpu(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of ``fn`` between CUDA events, after one warm-up call."""
    return median_time(fn, torch.device("cuda"), warmup=1, repeats=repeats)


def _host_per_launch(launch: Callable[[], Any], n: int) -> float:
    """Microseconds of host time per launch over ``n`` back-to-back launches (the queue never drains)."""
    launch()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        launch()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def one_cta(gpu: bool, device: torch.device) -> List[Dict[str, Any]]:
    rows = []
    sizes = {"hbm": 256 << 20, "l2": 8 << 20} if gpu else {"hbm": 64 << 10, "l2": 16 << 10}
    for where, nbytes in sizes.items():
        x = torch.rand(nbytes // 4, device=device)
        for tiles in (1, 2, 4):
            out = stream(x, 1, tiles)
            ok = torch.allclose(out.sum().double().cpu(), x.sum().double().cpu(), rtol=1e-4)
            row = {"test": "one CTA stream", "from": where, "MB": nbytes / 2**20, "tiles_in_flight": tiles,
                   "bytes_in_flight": tiles * BLOCK * 4, "sum_ok": bool(ok)}
            if gpu:
                if where == "l2":
                    stream(x, 132, 4)  # make it resident
                s = _time_gpu(lambda: stream(x, 1, tiles))
                gbs = nbytes / s / 1e9
                lat = row["bytes_in_flight"] / (nbytes / s) * 1e6
                row.update(seconds=s, GB_s=round(gbs, 2), implied_latency_us=round(lat, 3),
                           constant_latency_us=CONSTANTS[f"{where}_latency_us"])
            else:
                row["seconds"] = SKIPPED
            rows.append(row)
    return rows


def all_sms(gpu: bool, device: torch.device, sms: int) -> List[Dict[str, Any]]:
    rows = []
    sizes = {"hbm": 1 << 30, "l2": 16 << 20} if gpu else {"hbm": 256 << 10, "l2": 64 << 10}
    for where, nbytes in sizes.items():
        x = torch.rand(nbytes // 4, device=device)
        for tiles in (1, 4):
            out = stream(x, sms, tiles)
            ok = torch.allclose(out.sum().double().cpu(), x.sum().double().cpu(), rtol=1e-4)
            row = {"test": f"{sms}-CTA stream", "from": where, "MB": nbytes / 2**20, "tiles_in_flight": tiles,
                   "sum_ok": bool(ok)}
            if gpu:
                if where == "l2":
                    reps = 20
                    s = _time_gpu(lambda: [stream(x, sms, tiles) for _ in range(reps)]) / reps
                else:
                    s = _time_gpu(lambda: stream(x, sms, tiles))
                row.update(seconds=s, TB_s=round(nbytes / s / 1e12, 3), constant_TB_s=CONSTANTS[f"{where}_tb_s"])
            else:
                row["seconds"] = SKIPPED
            rows.append(row)
    return rows


def launches(gpu: bool, device: torch.device, n: int = 2000) -> List[Dict[str, Any]]:
    y = torch.zeros(1, device=device)
    _tiny_kernel[(1,)](y)  # compiles (GPU) / interprets (CPU) once: the code path of every row below
    if not gpu:
        return [{"test": f"launch {k}", "us_per_launch": SKIPPED, "ran_once": float(y.item()) == 1.0}
                for k in ("eager op", "bare Triton", "CUDA-graph node")]
    rows = [{"test": "launch eager op", "us_per_launch": round(_host_per_launch(lambda: y.add_(1.0), n), 3),
             "constant_us": CONSTANTS["launch_eager_us"]},
            {"test": "launch bare Triton", "us_per_launch": round(_host_per_launch(lambda: _tiny_kernel[(1,)](y), n), 3),
             "constant_us": CONSTANTS["launch_triton_us"]}]
    nodes = 200
    graph = torch.cuda.CUDAGraph()
    stream_ = torch.cuda.Stream()
    with torch.cuda.stream(stream_):
        _tiny_kernel[(1,)](y)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream_):
            for _ in range(nodes):
                _tiny_kernel[(1,)](y)
    replays = 20
    s = _time_gpu(lambda: [graph.replay() for _ in range(replays)])
    rows.append({"test": "launch CUDA-graph node", "us_per_launch": round(s / (replays * nodes) * 1e6, 3),
                 "constant_us": CONSTANTS["launch_graph_node_us"], "note": "GPU time per node of a replayed graph"})
    return rows


def run(dry_run: bool) -> Dict[str, Any]:
    gpu = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if gpu else "cpu")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if gpu else 4
    t0 = time.perf_counter()
    doc: Dict[str, Any] = {"device": torch.cuda.get_device_name() if gpu else "cpu (dry run: interpreter)",
                           "triton": triton.__version__, "torch": torch.__version__, "constants": CONSTANTS,
                           "gpu": gpu, "rows": []}
    for part in (one_cta, lambda g, d: all_sms(g, d, sms), launches):
        doc["rows"] += part(gpu, device)
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    doc["sums_ok"] = all(r.get("sum_ok", True) and r.get("ran_once", True) for r in doc["rows"])
    return doc


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.microbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny sizes through the interpreter, no timings")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    doc = run(args.dry_run or not torch.cuda.is_available())
    for r in doc["rows"]:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if doc["sums_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
