"""Ahead-of-time resource report and gate: what the GPU compiler makes of every Triton launch the library does.

    python -m benchmarks.aot                 # full set, sm_90a + sm_80 -> benchmarks/results/aot/full.{json,md}
    python -m benchmarks.aot --ci            # the CI subset (CI_SUBSET)             -> .../ci.{json,md}
    python -m benchmarks.aot --ci --check    # + exit 1 listing every budget violation not in KNOWN_OVER_BUDGET
    python -m benchmarks.aot --docs          # summary.md (+ docs/benchmarks.md's aot-table block) from the latest results
    python -m benchmarks.aot --list          # the captured specializations only (seconds, nothing compiled)
    fractal-bench --aot [same options]

How: the public ops (tiny_attention*, their backward through autograd, tiny_attention_decode, sample_logits,
pixel_head_sample, pixel_cross_entropy / pixel_log_probs) run with ``backend="triton"`` on CPU tensors that
report ``device == cuda``, inside ``fractal_kernels._target.target_arch(arch)``; ``JITFunction.run`` records each
launch, bound by Triton's own binder for that target, instead of running it (:mod:`benchmarks.aot_capture`).
So when a launcher changes tiles, ``num_warps`` or ``num_stages`` per arch, this report sees it. Each unique
specialization is then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
(sm_90 compiles as sm_90a: Triton appends the "a" from capability 90 on, so wgmma is available) in a fresh
``TRITON_CACHE_DIR`` (cold), with ptxas's ``-v`` report, ``metadata.shared`` and the SASS (cuobjdump in the
wheel). Budgets are :data:`BUDGETS`; limits :data:`ARCHS`.

The gate (``tests/test_aot_gate.py``) compiles :data:`CI_SUBSET`. :data:`KNOWN_OVER_BUDGET` lists, per
(kernel, case, arch), the budgets that row breaks today; the target is an empty dict. The gate fails on any
violation not listed *and* on any listed one that no longer happens (stale), so the list hides nothing.

Seeded regression (to see the gate fail): ``FRACTAL_AOT_SEED_REGRESSION=decode_num_stages_3`` makes every decode
launch ``num_stages=3``; the general form is ``KERNEL[,CONSTEXPR=VALUE...]:OPTION=INT`` (e.g.
``_attn_fwd_kernel,DECODE=True,DOT_F32=False:num_stages=4``). ``FRACTAL_AOT_IGNORE_KNOWN=1`` checks as if
KNOWN_OVER_BUDGET were empty (what the gate will do once the kernel fixes are in).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aot")
# the docs page that shows the summary table between the aot-table markers (the README is a front page now)
DOCS_PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
SCHEMA_VERSION = 1

# ---- budgets and limits: the one place they live ---------------------------------------------------------

#: what every production specialization must meet on both arches (issue 14)
BUDGETS = {
    "spill_bytes": 0,          # ptxas spill stores + loads, bytes per thread
    "compile_s": 30.0,         # cold compile (AST -> cubin) of one specialization: CPU seconds, ptxas included
    "min_ctas_per_sm_smem": {90: 2},   # shared memory must leave >= this many CTAs per SM (H100)
    "tensor_cores_16bit": True,        # a kernel with a tl.dot and 16-bit inputs must emit HMMA/HGMMA
}

#: per-arch limits for the occupancy estimate and the shared-memory check
ARCHS = {
    90: {"name": "sm_90a (H100)", "smem_sm": 228 * 1024, "smem_block": 227 * 1024, "regs_sm": 65536,
         "max_warps": 64, "max_ctas": 32},
    80: {"name": "sm_80 (A100)", "smem_sm": 164 * 1024, "smem_block": 163 * 1024, "regs_sm": 65536,
         "max_warps": 64, "max_ctas": 32},
}
SMEM_RESERVED_PER_CTA = 1024   # the driver reserves 1 KB of shared memory per block (sm_80+)
REG_ALLOC_UNIT = 256           # registers are allocated per warp in units of 256

#: Budgets each row of the CI subset breaks on today's kernels, ``"kernel | case | sm_XX": [budget names]``.
#: TARGET: EMPTY. The gate (tests/test_aot_gate.py, ``--ci --check``) fails on a violation not listed here AND
#: on a listed one that no longer happens (stale), so it hides nothing. Written from the committed CI run
#: (``python -m benchmarks.aot --print-known``). To enable the gate fully after the kernel fixes are merged:
#: run ``python -m benchmarks.aot --ci --check``; every "stale" line is a fix -> delete that entry; what is
#: left are budgets still broken (fix the kernel, do not re-add); when the dict is empty the gate is strict.
KNOWN_OVER_BUDGET: Dict[str, List[str]] = {}

#: the gate's subset: (kernel, case) pairs compiled for both arches by tests/test_aot_gate.py. One per kernel x
#: dtype class (fp32 / 16-bit) plus the decode path; every launched kernel appears (a test checks it). The
#: pixel head has its smallest (W=16) and its largest production width (W=128, the 64^2 models' head).
#: A new kernel needs a case above and an entry here (tests/test_aot_gate.py checks both).
CI_SUBSET: List[Tuple[str, str]] = [
    ("_attn_fwd_kernel", "MAR L=21 D=64 H=8 fp32"),
    ("_attn_fwd_kernel", "MAR L=21 D=64 H=8 bf16"),
    ("_attn_fwd_kernel", "decode Lmax=17 D=64 H=8 rope fp32"),
    ("_attn_fwd_kernel", "decode Lmax=257 D=64 H=16 rope bf16"),
    ("_attn_bwd_packed_kernel", "pixel L=4 D=16 H=4 causal fp32"),
    ("_attn_bwd_packed_kernel", "MAR L=21 D=64 H=8 bf16"),
    ("_attn_bwd_dkdv_kernel", "MAR L=261 D=64 H=16 fp32"),
    ("_attn_bwd_dkdv_kernel", "MAR L=261 D=64 H=16 bf16"),
    ("_attn_bwd_dq_kernel", "MAR L=261 D=64 H=16 fp32"),
    ("_attn_bwd_dq_kernel", "MAR L=261 D=64 H=16 bf16"),
    ("_pixel_head_kernel", "pixel_head W=16 H=2 depth=1 C=32 unguided uniforms"),
    ("_pixel_head_kernel", "pixel_head W=128 H=4 depth=3 C=512 guided cfg scalar"),
    ("_sample_logits_kernel", "sample_logits V=256 guided cfg scalar"),
    ("_sample_logits_kernel", "sample_logits V=256 unguided uniforms bf16"),
    ("_ce_rows_kernel", "ce_rows V=256 train (grad)"),
    ("_mar_stack_kernel", "mar_stack D=512 H=8 depth=8 L=22 fp32 (large L1)"),
    ("_mar_stack_kernel", "mar_stack D=512 H=8 depth=8 L=22 bf16 (large L1)"),
    ("_ar_stack_decode_kernel", "ar_stack D=512 H=8 depth=8 T=16 fp32"),
    ("_ar_stack_decode_kernel", "ar_stack D=512 H=8 depth=8 T=16 bf16"),
]
# Cost of the subset (committed run, 2026-12-01): 28 compiles, 157 CPU-s of compiles and 197 CPU-s for the whole
# run (capture, compiles, disassembly) -> about 3.5 min at -j 1, under 2 min at -j 2 on 2 idle cores (CI: 8-min
# budget). The full set is ~140 compiles; the hand report of 2026-12-01 summed 3563 s of compile for them
# (pixel head W=128 variants 1-5 min each): not run here, the lead runs it after the kernel fixes.


def row_key(kernel: str, case: str, arch: int) -> str:
    return f"{kernel} | {case} | sm_{arch}"


# ---- the cases: published configs' training and sampling paths (WORKLOADS.md) -------------------------------

@dataclass
class Case:
    label: str
    group: str          # attention / decode / pixel_head / sampler / ce
    path: str           # train / sample / eval
    run: Callable[[], None]


SEED_HI_LO = 0x1234_5678_9ABC_DEF0      # low word >= 2^31: seed_lo binds as i64 (a random seed, half the time)
SEED_LO_SMALL = 0x1234_5678_1BCD_EF01   # low word < 2^31: seed_lo binds as i32 (the other half)


def _attention_cases() -> List[Case]:
    import torch
    import fractal_kernels as fk
    from .aot_capture import backward

    def packed(N, L, H, D, dtype, causal=False, p=0.0, seed=SEED_HI_LO):
        def run():
            qkv = torch.randn(N, L, 3 * H * D, device="cuda", dtype=dtype, requires_grad=True)
            o = fk.tiny_attention_packed(qkv, H, causal=causal, dropout_p=p, dropout_seed=seed, backend="triton")
            backward(o)
        return run

    def ar_full(N, L, H, D, dtype, p=0.0, seed=SEED_HI_LO):
        # the AR level's full pass (fractal_models/ar.py): q, k rotated (fresh [N, L, H, D]), v a view of the
        # projection, all transposed to [N, H, L, D]
        def run():
            proj = torch.randn(N, L, 3 * H * D, device="cuda", dtype=dtype)
            xq, xk, xv = proj.split([H * D] * 3, dim=-1)
            q = xq.reshape(N, L, H, D).clone().transpose(1, 2).requires_grad_()
            k = xk.reshape(N, L, H, D).clone().transpose(1, 2).requires_grad_()
            v = xv.view(N, L, H, D).transpose(1, 2).detach().requires_grad_()
            o = fk.tiny_attention(q, k, v, causal=True, dropout_p=p, dropout_seed=seed, backend="triton")
            backward(o)
        return run

    def decode(B, Lmax, H, D, dtype, rope=True, kv_len=None):
        # one AR sampling step (fractal_models/engine/ar.py _attend_step_kernel): q a permuted view of the projection,
        # k/v views of the [2, B, H, Lmax, D] cache, the 2-D RoPE table [Lmax, D/2, 2] fp32
        def run():
            qkv = torch.randn(B, 1, 3, H, D, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)
            kv = torch.randn(2, B, H, Lmax, D, device="cuda", dtype=dtype)
            freqs = torch.randn(Lmax, D // 2, 2, device="cuda") if rope else None
            fk.tiny_attention_decode(qkv[0], kv[0], kv[1], kv_len or Lmax // 2, freqs_cis=freqs, backend="triton")
        return run

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    c = []
    att = lambda label, fn: c.append(Case(label, "attention", "train", fn))  # noqa: E731
    # MAR levels (packed qkv entry) and the pixel head's attention (L=4, causal), training
    for D, L in ((64, 21), (80, 22)):
        att(f"MAR L={L} D={D} H=8 bf16", packed(64, L, 8, D, bf16))
        att(f"MAR L={L} D={D} H=8 fp32", packed(64, L, 8, D, fp32))
    att("MAR L=21 D=64 H=8 fp16", packed(64, 21, 8, 64, fp16))
    att("MAR L=21 D=64 H=8 bf16 dropout", packed(64, 21, 8, 64, bf16, p=0.1))
    att("MAR L=21 D=64 H=8 bf16 dropout seed_lo<2^31", packed(64, 21, 8, 64, bf16, p=0.1, seed=SEED_LO_SMALL))
    for D in (32, 16):
        att(f"pixel L=4 D={D} H=4 causal bf16", packed(256, 4, 4, D, bf16, causal=True))
        att(f"pixel L=4 D={D} H=4 causal fp32", packed(256, 4, 4, D, fp32, causal=True))
    for D in (64, 80):
        att(f"MAR L=261 D={D} H=16 bf16", packed(4, 261, 16, D, bf16))
        att(f"MAR L=261 D={D} H=16 fp32", packed(4, 261, 16, D, fp32))
    att("MAR L=261 D=64 H=16 bf16 dropout", packed(4, 261, 16, 64, bf16, p=0.1))
    # AR levels: full passes (training, dropout 0.1 in train mode as LlamaGen's blocks), causal
    att("AR L=17 D=64 H=8 causal bf16 dropout", ar_full(64, 17, 8, 64, bf16, p=0.1))
    att("AR L=17 D=64 H=8 causal fp32", ar_full(64, 17, 8, 64, fp32))
    att("AR L=257 D=64 H=16 causal bf16 dropout", ar_full(4, 257, 16, 64, bf16, p=0.1))
    att("AR L=257 D=64 H=16 causal fp32", ar_full(4, 257, 16, 64, fp32))
    # AR sampling: KV-cache decode with RoPE in the kernel (fp32 cache = generate's default, bf16 under autocast)
    dec = lambda label, fn: c.append(Case(label, "decode", "sample", fn))  # noqa: E731
    dec("decode Lmax=257 D=64 H=16 rope fp32", decode(8, 257, 16, 64, fp32))
    dec("decode Lmax=17 D=64 H=8 rope fp32", decode(64, 17, 8, 64, fp32))
    dec("decode Lmax=257 D=64 H=16 rope bf16", decode(8, 257, 16, 64, bf16))
    dec("decode Lmax=17 D=64 H=8 rope bf16", decode(64, 17, 8, 64, bf16))
    dec("decode Lmax=17 D=64 H=8 no-rope fp32", decode(64, 17, 8, 64, fp32, rope=False))
    return c


def _pixel_head_weights(W: int, depth: int, C: int, dtype):
    import torch
    from fractal_kernels.reference.pixel_head import VOCAB, PixelHeadWeights
    M = 4 * W
    shapes = dict(cond_w=(W, C), cond_b=(W,), codebooks=(3, VOCAB, W), mlm_bias=(3, VOCAB), ln_w=(W,), ln_b=(W,),
                  norm1_w=(depth, W), norm1_b=(depth, W), qkv_w=(depth, 3 * W, W), qkv_b=(depth, 3 * W),
                  proj_w=(depth, W, W), proj_b=(depth, W), norm2_w=(depth, W), norm2_b=(depth, W),
                  fc1_w=(depth, M, W), fc1_b=(depth, M), fc2_w=(depth, W, M), fc2_b=(depth, W), norm_w=(W,),
                  norm_b=(W,))
    return PixelHeadWeights(*(torch.randn(*shapes[f], device="cuda", dtype=dtype) * 0.02
                              for f in PixelHeadWeights._fields))


def _pixel_head_cases() -> List[Case]:
    import torch
    import fractal_kernels as fk

    def head(W, H, depth, C, *, guided=True, per_row=False, top_p=1.0, uniforms=False, greedy=False,
             dtype=torch.float32, seed=SEED_HI_LO, B=256):
        def run():
            w = _pixel_head_weights(W, depth, C, dtype)
            cond = torch.randn(2 * B if guided else B, C, device="cuda", dtype=dtype)
            cfg = torch.full((B,), 3.0, device="cuda") if per_row else (3.0 if guided else 1.0)
            u = torch.rand(3, B, device="cuda", dtype=torch.float64) if uniforms else None
            fk.pixel_head_sample(cond, w, H, guided=guided, cfg=cfg, temperature=0.0 if greedy else 1.0,
                                 filter_threshold=1e-4, top_p=top_p, uniforms=u, seed=seed, backend="triton")
        return run

    c = []
    ph = lambda label, fn: c.append(Case(label, "pixel_head", "sample", fn))  # noqa: E731
    # 64x64 models' head and the 256^2 models' guiding-pixel heads: W=128, 4 heads, 3 blocks, C=512
    w128 = "pixel_head W=128 H=4 depth=3 C=512"
    ph(f"{w128} guided cfg scalar", head(128, 4, 3, 512))
    ph(f"{w128} guided cfg per-row", head(128, 4, 3, 512, per_row=True))
    ph(f"{w128} unguided", head(128, 4, 3, 512, guided=False))
    ph(f"{w128} guided top_p=0.9", head(128, 4, 3, 512, top_p=0.9))
    ph(f"{w128} guided bf16 cond+weights", head(128, 4, 3, 512, dtype=torch.bfloat16))
    # the 256^2 models' last level: W=64, 4 heads, 1 block, C = the level above's width (256 for L)
    ph("pixel_head W=64 H=4 depth=1 C=256 guided", head(64, 4, 1, 256))
    ph("pixel_head W=64 H=4 depth=1 C=256 guided seed_lo<2^31", head(64, 4, 1, 256, seed=SEED_LO_SMALL))
    # the small demo/test configs (tiny_mar etc.)
    ph("pixel_head W=32 H=2 depth=1 C=64 guided", head(32, 2, 1, 64))
    ph("pixel_head W=16 H=2 depth=1 C=32 guided", head(16, 2, 1, 32))
    ph("pixel_head W=16 H=2 depth=1 C=32 unguided uniforms", head(16, 2, 1, 32, guided=False, uniforms=True))
    ph("pixel_head W=16 H=2 depth=1 C=32 greedy", head(16, 2, 1, 32, greedy=True))
    return c


def _sampler_ce_cases() -> List[Case]:
    import torch
    import fractal_kernels as fk
    from .aot_capture import backward

    def sampler(V=256, N=4096, *, guided=True, per_row=False, probs=False, top_p=1.0, top_k=0, uniforms=False,
                greedy=False, dtype=torch.float32):
        def run():
            cond = torch.randn(N, V, device="cuda", dtype=dtype)
            unc = torch.randn(N, V, device="cuda", dtype=dtype) if guided else None
            cfg = torch.full((N,), 3.0, device="cuda") if per_row else (3.0 if guided else 1.0)
            out = torch.empty(N, V, device="cuda", dtype=torch.float32) if probs else None
            u = torch.rand(N, device="cuda", dtype=torch.float64) if uniforms else None
            fk.sample_logits(cond, unc, cfg=cfg, temperature=0.0 if greedy else 1.0, filter_threshold=1e-4,
                             top_p=top_p, top_k=top_k, uniforms=u, out_probs=out, seed=SEED_HI_LO, backend="triton")
        return run

    def ce(kind, M=8192, W=128):
        def run():
            x = torch.randn(M, W, device="cuda", requires_grad=kind != "nll")
            w = torch.randn(256, W, device="cuda", requires_grad=kind != "nll")
            b = torch.zeros(256, device="cuda", requires_grad=kind != "nll")
            t = torch.randint(0, 256, (M,), device="cuda")
            if kind == "nll":
                fk.pixel_log_probs(x, w, b, t, backend="triton")
            elif kind == "train":
                backward(fk.pixel_cross_entropy(x, w, b, t, backend="triton"))
            else:  # reduction="none": the backward scales each row by its incoming gradient
                backward(fk.pixel_cross_entropy(x, w, b, t, reduction="none", backend="triton"))
        return run

    c = []
    s = lambda label, fn: c.append(Case(label, "sampler", "sample", fn))  # noqa: E731
    s("sample_logits V=256 guided cfg scalar", sampler())
    s("sample_logits V=256 guided cfg per-row + probs", sampler(per_row=True, probs=True))
    s("sample_logits V=256 guided top_p=0.9 top_k=32", sampler(top_p=0.9, top_k=32))
    s("sample_logits V=256 unguided uniforms bf16", sampler(guided=False, uniforms=True, dtype=torch.bfloat16))
    s("sample_logits V=256 greedy", sampler(greedy=True))
    s("sample_logits V=4096 guided top_p top_k", sampler(V=4096, N=64, top_p=0.9, top_k=32))
    c.append(Case("ce_rows V=256 train (grad)", "ce", "train", ce("train")))
    c.append(Case("ce_rows V=256 nll (no grad)", "ce", "eval", ce("nll")))
    c.append(Case("ce_rows V=256 backward row-scale", "ce", "train", ce("none")))
    return c


def _mar_stack_cases() -> List[Case]:
    import torch
    import torch.nn as nn
    import fractal_kernels  # noqa: F401 (the dispatch's support predicates)
    from fractal_kernels.ops.mar_stack import mar_block_stack, pack_mar_stack
    from fractal_models.mar import Block

    def stack(D, H, depth, L, dtype, N=64):
        # a published MAR level's step (fractal_models/engine/mar.py sample -> fused_blocks): N sequences of L
        # tokens (prefix included) through `depth` blocks + the final norm, weights packed in `dtype`
        def run():
            blocks = [Block(D, H, qkv_bias=True) for _ in range(depth)]
            w = pack_mar_stack(blocks, nn.LayerNorm(D, eps=1e-6), dtype)
            w = type(w)(*(t.to("cuda") if isinstance(t, torch.Tensor) else t for t in w))
            mar_block_stack(torch.randn(N, L, D, device="cuda"), w, H, backend="triton")
        return run

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    c = []
    ms = lambda label, fn: c.append(Case(label, "mar_stack", "sample", fn))  # noqa: E731
    # the fused levels of the 256^2 models (width <= BLOCK_STACK_MAX_WIDTH): 16 patches + 5 conds + guiding pixel
    for D, H, depth, what in ((192, 3, 3, "base L2"), (256, 4, 4, "large L2"), (320, 4, 5, "huge L2 (head dim 80)"),
                              (384, 6, 6, "base L1"), (512, 8, 8, "large L1")):
        ms(f"mar_stack D={D} H={H} depth={depth} L=22 fp32 ({what})", stack(D, H, depth, 22, fp32))
        ms(f"mar_stack D={D} H={H} depth={depth} L=22 bf16 ({what})", stack(D, H, depth, 22, bf16))
    ms("mar_stack D=512 H=8 depth=8 L=22 fp16 (large L1)", stack(512, 8, 8, 22, fp16))
    ms("mar_stack D=256 H=4 depth=4 L=64 bf16 (longest L)", stack(256, 4, 4, 64, bf16))
    ms("mar_stack D=256 H=4 depth=4 L=64 fp32 (longest L)", stack(256, 4, 4, 64, fp32))
    return c



def _ar_block_stack_decode_cases() -> List[Case]:
    import torch
    from fractal_kernels.ops.ar_stack import ArStackWeights, ar_block_stack_decode, ar_stack_cache

    def step(D, H, depth, T, dtype, B=64, pos=None):
        # one sampling step of an AR level (fractal_models/engine/ar.py): all blocks + the final norm, one launch
        def run():
            M = -(-int(8 * D / 3) // 256) * 256  # FeedForward's hidden width: find_multiple(int(8 D / 3), 256)
            lin = lambda *s: torch.randn(*s, device="cuda", dtype=dtype) * D ** -0.5  # noqa: E731
            ones = lambda *s: torch.ones(*s, device="cuda")  # noqa: E731
            w = ArStackWeights(lin(depth, 3 * D, D), lin(depth, D, D), lin(depth, M, D), lin(depth, M, D),
                               lin(depth, D, M), ones(depth, D), ones(depth, D), ones(depth, 2) * 1e-5, ones(D),
                               torch.zeros(D, device="cuda"), 1e-6)
            freqs = torch.randn(T + 1, D // H // 2, 2, device="cuda")
            ar_block_stack_decode(torch.randn(B, D, device="cuda"), w, ar_stack_cache(w, B, T, "cuda"),
                                  T // 2 if pos is None else pos, freqs, H, backend="triton")
        return run

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    c = []
    ar = lambda label, fn: c.append(Case(label, "ar_stack", "sample", fn))  # noqa: E731
    # fractalar_in64's level 1 (D=512, 8 heads, 8 blocks, 16 positions) and a 128-wide level
    ar("ar_stack D=512 H=8 depth=8 T=16 fp32", step(512, 8, 8, 16, fp32))
    ar("ar_stack D=512 H=8 depth=8 T=16 bf16", step(512, 8, 8, 16, bf16))
    ar("ar_stack D=512 H=8 depth=8 T=16 fp16", step(512, 8, 8, 16, fp16))
    ar("ar_stack D=128 H=4 depth=3 T=16 fp32", step(128, 4, 3, 16, fp32))
    ar("ar_stack D=128 H=4 depth=3 T=16 bf16", step(128, 4, 3, 16, bf16))
    return c

def cases() -> List[Case]:
    return (_attention_cases() + _pixel_head_cases() + _sampler_ce_cases() + _mar_stack_cases()
            + _ar_block_stack_decode_cases())


# ---- capture ---------------------------------------------------------------------------------------------

def _parse_seed_regression(text: Optional[str]) -> Optional[Callable[[str, dict], dict]]:
    """``FRACTAL_AOT_SEED_REGRESSION``: ``KERNEL[,CONST=VALUE...]:OPTION=INT`` (alias ``decode_num_stages_3``)."""
    if not text:
        return None
    if text == "decode_num_stages_3":
        text = "_attn_fwd_kernel,DECODE=True:num_stages=3"
    m = re.fullmatch(r"(\w+)((?:,\w+=[^,:]+)*):(\w+)=(-?\d+)", text)
    if not m:
        raise ValueError(f"FRACTAL_AOT_SEED_REGRESSION: expected KERNEL[,CONST=VALUE...]:OPTION=INT or "
                         f"decode_num_stages_3, got {text!r}")
    kernel, conds, option, value = m.group(1), m.group(2), m.group(3), int(m.group(4))
    match = dict(c.split("=", 1) for c in conds.split(",") if c)

    def override(name: str, kwargs: dict) -> dict:
        if name == kernel and all(str(kwargs.get(k)) == v for k, v in match.items()):
            kwargs[option] = value
        return kwargs
    return override


def capture(archs: Sequence[int], labels: Optional[set] = None) -> List[Dict[str, Any]]:
    """Replay every case for every arch; one entry per launch: {case, group, path, arch, spec...}."""
    import torch
    from .aot_capture import capturing
    override = _parse_seed_regression(os.environ.get("FRACTAL_AOT_SEED_REGRESSION"))
    torch.manual_seed(0)
    out: List[Dict[str, Any]] = []
    for arch in archs:
        for case in cases():
            if labels is not None and case.label not in labels:
                continue
            sink: List[Dict[str, Any]] = []
            try:
                with capturing(arch, sink, override):
                    case.run()
            except Exception as e:  # a launcher that fails to replay is a gate failure, reported per case
                out.append({"case": case.label, "group": case.group, "path": case.path, "arch": arch,
                            "kernel": None, "capture_error": f"{type(e).__name__}: {e}"})
                continue
            if not sink:
                out.append({"case": case.label, "group": case.group, "path": case.path, "arch": arch,
                            "kernel": None, "capture_error": "no Triton launch recorded"})
            seen = set()
            for spec in sink:
                ident = _spec_id(spec)
                if ident in seen:  # e.g. several chunks of one call
                    continue
                seen.add(ident)
                out.append({"case": case.label, "group": case.group, "path": case.path, "arch": arch, **spec})
    return out


def _spec_id(spec: Dict[str, Any]) -> str:
    return json.dumps([spec["module"], spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"],
                       spec["options"]], sort_keys=True)


# ---- compile one specialization (worker process) -----------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _count(pattern: str, sass: str) -> int:
    return len(re.findall(pattern, sass))


def disassemble(kernel) -> str:
    """The kernel's SASS as ``cuobjdump -sass`` prints it, read from the cubin with the wheel's own cuobjdump.

    Not ``kernel.asm["sass"]``: Triton 3.6's formatter (``triton.tools.disasm``) stops at the first
    instruction whose offset has more than four hex digits, so a kernel over 64 KB of code (the bf16 AR
    stack) came back without its tail and without its EXIT. The raw listing is the same on 3.6 and 3.9; the
    counts below only need mnemonics. Falls back to Triton's text where no cuobjdump can be run."""
    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True,
                                  timeout=120).stdout
    except (AttributeError, OSError, subprocess.SubprocessError):
        return kernel.asm["sass"]


