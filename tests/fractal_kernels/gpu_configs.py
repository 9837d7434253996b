"""GPU launch configurations under test (issue #27, item 1): what the AOT capture list compiles for sm_90 and
sm_80, reduced to the fields that define a kernel's code path, and a recorder of what a test actually launched.

The launchers pick an interpreter-speed configuration for CPU tensors under the interpreter (whole-width chunks,
16-key chunks, a few programs), so by default the interpreter tests never run a GPU's chunk loops. The
``test_*_gpu_configs.py`` tests ask each op's config function for the sm_90 / sm_80 configuration
(``arch=..., interpret=False``), narrow the widths so the interpreter runs them in seconds while every chunk
loop keeps >= 2 trips, and launch it. :func:`aot_code_paths` replays ``benchmarks.aot``'s cases (their own
process: the capture needs Triton without the interpreter) and :func:`code_path` reduces a launch to the
fields compared, :data:`CODE_PATH`:

* the constexprs that set loop trip counts, tile shapes and masking (chunk / tile / block sizes, ``EVEN``,
  ``GUIDED``);
* the weight dtype (the pointer type of the weight argument);
* not the widths themselves (``D``, ``H``, ``HID`` ...: narrowed for the interpreter), not ``DOT16`` (a GPU's
  tensor-core dot, 1, runs as the interpreter's emulation, 2: bf16 ``tl.dot`` is wrong in the interpreter),
  not ``num_warps`` / ``num_stages`` / ``maxnreg`` (the interpreter ignores them; the tests check the launch
  still carried the config's GPU values) and not the grid (the tests lower the persistent cap and assert that
  a program runs >= 2 items).

What the interpreter cannot run stays for a GPU: tensor-core dots (``DOT16=1``), warps, barriers, pipelining.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

REPO = pathlib.Path(__file__).resolve().parents[2]
ARCHS = (90, 80)

#: per kernel: (the weight argument whose dtype is part of the code path, the constexprs that are)
CODE_PATH: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "_mar_stack_kernel": ("qkv_w", ("LP", "NC", "KC", "DC", "EVEN")),
    "_ar_stack_decode_kernel": ("wqkv", ("BM", "KC", "NC", "KB", "EVEN")),
    "_ar_step_phased_kernel": ("wqkv", ("BR", "BN", "BK", "KB", "ROUND", "BARRIER")),
    "_pixel_head_kernel": ("qkv_w", ("GUIDED", "BLOCK_B", "KC", "NC", "HC", "BK")),
    "_pixel_head_phased_kernel": ("qkv_w", ("GUIDED", "BR", "BN", "KC", "KCQ", "BP", "BARRIER")),
    "_attn_fwd_kernel": ("q_ptr", ("CAUSAL", "DECODE", "ROPE", "HAS_LENS", "DROPOUT", "GROUPS", "LPQ", "LPK",
                                   "BLOCK_M", "BLOCK_N", "BLOCK_D", "PREC")),
    "_attn_bwd_packed_kernel": ("q_ptr", ("CAUSAL", "HAS_LENS", "DROPOUT", "GROUPS", "LP", "BLOCK", "BLOCK_D",
                                          "PREC")),
    "_attn_bwd_dkdv_kernel": ("q_ptr", ("CAUSAL", "HAS_LENS", "DROPOUT", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PREC")),
    "_attn_bwd_dq_kernel": ("q_ptr", ("CAUSAL", "HAS_LENS", "DROPOUT", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PREC")),
    "_sample_logits_kernel": ("cond_ptr", ("HAS_UNCOND", "CFG_PER_ROW", "HAS_UNIFORMS", "WRITE_PROBS", "DO_TOP_K",
                                           "DO_TOP_P", "GREEDY", "BLOCK_N", "BLOCK_V")),
    "_ce_rows_kernel": ("logits_ptr", ("WRITE_GRAD", "ROW_SCALE", "BLOCK_N", "BLOCK_V")),
    "_skinny_linear_kernel": ("w_ptr", ("BM", "BN", "BK", "NORM", "GATE", "BIAS", "RES", "ROUND", "EVEN_K",
                                        "KV")),
    "_fused_linear_kernel": ("w_ptr", ("BM", "BN", "BK", "GROUP_M", "NORM", "BIAS", "ACT", "RES", "EVEN_K")),
}
#: the benchmarks.aot case groups of those kernels
GROUPS = ("mar_stack", "ar_stack", "pixel_head", "attention", "decode", "sampler", "ce", "skinny_linear", "fused_linear")

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def code_path(kernel: str, wdtype: str, constexprs: Dict[str, Any]) -> Tuple:
    """The fields of :data:`CODE_PATH` of one launch: ``(wdtype, (name, value), ...)``."""
    _, names = CODE_PATH[kernel]
    return (wdtype,) + tuple((n, constexprs[n]) for n in names)


_CAPTURE = r"""
import json, sys
from benchmarks import aot
groups = set(sys.argv[1].split(","))
labels = {c.label for c in aot.cases() if c.group in groups}
rows = aot.capture([int(a) for a in sys.argv[2].split(",")], labels)
print(json.dumps([{k: r.get(k) for k in ("case", "arch", "kernel", "signature", "constexpr_values", "options",
                                          "capture_error")} for r in rows]))
