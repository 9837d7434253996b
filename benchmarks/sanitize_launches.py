"""One small launch of each kernel with scratch memory or barriers, and of each CUDA kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python -m benchmarks.sanitize_launches
    compute-sanitizer --tool initcheck --error-exitcode 9 python -m benchmarks.sanitize_launches
    python -m benchmarks.sanitize_launches --dry-run        # CPU: the same calls on the reference path

Triton: the fused pixel head (``_pixel_head_kernel``: global scratch between its stages, CTA barriers), the
MAR block stack (``_mar_stack_kernel``) and the AR decode stack (``_ar_stack_decode_kernel``). CUDA extension
(``fractal_kernels._C``, where built): ``sample_logits``, ``pixel_cross_entropy``, ``tiny_attention``. racecheck
only covers shared memory, and the stacks' scratch is global: memcheck (out-of-bounds, misaligned) and
initcheck (reads of scratch never written) are the tools that see them. Each launch prints one line
``launch NAME: ok|skipped|failed``; compute-sanitizer's own report names the kernel of any error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn


def _pixel_head(dev, be):
    from fractal_kernels import pixel_head_sample
    from fractal_kernels.reference.pixel_head import pack_pixel_head_weights
    from fractal_models.pixelloss import PixelLoss
    torch.manual_seed(0)
    m = PixelLoss(c_channels=32, width=32, depth=2, num_heads=2).eval().to(dev)
    cond = torch.randn(2 * 5, 32, device=dev)  # 5 rows, guided (cond + uncond)
    return pixel_head_sample(cond, pack_pixel_head_weights(m), 2, cfg=2.0, seed=1, backend=be)


def _mar_stack(dev, be):
    from fractal_kernels import mar_block_stack, pack_mar_stack
    from fractal_models.mar import Block
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(64, 4, qkv_bias=True) for _ in range(2)]).eval().to(dev)
    norm = nn.LayerNorm(64, eps=1e-6).to(dev)
    w = pack_mar_stack(blocks, norm, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    x = torch.randn(3, 21, 64, device=dev, dtype=w.qkv_w.dtype)
    return mar_block_stack(x, w, 4, backend=be)


def _ar_stack(dev, be):
    from fractal_kernels import ar_block_stack_decode, ar_stack_cache, pack_ar_stack
    from fractal_models.ar import ModelArgs, TransformerBlock, precompute_freqs_cis_2d
    torch.manual_seed(0)
    blocks = nn.ModuleList([TransformerBlock(ModelArgs(dim=64, n_head=4)) for _ in range(2)]).eval().to(dev)
    norm = nn.LayerNorm(64, eps=1e-6).to(dev)
    freqs = precompute_freqs_cis_2d(2, 16).to(dev).contiguous()
    w = pack_ar_stack(blocks, norm, torch.float32)
    cache = ar_stack_cache(w, 3, len(freqs), dev)
    out = None
    for pos in range(3):
        out = ar_block_stack_decode(torch.randn(3, 64, device=dev), w, cache, pos, freqs, 4, backend=be)
    return out


def _sample_logits(dev, be):
    from fractal_kernels import sample_logits
    return sample_logits(torch.randn(5, 256, device=dev), torch.randn(5, 256, device=dev), cfg=2.0,
                         filter_threshold=1e-4, seed=0, backend=be)


def _pixel_ce(dev, be):
    from fractal_kernels import pixel_cross_entropy
    x = torch.randn(7, 32, device=dev, requires_grad=True)
    w = torch.randn(256, 32, device=dev, requires_grad=True)
    b = torch.randn(256, device=dev, requires_grad=True)
    loss = pixel_cross_entropy(x, w, b, torch.randint(0, 256, (7,), device=dev), backend=be)
    loss.backward()
    return loss


def _attention(dev, be):
    from fractal_kernels import tiny_attention
    q, k, v = (torch.randn(2, 4, 21, 64, device=dev, requires_grad=True) for _ in range(3))
    o = tiny_attention(q, k, v, backend=be)
    o.sum().backward()
    return o


#: name -> (launch, backend on a GPU)
LAUNCHES: Dict[str, tuple] = {
    "pixel_head (triton)": (_pixel_head, "triton"),
    "mar_stack (triton)": (_mar_stack, "triton"),
    "ar_stack_decode (triton)": (_ar_stack, "triton"),
    "sample_logits (cuda)": (_sample_logits, "cuda"),
    "pixel_cross_entropy (cuda)": (_pixel_ce, "cuda"),
    "tiny_attention (cuda)": (_attention, "cuda"),
}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sanitize_launches", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: the same calls, Triton ones in the interpreter if "
                   "TRITON_INTERPRET=1, the rest with backend='torch'")
    p.add_argument("--only", action="append", default=None)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    dev = torch.device("cuda" if gpu else "cpu")
    from fractal_kernels import dispatch
    failed = 0
    for name, (fn, be) in LAUNCHES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        if gpu and be == "cuda" and dispatch._cuda_ext() is None:
            print(f"launch {name}: skipped (fractal_kernels._C not built)", flush=True)
            continue
        try:
            # dry run: Triton launches through the interpreter where it is on (gpu_session.sh sets it), else torch
            cpu_be = "triton" if be == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else "torch"
            fn(dev, be if gpu else cpu_be)
            if gpu:
                torch.cuda.synchronize()
            print(f"launch {name}: ok{'' if gpu else f' (dry run: {cpu_be} on CPU)'}", flush=True)
        except Exception as e:  # the others still run under the sanitizer
            failed += 1
            print(f"launch {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