def compile_spec(spec: Dict[str, Any], arch: int) -> Dict[str, Any]:
    """Compile one captured specialization cold for ``sm_<arch>``; resource figures or the error text."""
    cache = tempfile.mkdtemp(prefix="fk-aot-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib
    import shutil
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    knobs.cache.dir = cache
    knobs.nvidia.dump_ptxas_log = True
    rec: Dict[str, Any] = {"status": "error", "error": None}
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        target = GPUTarget("cuda", arch, 32)
        opts = make_backend(target).parse_options(dict(spec["options"])).__dict__
        src = ASTSource(fn, dict(spec["signature"]), {tuple(p): v for p, v in spec["constexprs"]},
                        {tuple(p): [tuple(a) for a in v] for p, v in spec["attrs"]})
        log = io.StringIO()
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=opts)
        rec["compile_wall_s"] = round(time.perf_counter() - t0, 2)
        rec["compile_s"] = round(_cpu_seconds() - c0, 2)
        text = log.getvalue()
        regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
        if regs is None or spill is None:
            raise RuntimeError(f"no ptxas -v report in the compile log: {text[-500:]!r}")
        sass = disassemble(kernel)
        ttir = kernel.asm["ttir"]
        if not re.search(r"\b(EXIT|RET)\b", sass):
            raise RuntimeError("no SASS from cuobjdump (cannot count tensor-core / local-memory instructions)")
        md = kernel.metadata
        rec.update(status="ok", regs=int(regs.group(1)), stack=int(spill.group(1)),
                   spill_store=int(spill.group(2)), spill_load=int(spill.group(3)), smem=int(md.shared),
                   num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                   hmma=_count(r"\bHMMA\b", sass), hgmma=_count(r"\bHGMMA\b", sass),
                   ldl=_count(r"\bLDL\b", sass), stl=_count(r"\bSTL\b", sass),
                   has_dot="tt.dot" in ttir, ptx_target=f"sm_{arch}{'a' if arch >= 90 else ''}")
    except Exception as e:  # a compile error is a result, not a crash of the report
        rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rec


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas runs as a child): the compile's cost
    without the time other jobs on a shared machine take from it."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _warm_worker() -> None:
    """Pay the one-time costs of a compiling process (imports, LLVM and ptxas start-up) on a trivial kernel,
    so that they are not billed to the first real specialization."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _warm(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))
    cache = tempfile.mkdtemp(prefix="fk-aot-warm-")
    try:
        triton.knobs.cache.dir = cache
        with contextlib.redirect_stdout(io.StringIO()):
            for arch in ARCHS:
                triton.compile(ASTSource(_warm, {"x_ptr": "*fp32"}, {(1,): 16}, {}),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": 1})
    except Exception:  # warming is an optimisation; a real failure shows on the real compiles
        pass
    finally:
        import shutil
        shutil.rmtree(cache, ignore_errors=True)


def _compile_job(job):
    return job[0], compile_spec(job[1], job[2])


# ---- budgets ---------------------------------------------------------------------------------------------

def occupancy(regs: int, smem: int, num_warps: int, arch: int) -> Tuple[int, str, Dict[str, int]]:
    """Estimated resident CTAs per SM, its limiter, and each limit (an estimate: ignores per-block register
    granularity subtleties and L1/shared carve-out choices beyond the maximum)."""
    lim = ARCHS[arch]
    if smem > lim["smem_block"]:
        return 0, "smem>block", {"smem": 0}
    per_warp = max(REG_ALLOC_UNIT, math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT)
    limits = {"regs": (lim["regs_sm"] // per_warp) // num_warps,
              "smem": lim["smem_sm"] // (smem + SMEM_RESERVED_PER_CTA),
              "warps": lim["max_warps"] // num_warps,
              "ctas": lim["max_ctas"]}
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter, limits


def violations(row: Dict[str, Any]) -> List[str]:
    """Budget names this row breaks (see BUDGETS)."""
    if row.get("status") != "ok":
        return ["compile_error"]
    arch = row["arch"]
    out = []
    if row["spill_store"] + row["spill_load"] > BUDGETS["spill_bytes"]:
        out.append("spill")
    if row["smem"] > ARCHS[arch]["smem_block"]:
        out.append("smem_block")
    need = BUDGETS["min_ctas_per_sm_smem"].get(arch)
    if need and row["occupancy_limits"].get("smem", 0) < need:
        out.append("smem_ctas")
    if row["compile_s"] > BUDGETS["compile_s"]:
        out.append("compile_time")
    sixteen = any(t in ("*bf16", "*fp16") for t in row["signature"].values())
    if BUDGETS["tensor_cores_16bit"] and sixteen and row["has_dot"] and row["hmma"] + row["hgmma"] == 0:
        out.append("tensor_cores")
    return out


def known_over_budget() -> Dict[str, List[str]]:
    return {} if os.environ.get("FRACTAL_AOT_IGNORE_KNOWN") == "1" else KNOWN_OVER_BUDGET


def gate_problems(rows: List[Dict[str, Any]], known: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """Every way ``rows`` fail the gate: new violations, stale KNOWN_OVER_BUDGET entries, capture errors."""
    known = known_over_budget() if known is None else known
    problems = []
    keys = set()
    for r in rows:
        if r.get("capture_error"):
            problems.append(f"{r['case']} | sm_{r['arch']}: launcher replay failed: {r['capture_error']}")
            continue
        key = row_key(r["kernel"], r["case"], r["arch"])
        keys.add(key)
        have, allowed = set(r["violations"]), set(known.get(key, ()))
        for v in sorted(have - allowed):
            problems.append(f"{key}: over budget: {v} ({describe(r, v)})")
        for v in sorted(allowed - have):
            problems.append(f"{key}: KNOWN_OVER_BUDGET lists '{v}' but the row meets that budget now "
                            f"(stale entry: remove it from benchmarks/aot.py)")
    return problems


def describe(r: Dict[str, Any], v: str) -> str:
    if v == "compile_error":
        return (r.get("error") or "")[:300]
    if v == "spill":
        return f"{r['spill_store']}/{r['spill_load']} B spill st/ld, {r['regs']} regs, stack {r['stack']} B"
    if v == "smem_block":
        return f"smem {r['smem']} B > {ARCHS[r['arch']]['smem_block']} B per-block limit of {ARCHS[r['arch']]['name']}"
    if v == "smem_ctas":
        return (f"smem {r['smem']} B leaves {r['occupancy_limits'].get('smem', 0)} CTA/SM, need "
                f"{BUDGETS['min_ctas_per_sm_smem'][r['arch']]}")
    if v == "compile_time":
        return f"cold compile {r['compile_s']} s > {BUDGETS['compile_s']} s"
    if v == "tensor_cores":
        return "16-bit inputs and a tl.dot, but no HMMA/HGMMA in the SASS"
    return v


# ---- the run ---------------------------------------------------------------------------------------------

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def run(archs: Sequence[int], subset: Optional[List[Tuple[str, str]]], jobs: int = 1,
        progress: bool = True, case_labels: Optional[set] = None) -> Dict[str, Any]:
    t_start = time.perf_counter()
    launches = capture(archs, case_labels)  # every case even for a subset: replay is cheap, and the gate
    t_capture = time.perf_counter() - t_start  # checks that every launched kernel is recorded
    want = set(subset) if subset is not None else None
    rows: List[Dict[str, Any]] = []
    unique: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for l in launches:
        if l.get("capture_error"):
            rows.append(dict(l))
            continue
        if want is not None and (l["kernel"], l["case"]) not in want:
            continue
        ident = (_spec_id(l), l["arch"])
        unique.setdefault(ident, l)
        rows.append(dict(l, spec_id=ident))
    if want is not None:
        got = {(r["kernel"], r["case"]) for r in rows if r.get("kernel")}
        for kernel, case in sorted(want - got):
            for arch in archs:
                rows.append({"case": case, "kernel": kernel, "arch": arch, "group": "?", "path": "?",
                             "capture_error": "subset entry not produced by any launcher (renamed case or kernel?)"})
    results: Dict[Tuple[str, int], Dict[str, Any]] = {}
    jobs_list = [(ident, spec, ident[1]) for ident, spec in unique.items()]
    # the slow ones first, so a pool does not end on one long compile
    jobs_list.sort(key=lambda j: (j[1]["kernel"] != "_pixel_head_kernel", "fp32" not in j[1]["case"]))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(jobs_list), desc="aot compile", unit="kernel")
        except ImportError:
            bar = None
    t_compile = time.perf_counter()
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mp.get_context("spawn"),
                             initializer=_warm_worker) as pool:
        for ident, rec in pool.map(_compile_job, jobs_list):
            results[ident] = rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{unique[ident]['kernel']} sm_{ident[1]} {rec.get('compile_s', '-')} s")
    if bar is not None:
        bar.close()
    out_rows = []
    for r in rows:
        if "spec_id" in r:
            rec = results[r.pop("spec_id")]
            r.update(rec)
            if rec["status"] == "ok":
                ctas, limiter, limits = occupancy(rec["regs"], rec["smem"], rec["num_warps"], r["arch"])
                r.update(ctas_per_sm=ctas, limiter=limiter, occupancy_limits=limits,
                         warps_per_sm=ctas * rec["num_warps"])
            r["violations"] = violations(r)
        out_rows.append(r)
    out_rows.sort(key=lambda r: (r.get("kernel") or "", r["case"], -r["arch"]))
    import torch
    import triton
    doc = {
        "schema_version": SCHEMA_VERSION,
        "mode": "ci" if subset is not None else "full",
        "machine": {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                    "commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "jobs": jobs, "ptxas": _ptxas_versions(archs)},
        "archs": {str(a): ARCHS[a] for a in archs},
        "budgets": {k: (v if not isinstance(v, dict) else {str(a): n for a, n in v.items()})
                    for k, v in BUDGETS.items()},
        "seed_regression": os.environ.get("FRACTAL_AOT_SEED_REGRESSION") or None,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "capture_s": round(t_capture, 1),
        "compile_wall_s": round(time.perf_counter() - t_compile, 1),
        "compiles": len(jobs_list),
        "captured": sorted({(l.get("kernel") or "", l["case"], l["arch"]) for l in launches}),
        "rows": out_rows,
    }
    doc["gate_problems"] = gate_problems(out_rows)
    return doc


def _ptxas_versions(archs: Sequence[int]) -> Dict[str, str]:
    out = {}
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for a in archs:
            t = get_ptxas(a)
            out[f"sm_{a}"] = f"{os.path.basename(t.path)} {t.version}"
    except Exception as e:  # informational only
        out["error"] = str(e)[:200]
    return out


# ---- output ----------------------------------------------------------------------------------------------

def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sig_short(r: Dict[str, Any]) -> str:
    ptrs = sorted({t for t in r["signature"].values() if t.startswith("*")})
    return " ".join(ptrs)


def markdown(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# AOT compile report ({doc['mode']})", "",
             f"triton {m['triton']} · torch {m['torch']} · commit `{m['commit']}`{' (dirty)' if m['dirty'] else ''} · "
             f"{m['date']} · host {m['host']} ({m['cpus']} CPUs, -j {m['jobs']}) · ptxas {m['ptxas']}", "",
             f"{len(doc['rows'])} rows, {doc['compiles']} compiles; wall {doc['wall_s']} s (capture "
             f"{doc['capture_s']} s, compiles {doc['compile_wall_s']} s)"
             + (f"; **seeded regression** `{doc['seed_regression']}`" if doc.get("seed_regression") else ""), "",
             "Occupancy is an estimate (64 K registers/SM in 256-register warp units; shared memory + 1 KB per CTA "
             "of 228 KB/SM H100, 164 KB/SM A100; 64 warps, 32 CTAs); `NO LAUNCH` = over the per-block limit. "
             "Compile time: CPU seconds of the compiling process and its ptxas (the budget's measure: a shared "
             "machine stretches wall time), wall seconds in brackets; each in a fresh TRITON_CACHE_DIR after a "
             "warm-up compile of a trivial kernel in that process.", "",
             "| kernel | case | sm | status | regs | spill st/ld B | stack B | smem B | warps | stages | CTAs/SM "
             "[limiter] | LDL/STL | HMMA | HGMMA | compile CPU s (wall) | over budget |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        if r.get("capture_error"):
            lines.append(f"| {r.get('kernel') or '?'} | {r['case']} | {r['arch']} | replay failed: "
                         f"{r['capture_error'][:120]} |" + " |" * 12)
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['kernel']} | {r['case']} | {r['arch']} | **error** {r['error'][:120]!s} |"
                         + " |" * 11 + " compile_error |")
            continue
        occ = "NO LAUNCH" if r["ctas_per_sm"] == 0 else f"{r['ctas_per_sm']} [{r['limiter']}]"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['arch']} | ok | {r['regs']} | {r['spill_store']}/"
                     f"{r['spill_load']} | {r['stack']} | {r['smem']} | {r['num_warps']} | {r['num_stages']} | {occ} | "
                     f"{r['ldl']}/{r['stl']} | {r['hmma']} | {r['hgmma']} | {r['compile_s']} ({r.get('compile_wall_s', '-')}) | "
                     f"{', '.join(r['violations']) or '-'} |")
    lines += ["", "## Gate", ""]
    probs = doc["gate_problems"]
    lines += [f"- {p}" for p in probs] if probs else ["No problems: every row within budget or listed in KNOWN_OVER_BUDGET."]
    lines += ["", "## Specializations (as the GPU launch binds them)", ""]
    seen = set()
    for r in doc["rows"]:
        if r.get("capture_error") or (r["kernel"], r["case"]) in seen:
            continue
        seen.add((r["kernel"], r["case"]))
        lines.append(f"- `{r['kernel']}` ← {r['case']} ({r['path']}): ptrs {_sig_short(r)}; options "
                     f"{r['options']}; grid {tuple(r['grid'])}; constexprs {r['constexpr_values']}; 16-divisible: "
                     f"{', '.join(r['divisible_16'])}")
    return "\n".join(lines) + "\n"


def write(doc: Dict[str, Any], out_dir: str = RESULTS_DIR, stem: Optional[str] = None) -> Dict[str, str]:
    stem = stem or doc["mode"]
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    _atomic_write(paths["json"], json.dumps(doc, indent=1) + "\n")
    _atomic_write(paths["md"], markdown(doc))
    return paths


# ---- docs table --------------------------------------------------------------------------------------------

TABLE_START, TABLE_END = "<!-- aot-table:start -->", "<!-- aot-table:end -->"


def summary_table(doc: Dict[str, Any]) -> str:
    """One line per (kernel, case): sm_90 and sm_80 side by side."""
    by: Dict[Tuple[str, str], Dict[int, Dict[str, Any]]] = {}
    order: List[Tuple[str, str]] = []
    for r in doc["rows"]:
        if r.get("capture_error"):
            continue
        k = (r["kernel"], r["case"])
        if k not in by:
            by[k] = {}
            order.append(k)
        by[k][r["arch"]] = r

    def cell(r: Optional[Dict[str, Any]]) -> str:
        if r is None:
            return "–"
        if r["status"] != "ok":
            return "**compile error**"
        occ = "NO LAUNCH" if r["ctas_per_sm"] == 0 else f"{r['ctas_per_sm']}"
        tc = r["hgmma"] + r["hmma"]
        spill = r["spill_store"] + r["spill_load"]
        mark = " ⚠" if r["violations"] else ""
        return (f"{r['regs']} / {spill} / {r['smem'] // 1024} KB / {occ} / {tc or '-'} / "
                f"{r['compile_s']:.0f} s{mark}")

    m = doc["machine"]
    what = "every recorded launch" if doc["mode"] == "full" else "the CI subset (one per kernel x dtype class)"
    lines = [f"AOT compile of {what}: triton {m['triton']}, commit `{m['commit']}`, "
             f"{m['date']}; `python -m benchmarks.aot --docs` regenerates this. Cells: registers / spill bytes "
             f"(st+ld) / shared memory / CTAs per SM (estimate) / tensor-core instructions (HGMMA+HMMA) / cold "
             f"compile, CPU seconds; ⚠ = over a budget (benchmarks/aot.py BUDGETS; details in "
             f"benchmarks/results/aot/{doc['mode']}.md).", "",
             "| kernel | path | sm_90a (H100) | sm_80 (A100) |", "|---|---|---|---|"]
    for k in order:
        lines.append(f"| `{k[0]}` | {k[1]} | {cell(by[k].get(90))} | {cell(by[k].get(80))} |")
    return "\n".join(lines) + "\n"


def known_literal(rows: List[Dict[str, Any]]) -> str:
    """Python source of a KNOWN_OVER_BUDGET dict that lists exactly the violations of ``rows``."""
    lines = ["KNOWN_OVER_BUDGET: Dict[str, List[str]] = {"]
    for r in rows:
        if r.get("violations"):
            lines.append(f"    {row_key(r['kernel'], r['case'], r['arch'])!r}: {r['violations']!r},")
    return "\n".join(lines + ["}"])


def latest_doc(out_dir: str = RESULTS_DIR, prefer: Sequence[str] = ("full", "ci")) -> Optional[Dict[str, Any]]:
    for stem in prefer:
        p = os.path.join(out_dir, f"{stem}.json")
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
    return None


def update_docs_table(table: str, path: str = DOCS_PAGE) -> bool:
    """Fill the docs page's aot-table marker block; False if the markers are absent (nothing written)."""
    if not os.path.exists(path):  # an installed copy (fractal_bench) has no docs/ beside it
        return False
    with open(path) as f:
        text = f.read()
    i, j = text.find(TABLE_START), text.find(TABLE_END)
    if i < 0 or j < i:
        return False
    new = text[:i + len(TABLE_START)] + "\n" + table + text[j:]
    if new != text:
        _atomic_write(path, new)
    return True