"""


@functools.lru_cache(maxsize=None)
def _captured() -> Tuple[Dict[str, Any], ...]:
    """``benchmarks.aot.capture`` of :data:`GROUPS`' cases on :data:`ARCHS`, in a child process without
    ``TRITON_INTERPRET`` (~15-30 s; once per session)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _CAPTURE, ",".join(GROUPS), ",".join(map(str, ARCHS))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"AOT capture failed:\n{done.stderr[-4000:]}"
    rows = tuple(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in rows:
        assert r["kernel"] is not None, f"AOT capture of {r['case']} on sm_{r['arch']}: {r['capture_error']}"
    return rows


def aot_kernels() -> set:
    """Every kernel the AOT cases launch."""
    return {r["kernel"] for r in _captured()}


def aot_code_paths() -> Dict[str, Dict[Tuple[int, str], Tuple]]:
    """``{kernel: {(arch, case label): code_path}}`` of every launch of :data:`GROUPS`' AOT cases on
    :data:`ARCHS`, for the kernels of :data:`CODE_PATH`."""
    out: Dict[str, Dict[Tuple[int, str], Tuple]] = {}
    for r in _captured():
        if r["kernel"] not in CODE_PATH:
            continue
        wname, _ = CODE_PATH[r["kernel"]]
        wdtype = _DTYPES[r["signature"][wname].lstrip("*")]
        out.setdefault(r["kernel"], {})[(r["arch"], r["case"])] = code_path(r["kernel"], wdtype,
                                                                            r["constexpr_values"])
    return out


class Launch(dict):
    """One recorded launch: ``grid``, ``kwargs`` (constexprs and launch options) and ``args`` by name."""


@contextlib.contextmanager
def recording(kernel, before: Optional[Callable[[Launch], None]] = None) -> Iterator[List[Launch]]:
    """Record every launch of the Triton kernel ``kernel`` (interpreted or compiled) inside the block; the launch
    still runs, after ``before(launch)`` if given. ``kernel[grid](...)`` calls ``kernel.run(..., grid=,
    warmup=)``, so an instance attribute intercepts it."""
    seen: List[Launch] = []
    run = kernel.run

    def record(*args, grid, warmup, **kwargs):
        seen.append(Launch(grid=tuple(grid) if isinstance(grid, (tuple, list)) else (grid,), kwargs=dict(kwargs),
                           args=dict(zip(kernel.arg_names, args))))
        if before is not None:
            before(seen[-1])
        return run(*args, grid=grid, warmup=warmup, **kwargs)

    kernel.run = record
    try:
        yield seen
    finally:
        del kernel.run


def launched_path(kernel: str, launch: Launch) -> Tuple:
    """:func:`code_path` of a recorded launch."""
    wname, _ = CODE_PATH[kernel]
    return code_path(kernel, str(launch["args"][wname].dtype).replace("torch.", ""), launch["kwargs"])


def check_gpu_options(launch: Launch, cfg) -> None:
    """The launch carried the configuration's GPU-only options (the interpreter ignores them)."""
    kw = launch["kwargs"]
    assert kw["num_warps"] == cfg.num_warps and kw.get("maxnreg") == cfg.maxnreg
    if hasattr(cfg, "num_stages"):
        assert kw["num_stages"] == cfg.num_stages


def by_path(config_fn, path_fn, *args) -> Dict[Tuple, List[Tuple[int, Any]]]:
    """The GPU configurations ``config_fn(*args, cpu, arch=a, interpret=False)`` of :data:`ARCHS`, grouped by
    ``path_fn(cfg)`` (their code path): ``{path: [(arch, cfg), ...]}``. Configurations that differ only in what
    the interpreter ignores (warps, register cap, the persistent grid's size) share a path; a test runs each path
    once."""
    import torch
    out: Dict[Tuple, List[Tuple[int, Any]]] = {}
    for arch in ARCHS:
        cfg = config_fn(*args, torch.device("cpu"), arch=arch, interpret=False)
        out.setdefault(path_fn(cfg), []).append((arch, cfg))
    return out


def missing(kernel: str, exercised: set) -> List[str]:
    """The AOT launches of ``kernel`` (both arches) whose code path is not in ``exercised``."""
    paths = aot_code_paths().get(kernel, {})
    assert paths, f"no AOT case launches {kernel}"
    return [f"sm_{arch} {case}: {p}" for (arch, case), p in sorted(paths.items()) if p not in exercised]
