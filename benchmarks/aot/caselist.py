"""The capture list: the cases (the published configs' training and sampling paths through the public ops) and
their replay for each arch, recording every Triton launch as the GPU launcher binds it
(:mod:`benchmarks.aot_capture`), with the seeded-regression hook."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

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
    from ..aot_capture import backward

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
             dtype=torch.float32, seed=SEED_HI_LO, B=256, schedule="tiles"):
        def run():
            w = _pixel_head_weights(W, depth, C, dtype)
            cond = torch.randn(2 * B if guided else B, C, device="cuda", dtype=dtype)
            cfg = torch.full((B,), 3.0, device="cuda") if per_row else (3.0 if guided else 1.0)
            u = torch.rand(3, B, device="cuda", dtype=torch.float64) if uniforms else None
            fk.pixel_head_sample(cond, w, H, guided=guided, cfg=cfg, temperature=0.0 if greedy else 1.0,
                                 filter_threshold=1e-4, top_p=top_p, uniforms=u, seed=seed, backend="triton",
                                 schedule=schedule)
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
    # the phased schedule (_pixel_head_phased_kernel): the 64x64 models' head at batch 1 (2 rows: broadcast-FMA
    # tiles) and batch 8 (16 rows: dot tiles), one launch with grid barriers, the 256^2 models' last level at
    # batch 1 (4 pixels a call: 8 rows), a 16-bit weight set, the smallest head
    ph(f"{w128} phases b1", head(128, 4, 3, 512, B=1, schedule="phases"))
    ph(f"{w128} phases b8", head(128, 4, 3, 512, B=8, schedule="phases"))
    ph(f"{w128} persistent b1", head(128, 4, 3, 512, B=1, schedule="persistent"))
    ph("pixel_head W=64 H=4 depth=1 C=256 phases b4", head(64, 4, 1, 256, B=4, schedule="phases"))
    ph(f"{w128} phases b8 bf16 cond+weights", head(128, 4, 3, 512, B=8, dtype=torch.bfloat16, schedule="phases"))
    ph("pixel_head W=16 H=2 depth=1 C=32 phases b1 unguided", head(16, 2, 1, 32, B=1, guided=False,
                                                                    schedule="phases"))
    return c


def _sampler_ce_cases() -> List[Case]:
    import torch
    import fractal_kernels as fk
    from ..aot_capture import backward

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

    def step(D, H, depth, T, dtype, B=64, pos=None, schedule=None):
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
                                  T // 2 if pos is None else pos, freqs, H, backend="triton", schedule=schedule)
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
    # the phased step (_ar_step_phased_kernel) of fractalar_in64's levels: batch 1 and 8 with CFG (2 / 16 rows),
    # one launch with grid barriers, fp32 weights, and level 0 (D=1024, 257 positions)
    ar("ar_step phases D=512 H=8 depth=8 T=16 rows=2 bf16", step(512, 8, 8, 16, bf16, B=2, schedule="phases"))
    ar("ar_step phases D=512 H=8 depth=8 T=16 rows=16 bf16", step(512, 8, 8, 16, bf16, B=16, schedule="phases"))
    ar("ar_step persistent D=512 H=8 depth=8 T=16 rows=2 bf16", step(512, 8, 8, 16, bf16, B=2,
                                                                     schedule="persistent"))
    ar("ar_step phases D=512 H=8 depth=8 T=16 rows=2 fp32", step(512, 8, 8, 16, fp32, B=2, schedule="phases"))
    ar("ar_step phases D=1024 H=16 depth=32 T=256 rows=2 fp16", step(1024, 16, 32, 256, fp16, B=2,
                                                                      schedule="phases"))
    return c

def _skinny_linear_cases() -> List[Case]:
    import torch
    from fractal_kernels.ops.skinny_linear import skinny_linear

    def linear(rows, N, K, dtype, *, norm=False, gate=False, residual=False, x16=False, kv_heads=0):
        # one linear of an AR decode step with its fused neighbours (fractal_models/engine/ar.py
        # _blocks_step_skinny): x the fp32 residual stream, or the 16-bit attention output / SwiGLU hidden;
        # kv_heads: wqkv writes its key / value columns into the fp32 KV cache's slot of one position
        def run():
            w = lambda: torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5  # noqa: E731
            x = torch.randn(rows, K, device="cuda", dtype=dtype if x16 else torch.float32)
            kv = None
            if kv_heads:
                kv = torch.zeros(2, rows, kv_heads, 16, N // 3 // kv_heads, device="cuda")[:, :, :, 8]
            skinny_linear(x, w(), norm_weight=torch.ones(K, device="cuda") if norm else None,
                          gate=w() if gate else None,
                          residual=torch.randn(rows, N, device="cuda") if residual else None, backend="triton",
                          kv_out=kv)
        return run

    bf16, fp32 = torch.bfloat16, torch.float32
    c = []
    sk = lambda label, fn: c.append(Case(label, "skinny_linear", "sample", fn))  # noqa: E731
    # fractalar_in64: level 1 (D=512, hidden 1536) and level 0 (D=1024, hidden 2816); rows 2 = batch 1 with CFG,
    # 16 = batch 8 (the crossover data's range)
    for D, Hd, rows in ((512, 1536, 2), (1024, 2816, 2), (512, 1536, 16)):
        sk(f"skinny_linear D={D} rows={rows} wqkv+norm bf16", linear(rows, 3 * D, D, bf16, norm=True,
                                                                     kv_heads=D // 64))
        sk(f"skinny_linear D={D} rows={rows} wo+residual bf16", linear(rows, D, D, bf16, residual=True, x16=True))
        sk(f"skinny_linear D={D} rows={rows} w1|w3+norm bf16", linear(rows, Hd, D, bf16, norm=True, gate=True))
        sk(f"skinny_linear D={D} rows={rows} w2+residual bf16", linear(rows, D, Hd, bf16, residual=True, x16=True))
    sk("skinny_linear D=512 rows=2 wqkv+norm fp32", linear(2, 1536, 512, fp32, norm=True, kv_heads=8))
    return c


def _fused_linear_cases() -> List[Case]:
    import torch
    from fractal_kernels.ops.fused_linear import fused_linear

    def linear(M, N, K, dtype, *, norm=False, gelu=False, residual=False, x16=False):
        # one linear of a MAR block with its fused neighbours (fractal_models/engine/mar.py _block_fused_linear):
        # x the fp32 residual stream (LayerNorm prologue), or the 16-bit attention output / GELU hidden
        def run():
            x = torch.randn(M, K, device="cuda", dtype=dtype if x16 else torch.float32)
            fused_linear(x, torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5,
                         torch.zeros(N, device="cuda"), norm_weight=torch.ones(K, device="cuda") if norm else None,
                         norm_bias=torch.zeros(K, device="cuda") if norm else None, act="gelu" if gelu else "none",
                         residual=torch.randn(M, N, device="cuda") if residual else None, backend="triton")
        return run

    bf16, fp32 = torch.bfloat16, torch.float32
    c = []
    fl = lambda label, fn: c.append(Case(label, "fused_linear", "sample", fn))  # noqa: E731
    # fractalmar_large_in256's level 0 (D=1024, MLP 4096, 2 x 257 rows at batch 1, 512 x 257 at batch 256) and
    # level 2 (D=256 ... the 16 x 16 pixels' level: M = 4096 sequences x 21 tokens at batch 256)
    for M, tag in ((514, "b1"), (131584, "b256")):
        fl(f"fused_linear D=1024 {tag} ln+qkv bf16", linear(M, 3072, 1024, bf16, norm=True))
        fl(f"fused_linear D=1024 {tag} proj+residual bf16", linear(M, 1024, 1024, bf16, residual=True, x16=True))
        fl(f"fused_linear D=1024 {tag} ln+fc1+gelu bf16", linear(M, 4096, 1024, bf16, norm=True, gelu=True))
        fl(f"fused_linear D=1024 {tag} fc2+residual bf16", linear(M, 1024, 4096, bf16, residual=True, x16=True))
    fl("fused_linear D=256 b256 ln+fc1+gelu bf16", linear(86016, 1024, 256, bf16, norm=True, gelu=True))
    fl("fused_linear D=1024 b1 ln+qkv fp32", linear(514, 3072, 1024, fp32, norm=True))
    return c


def cases() -> List[Case]:
    return (_attention_cases() + _pixel_head_cases() + _sampler_ce_cases() + _mar_stack_cases()
            + _ar_block_stack_decode_cases() + _skinny_linear_cases() + _fused_linear_cases())


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
    from ..aot_capture import capturing
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