# ---- CLI -------------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # triton.jit has made interpreter objects in this process (or will): replay in a clean one
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        module = __spec__.name if __spec__ is not None else "benchmarks.aot"
        return subprocess.call([sys.executable, "-m", module, *argv], env=env, cwd=root)
    p = argparse.ArgumentParser(prog="python -m benchmarks.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--ci", action="store_true", help="compile the CI subset (CI_SUBSET) only")
    p.add_argument("--check", action="store_true", help="exit 1 listing every gate problem")
    p.add_argument("--docs", "--readme", dest="docs", action="store_true",
                   help="write summary.md and fill the aot-table block of docs/benchmarks.md from the latest "
                        "results (nothing compiled; --readme is the old name)")
    p.add_argument("--list", action="store_true", help="print the captured specializations and exit")
    p.add_argument("--list-json", default=None, metavar="PATH", help="write the captured launches as JSON and exit")
    p.add_argument("--case", action="append", default=None, help="only this case label (repeatable)")
    p.add_argument("--print-known", action="store_true", help="print a KNOWN_OVER_BUDGET literal for the "
                                                              "violations of the latest results (nothing compiled)")
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="compile processes (default 1: shared machine)")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--stem", default=None, help="output file stem (default: ci or full)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            p.error(f"--arch: {a} not in {sorted(ARCHS)}")
    if args.print_known:
        doc = latest_doc(args.out_dir, prefer=("ci", "full"))
        if doc is None:
            print(f"no results under {args.out_dir}", file=sys.stderr)
            return 2
        print(known_literal(doc["rows"]))
        return 0
    if args.docs:
        doc = latest_doc(args.out_dir)
        if doc is None:
            print(f"no results under {args.out_dir}; run python -m benchmarks.aot first", file=sys.stderr)
            return 2
        table = summary_table(doc)
        _atomic_write(os.path.join(args.out_dir, "summary.md"), "# AOT summary\n\n" + table)
        print(table)
        page = os.path.relpath(DOCS_PAGE)
        print(f"{page} updated" if update_docs_table(table) else f"{page} not found or without aot-table markers; not changed")
        return 0
    subset = CI_SUBSET if args.ci else None
    labels = set(args.case) if args.case else None
    if args.list_json:
        _atomic_write(args.list_json, json.dumps(capture(archs, labels), indent=1) + "\n")
        return 0
    if args.list:
        for l in capture(archs, labels):
            if l.get("capture_error"):
                print(f"REPLAY FAILED sm_{l['arch']} {l['case']}: {l['capture_error']}")
            else:
                print(f"sm_{l['arch']} {l['kernel']:24s} {l['case']:55s} {l['options']} {l['constexpr_values']}")
        return 0
    if labels is not None and subset is not None:
        subset = [(k, c) for k, c in subset if c in labels]
    doc = run(archs, subset, jobs=args.jobs, progress=not args.no_progress, case_labels=labels)
    paths = write(doc, args.out_dir, args.stem)
    print(markdown(doc).split("\n## Specializations")[0])
    print("wrote " + ", ".join(paths.values()))
    if args.check and doc["gate_problems"]:
        print(f"\n{len(doc['gate_problems'])} gate problem(s):", file=sys.stderr)
        for prob in doc["gate_problems"]:
            print("  " + prob, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
