"""Fused pixel head: FractalGen's whole pixel (R, G, B) sampled in one Triton launch.

The pixel head (``fractal_models.pixelloss.PixelLoss``) is a 4-token causal transformer ``[condition, R, G, B]``
whose token ``c`` gives channel ``c``'s 256-way logits; each channel is drawn with the pipeline of
:func:`fractal_kernels.sample_logits` and the drawn id is the next token. Done with PyTorch ops that is ~150
small launches per call; every pixel is independent, so here one Triton program runs the whole 3-channel
loop for ``BLOCK_B`` pixels (their conditional *and* unconditional rows) and writes only the ids.

Kernel design (shaped by what the GPU compiler makes of it on sm_80 / sm_90, see :func:`pixel_head_config`):

* rows of a tile: ``[cond rows of BLOCK_B pixels; their uncond rows]`` as one ``[R, W]`` tile
  (``R = 2 * BLOCK_B`` guided, else ``BLOCK_B``), so every weight tile is loaded once for both halves;
  a persistent grid: each program loops over tiles and owns a small fp32 scratch in global memory (L1/L2
  resident) that every tile reuses;
* the code is loops, not unrolled copies: channels, blocks (``depth`` is a runtime argument), K chunks, MLP
  hidden chunks and logit column chunks are runtime loops, so code size and compile time do not grow with
  the width or the depth;
* every dot reads its left operand from the scratch in ``KC``-column chunks (LayerNorm outputs, attention
  output, the GELU chunk), so only one small operand pair is live: fp32 weights take "ieee" fp32 dots (FMA),
  16-bit weights tensor-core dots -- an fp32 operand split into three 16-bit terms (hi + mid + lo, the fp32
  value to its last bit), so the numerics stay fp32's;
* per channel only the new token goes through the blocks (a KV cache): keys/values of tokens 0 and 1 in the
  scratch ``[depth, 2, R, 2W]``; attention over <= 3 keys is an online softmax on ``[R, H, Dh]`` views
  (elementwise products + ``tl.sum``), no dot needed;
* the logits ``[R, 256]`` are made in ``NC``-column chunks into the scratch, and the sampler reads the cond /
  uncond halves from there: ``_sample_logits_kernel``'s math (its ``_sanitize``, ``_filter_cfg_mix``,
  ``_philox_uniform``; the top-p bisection as a runtime loop, the inverse-CDF draw as one delimited block);
* one compiled variant per (width, heads, hidden, guided, argument dtypes): per-pixel vs scalar cfg, the draw
  (Philox / given uniforms / exponential race / greedy), top-p and the debug logits are runtime switches.

Numerics: weights and conditions of any float dtype are upcast on load (or split exactly, above); all math
in fp32. The torch backend is ``fractal_kernels.reference.pixel_head.pixel_head_sample_reference``.

Randomness: explicit ``uniforms [3, B]`` (channel-major), or Philox4x32-10 keyed by ``seed`` with counter
``offset + channel * B + pixel`` -- the same function on both backends, so a seed gives the same ids.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import List, NamedTuple, Optional, Union

import torch

from fractal_kernels._target import device_arch
from fractal_kernels.dispatch import BackendUnavailable, record, resolve, triton_interpreting
from fractal_kernels.reference.philox import philox_uniform
from fractal_kernels.reference.pixel_head import VOCAB, PixelHeadWeights, pixel_head_sample_reference

try:
    import triton
    import triton.language as tl
    from fractal_kernels.ops.sample_logits import (_bisect_threshold, _filter_cfg_mix, _inverse_cdf_draw,
                                                   _philox_uniform, _sanitize)
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

MIN_W, MAX_W = 16, 128

if HAS_TRITON:

    @triton.jit
    def _layer_norm(x, w_ptr, b_ptr, cols, W: tl.constexpr):
        # LayerNorm over the last dim of an [R, W] tile, eps 1e-6 (the pixel head's)
        mean = tl.sum(x, axis=1) / W
        xc = x - mean[:, None]
        var = tl.sum(xc * xc, axis=1) / W
        w = tl.load(w_ptr + cols).to(tl.float32)
        b = tl.load(b_ptr + cols).to(tl.float32)
        return xc / tl.sqrt_rn(var + 1e-6)[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _dot(acc, a, w, DOT16: tl.constexpr):
        # acc [M, N] fp32 += a [M, K] @ w [K, N], fp32 accuracy whatever w's dtype.
        # fp32 w: an "ieee" fp32 dot. 16-bit w (exact in its dtype): a of w's dtype goes straight to the tensor
        # cores (the products are exact in fp32); an fp32 a is split into three 16-bit terms hi + mid + lo
        # (24+ significant bits, the fp32 value up to its last bit) and each term is a tensor-core dot with fp32
        # accumulation. DOT16 == 2 (the interpreter, whose dot reads bf16 bit patterns as integers) runs the
        # same split with fp32 dots of the exactly-representable terms.
        if w.dtype == tl.float32:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee", out_dtype=tl.float32)
        elif a.dtype == w.dtype:
            if DOT16 == 2:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(a, w, acc, out_dtype=tl.float32)
        else:
            a = a.to(tl.float32)
            hi = a.to(w.dtype)
            r = a - hi.to(tl.float32)
            mid = r.to(w.dtype)
            lo = (r - mid.to(tl.float32)).to(w.dtype)
            if DOT16 == 2:
                wf = w.to(tl.float32)
                acc = tl.dot(lo.to(tl.float32), wf, acc, input_precision="ieee", out_dtype=tl.float32)
                acc = tl.dot(mid.to(tl.float32), wf, acc, input_precision="ieee", out_dtype=tl.float32)
                acc = tl.dot(hi.to(tl.float32), wf, acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(lo, w, acc, out_dtype=tl.float32)
                acc = tl.dot(mid, w, acc, out_dtype=tl.float32)
                acc = tl.dot(hi, w, acc, out_dtype=tl.float32)
        return acc

    @triton.jit
    def _mm(acc, a_ptr, LDA: tl.constexpr, w_ptr, LDW: tl.constexpr, K: tl.constexpr,
            R: tl.constexpr, N: tl.constexpr, KC: tl.constexpr, DOT16: tl.constexpr):
        # acc [R, N] += A [R, K] @ Wm[0:N, 0:K]^T: A fp32 row-major (row stride LDA) in this program's scratch,
        # Wm a row-major weight block (row stride LDW, e.g. an nn.Linear weight). K in KC-column chunks, a
        # runtime loop: the code does not grow with K and only one [R, KC] / [KC, N] pair of operands is live.
        rr = tl.arange(0, R)
        nn = tl.arange(0, N)
        for k0 in tl.range(0, K, KC):
            kk = k0 + tl.arange(0, KC)
            a = tl.load(a_ptr + rr[:, None] * LDA + kk[None, :])
            w = tl.load(w_ptr + nn[None, :] * LDW + kk[:, None])  # [KC, N]
            acc = _dot(acc, a, w, DOT16)
        return acc

    @triton.jit
    def _heads(t, R: tl.constexpr, H: tl.constexpr, DH: tl.constexpr):
        return tl.reshape(t, [R, H, DH])

    @triton.jit(do_not_specialize=["B", "n_rows", "depth", "n_tiles", "ws_stride", "seed_lo", "seed_hi", "offset",
                                   "cfg_rows", "draw", "do_top_p", "write_logits"])
    def _pixel_head_kernel(
        cond_ptr, cond_w, cond_b, cb_ptr, mlm_b, ln_w, ln_b,
        n1_w, n1_b, qkv_w, qkv_b, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, nf_w, nf_b,
        cfg_ptr, u_ptr, e_ptr, ids_ptr, ws_ptr, logits_ptr,
        B, C, n_rows, stride_cond, depth, n_tiles, ws_stride,
        scale, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
        cfg_rows, draw, do_top_p, write_logits,
        GUIDED: tl.constexpr, W: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, HID: tl.constexpr,
        HC: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr, NC: tl.constexpr, BLOCK_B: tl.constexpr,
        V: tl.constexpr, DOT16: tl.constexpr,
    ):
        # Runtime switches (one compiled variant serves them all): cfg_rows 1 = per-pixel cfg at cfg_ptr, else
        # cfg_scalar; draw 0 = inverse CDF of Philox uniforms, 1 = of the fp64 uniforms at u_ptr, 2 = exponential
        # race with the Exp(1) noise at e_ptr, 3 = greedy; do_top_p; write_logits (debug: raw logits out).
        NH: tl.constexpr = 2 if GUIDED else 1
        R: tl.constexpr = NH * BLOCK_B
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        r = tl.arange(0, R)
        cols = tl.arange(0, W)
        vcols = tl.arange(0, V)
        vmask = vcols < V
        bb = tl.arange(0, BLOCK_B)

        # this program's scratch (fp32, reused by every tile it runs): A and Bo [R, W] staged dot operands
        # (LayerNorm outputs / attention output), Dh [2, R, HC] the MLP hidden chunk (double-buffered), F [R, V]
        # the logits, KV [depth, 2 tokens, R, 2W] keys/values of tokens 0 and 1
        ws = ws_ptr + pid.to(tl.int64) * ws_stride
        sA = ws
        sB = sA + R * W
        sD = sB + R * W
        sF = sD + 2 * R * HC
        sKV = sF + R * V
        rw_off = r[:, None] * W + cols[None, :]

        # one loop over this program's (tile, channel) pairs, not a channel loop inside a tile loop: there the
        # codebook's per-thread pointer was a tile-loop invariant that ptxas 12.9 spilled on sm_80 (W=128,
        # 16-bit weights: 8 B)
        dead = tl.zeros([BLOCK_B], dtype=tl.int32)  # 1: an earlier channel had no finite logit, ids stay -1
        for it in range(0, tl.cdiv(n_tiles - pid, nprog) * 3):
            tile = pid + (it // 3) * nprog
            c = it % 3
            pix_r = tile * BLOCK_B + r % BLOCK_B  # pixel of each tile row
            rmask = pix_r < B
            grow = (r // BLOCK_B) * B + pix_r  # row in cond: uncond rows sit B rows below
            g64 = grow.to(tl.int64)
            pix = tile * BLOCK_B + bb  # [BB] one per pixel (sampler side)
            pmask = pix < B
            p64 = pix.to(tl.int64)
            vm2 = pmask[:, None] & vmask[None, :]

            dead = tl.where(c == 0, 0, dead)  # a new tile
            # ---- token c's embedding [R, W]: the condition's projection, or the drawn id's codebook row
            if c == 0:
                tok = tl.zeros([R, W], dtype=tl.float32)
                for k0 in tl.range(0, C, BK):
                    kk = k0 + tl.arange(0, BK)
                    km = kk < C
                    xa = tl.load(cond_ptr + g64[:, None] * stride_cond + kk[None, :],
                                 mask=rmask[:, None] & km[None, :], other=0.0)
                    wt = tl.load(cond_w + cols[None, :] * C + kk[:, None], mask=km[:, None], other=0.0)
                    tok = _dot(tok, xa, wt, DOT16)
                tok += tl.load(cond_b + cols).to(tl.float32)[None, :]
            else:
                # the previous channel's ids (written below, behind a barrier); a dead pixel's -1 embeds id 0
                emb = tl.load(ids_ptr + pix_r.to(tl.int64) * 3 + (c - 1), mask=rmask, other=0)
                emb = tl.maximum(emb, 0)
                tok = tl.load(cb_ptr + (c - 1) * V * W + emb[:, None] * W + cols[None, :]).to(tl.float32)
            x = _layer_norm(tok, ln_w, ln_b, cols, W)

            # ---- the blocks, this token only, against cached keys/values of tokens < c
            for d in range(depth):
                tl.store(sA + rw_off, _layer_norm(x, n1_w + d * W, n1_b + d * W, cols, W))
                tl.debug_barrier()
                wq = qkv_w + d * 3 * W * W
                bq = qkv_b + d * 3 * W
                q = _mm(tl.zeros([R, W], dtype=tl.float32), sA, W, wq, W, W, R, W, KC, DOT16)
                k = _mm(tl.zeros([R, W], dtype=tl.float32), sA, W, wq + W * W, W, W, R, W, KC, DOT16)
                v = _mm(tl.zeros([R, W], dtype=tl.float32), sA, W, wq + 2 * W * W, W, W, R, W, KC, DOT16)
                q += tl.load(bq + cols).to(tl.float32)[None, :]
                k += tl.load(bq + W + cols).to(tl.float32)[None, :]
                v += tl.load(bq + 2 * W + cols).to(tl.float32)[None, :]
                kv_off = (d * 2 * R + r)[:, None] * (2 * W) + cols[None, :]  # token j at + j * R * 2W
                if c < 2:  # token 2 (G) is the last one any channel reads
                    tl.store(sKV + kv_off + c * R * 2 * W, k)
                    tl.store(sKV + kv_off + c * R * 2 * W + W, v)
                qh = _heads(q, R, H, DH)
                # online softmax over keys c (own), then 0 .. c-1 (cached): [R, H] scores, [R, H, DH] acc
                m_i = tl.sum(qh * _heads(k, R, H, DH), axis=2) * scale
                l_i = tl.full([R, H], 1.0, dtype=tl.float32)
                acc = _heads(v, R, H, DH)
                for j in range(c):
                    kj = tl.load(sKV + kv_off + j * R * 2 * W)
                    vj = tl.load(sKV + kv_off + j * R * 2 * W + W)
                    s = tl.sum(qh * _heads(kj, R, H, DH), axis=2) * scale
                    m_new = tl.maximum(m_i, s)
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new)
                    l_i = l_i * alpha + p
                    acc = acc * alpha[:, :, None] + p[:, :, None] * _heads(vj, R, H, DH)
                    m_i = m_new
                tl.store(sB + rw_off, tl.reshape(acc / l_i[:, :, None], [R, W]))
                tl.debug_barrier()
                x = _mm(x, sB, W, proj_w + d * W * W, W, W, R, W, KC, DOT16)
                x += tl.load(proj_b + d * W + cols).to(tl.float32)[None, :]
                # MLP, hidden dim in HC-column chunks: gelu(h @ fc1^T + b1) @ fc2^T accumulated, then + b2
                tl.store(sA + rw_off, _layer_norm(x, n2_w + d * W, n2_b + d * W, cols, W))
                tl.debug_barrier()
                mlp = tl.zeros([R, W], dtype=tl.float32)
                hcs = tl.arange(0, HC)
                for j0 in tl.range(0, HID, HC):
                    hc = j0 + hcs
                    hm = hc < HID
                    a = tl.zeros([R, HC], dtype=tl.float32)
                    rr = tl.arange(0, R)
                    for k0 in tl.range(0, W, KC):
                        kk = k0 + tl.arange(0, KC)
                        ak = tl.load(sA + rr[:, None] * W + kk[None, :])
                        w1 = tl.load(fc1_w + d * HID * W + hc[None, :] * W + kk[:, None], mask=hm[None, :],
                                     other=0.0)
                        a = _dot(a, ak, w1, DOT16)
                    a += tl.load(fc1_b + d * HID + hc, mask=hm, other=0.0).to(tl.float32)[None, :]
                    a = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
                    sDj = sD + ((j0 // HC) % 2) * R * HC  # double buffer: one barrier per chunk
                    tl.store(sDj + r[:, None] * HC + hcs[None, :], a)
                    tl.debug_barrier()
                    for k0 in tl.range(0, HC, KC):
                        kk = k0 + tl.arange(0, KC)
                        ak = tl.load(sDj + rr[:, None] * HC + kk[None, :])
                        w2 = tl.load(fc2_w + d * W * HID + cols[None, :] * HID + (j0 + kk)[:, None],
                                     mask=(j0 + kk)[:, None] < HID, other=0.0)
                        mlp = _dot(mlp, ak, w2, DOT16)
                x = x + mlp + tl.load(fc2_b + d * W + cols).to(tl.float32)[None, :]

            # ---- channel c's logits [R, V] in NC-column chunks: final norm, codebook c as the output
            # matrix, mlm bias; staged in F for the sampler
            tl.store(sA + rw_off, _layer_norm(x, nf_w, nf_b, cols, W))
            tl.debug_barrier()
            ncs = tl.arange(0, NC)
            for n0 in tl.range(0, V, NC):
                lg = _mm(tl.zeros([R, NC], dtype=tl.float32), sA, W, cb_ptr + c * V * W + n0 * W, W, W,
                         R, NC, KC, DOT16)
                lg += tl.load(mlm_b + c * V + n0 + ncs).to(tl.float32)[None, :]
                tl.store(sF + r[:, None] * V + (n0 + ncs)[None, :], lg)
                tl.store(logits_ptr + (c * n_rows + g64)[:, None] * V + (n0 + ncs)[None, :], lg,
                         mask=(rmask & (pix_r * 0 + write_logits != 0))[:, None])
            tl.debug_barrier()

            # ---- the sampler (math of _sample_logits_kernel, V = 256, no top-k)
            xc = tl.load(sF + bb[:, None] * V + vcols[None, :])
            x_s = _sanitize(xc * inv_temp)
            if GUIDED:
                xu = tl.load(sF + (BLOCK_B + bb)[:, None] * V + vcols[None, :])
                u = _sanitize(xu * inv_temp)
                # per-pixel cfg, or the scalar broadcast (a masked-off load reads nothing)
                wcfg = tl.load(cfg_ptr + pix, mask=pmask & (pix * 0 + cfg_rows != 0), other=cfg_scalar).to(tl.float32)
                x_s = _filter_cfg_mix(x_s, u, wcfg[:, None], filter_threshold)
            xmax = tl.max(x_s, axis=1)
            valid = xmax > float("-inf")
            shift = tl.where(valid, xmax, 0.0)
            # rows without a finite logit (and padding pixels) divide by 1, not 0: no NaN, zero probabilities
            e = tl.where(valid[:, None] & vm2, tl.exp(x_s - shift[:, None]), 0.0)
            pr = e / tl.where(valid & pmask, tl.sum(e, axis=1), 1.0)[:, None]
            if do_top_p != 0:
                t = _bisect_threshold(pr, vmask, top_p, True, BLOCK_B)
                pr = tl.where(pr >= t[:, None], pr, 0.0)
                pr = pr / tl.where(valid & pmask, tl.sum(pr, axis=1), 1.0)[:, None]
            if draw == 3:
                idx = tl.argmax(x_s, axis=1)
            elif draw == 2:
                # exponential race, torch.multinomial's algorithm: argmax of p / e, e ~ Exp(1) given
                ev = tl.load(e_ptr + (c * B + p64)[:, None] * V + vcols[None, :], mask=vm2, other=1.0)
                idx = tl.argmax(pr / ev, axis=1)
            else:
                uni = tl.load(u_ptr + c * B + pix, mask=pmask & (pix * 0 + draw == 1), other=0.5)
                if draw == 0:
                    uni = _philox_uniform(seed_lo, seed_hi, (p64 + c * B + offset).to(tl.uint64)).to(tl.float64)
                # the sampler contract's draw (fractal_kernels/reference/pixel_sampling.py)
                idx = _inverse_cdf_draw(pr, vmask, uni)
            idx = tl.where(valid & (dead == 0), idx, -1)
            dead = tl.where(idx < 0, 1, dead)
            tl.store(ids_ptr + p64 * 3 + c, idx.to(tl.int64), mask=pmask)
            # the next token reads the ids (and every scratch region is rewritten) by other threads
            tl.debug_barrier()


class PixelHeadConfig(NamedTuple):
    """Launch configuration of :func:`_pixel_head_kernel` for one (width, dtype, device)."""
    block_b: int  # pixels per tile
    kc: int  # K chunk of the staged dots
    nc: int  # logits column chunk
    hc: int  # MLP hidden chunk
    bk: int  # condition K chunk
    dot16: int  # 16-bit weights: 1 tensor cores, 2 interpreter emulation (0 unused: fp32 weights ignore it)
    num_warps: int
    num_stages: int
    max_programs: int  # persistent grid cap (programs loop over tiles)
    maxnreg: Optional[int]  # ptxas register cap (None: ptxas' choice)


def _gpu_launch(width: int, fp32: bool, arch: int) -> tuple:
    """(num_warps, maxnreg) per (width, weight dtype, arch family), read off the AOT probes: the fewest spills.
    W=64 fp32 spills 8-32 B at 8 warps, none at 4; on sm_80 (ptxas 12.9) W=32 and W=16 settle at 128
    registers and spill (W=32 ~110 B, W=16 20 B) unless told they may take 255."""
    if fp32 and width == 64:
        return 4, None
    return 8, (255 if arch < 90 and width <= 32 else None)


def pixel_head_config(width: int, hidden: int, c_in: int, bsz: int, guided: bool, wdtype: torch.dtype,
                      device: torch.device) -> PixelHeadConfig:
    """The one place the pixel head's launch configuration is chosen (per width, guidance, weight dtype, arch).

    GPU (also replayed for sm_80 / sm_90 by the AOT gate under ``fractal_kernels._target.target_arch``):
    16-row tiles (8 pixels guided, 16 unguided: 32-row tiles spill on sm_80 at W=128, and 16 is the smallest
    M of a dot), K chunks of 16 (fp32 "ieee" dots are FMA loops whose operands must stay small; 32 for 16-bit
    weights), 64-column
    logit and MLP hidden chunks, no software pipelining (the chunk loops are short and stages only cost
    shared memory), warps / register cap from :func:`_gpu_launch`, a persistent grid of 2 programs per SM.
    The interpreter (CPU tensors under ``TRITON_INTERPRET=1``) pays per op, not per row: big tiles and
    whole-K chunks."""
    if device.type == "cpu" and triton_interpreting():
        kc = max(16, width)
        return PixelHeadConfig(block_b=max(16, min(128, triton.next_power_of_2(bsz))), kc=kc, nc=VOCAB,
                               hc=max(16, min(256, triton.next_power_of_2(hidden))),
                               bk=min(512, max(16, triton.next_power_of_2(c_in))), dot16=2, num_warps=4,
                               num_stages=1, max_programs=4, maxnreg=None)
    fp32 = wdtype == torch.float32
    num_warps, maxnreg = _gpu_launch(width, fp32, device_arch(device))
    kc = 16 if fp32 or width < 32 else 32  # 16-bit weights: K chunks of 16 spill 8-16 B more than 32
    return PixelHeadConfig(block_b=8 if guided else 16, kc=kc, nc=64,
                           hc=min(64, max(16, triton.next_power_of_2(hidden))), bk=kc, dot16=1,
                           num_warps=num_warps, num_stages=1, max_programs=_sm_count(device) * 2, maxnreg=maxnreg)


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return _sm_count_cuda(torch.cuda.current_device() if device.index is None else device.index)
    return 132  # an H100 SXM; only the grid size depends on it, not the compiled code


def _launch_triton(cond, weights: PixelHeadWeights, num_heads, guided, cfg_t, cfg_scalar, inv_temp, filter_threshold,
                   top_p, greedy, uniforms, seed_lo, seed_hi, offset, ids, logits=None, block_b=None,
                   exponentials=None, max_programs=None, config: Optional[PixelHeadConfig] = None) -> None:
    """Run the kernel: ``ids`` ``[B, 3]`` int64 out; ``logits`` (debug) ``[3, rows, 256]`` fp32 raw logits out.
    ``config`` replaces :func:`pixel_head_config`'s choice, ``block_b`` / ``max_programs`` its tile size /
    persistent grid (tests)."""
    w = PixelHeadWeights(*(t.contiguous() for t in weights))
    rows, c_in = cond.shape
    bsz = ids.shape[0]
    width = w.ln_w.shape[0]
    depth = w.qkv_w.shape[0]
    hidden = w.fc1_w.shape[1]
    head_dim = width // num_heads
    cfg = config or pixel_head_config(width, hidden, c_in, bsz, guided, w.qkv_w.dtype, cond.device)
    block_b = block_b or cfg.block_b
    n_rows = 2 * bsz if guided else bsz
    n_tiles = triton.cdiv(bsz, block_b)
    nprog = max(1, min(n_tiles, max_programs or cfg.max_programs))
    r = (2 if guided else 1) * block_b
    ws_stride = r * (2 * width + 2 * cfg.hc + VOCAB + max(depth, 1) * 2 * 2 * width)
    ws = torch.empty(nprog * ws_stride, dtype=torch.float32, device=cond.device)
    # fixed argument dtypes whatever is absent (one compiled variant): fp32 dummies are the scratch, fp64 one
    # element; uniforms are fp64 and the noise fp32 here, exactly what the kernel made of them on load before
    uni = uniforms.double().contiguous() if uniforms is not None else torch.empty(1, dtype=torch.float64,
                                                                                   device=cond.device)
    exp = exponentials.float().contiguous() if exponentials is not None else ws
    draw = 3 if greedy else 2 if exponentials is not None else 1 if uniforms is not None else 0
    _pixel_head_kernel[(nprog,)](
        cond, *w,
        cfg_t if cfg_t is not None else ws, uni, exp, ids, ws, logits if logits is not None else ws,
        bsz, c_in, n_rows, cond.stride(0), depth, n_tiles, ws_stride,
        head_dim ** -0.5, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
        int(cfg_t is not None), draw, int(top_p < 1.0), int(logits is not None),
        GUIDED=guided, W=width, H=num_heads, DH=head_dim, HID=hidden, HC=cfg.hc, BK=cfg.bk, KC=cfg.kc, NC=cfg.nc,
        BLOCK_B=block_b, V=VOCAB, DOT16=cfg.dot16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )


_TRANSPOSED: List[tuple] = []  # (source tensors, their versions, transposed copies), most recent first


def _transposed_cpu(w: List[torch.Tensor]) -> List[torch.Tensor]:
    """cond_w, codebooks, qkv_w, proj_w, fc1_w, fc2_w transposed to ``[..., K, N]`` for the CPU kernel, cached
    for the last few weight sets. An entry holds its source tensors, so a hit (same tensor objects, same version
    counters) cannot be a new tensor that reuses freed memory."""
    src = (w[0], w[2], w[8], w[10], w[14], w[16])
    versions = tuple(t._version for t in src)
    for entry in _TRANSPOSED:
        if all(a is b for a, b in zip(entry[0], src)) and entry[1] == versions:
            return entry[2]
    out = [t.transpose(-2, -1).contiguous() for t in src]
    _TRANSPOSED.insert(0, (src, versions, out))
    del _TRANSPOSED[4:]
    return out


def _launch_cpu(cond, weights: PixelHeadWeights, num_heads, guided, cfg_t, cfg_scalar, inv_temp, filter_threshold,
                top_p, greedy, uniforms, seed_lo, seed_hi, offset, ids, logits=None, exponentials=None) -> None:
    """Run the compiled C++ kernel (``fractal_kernels/cpu/pixel_head_cpu.cpp``) on CPU tensors; same arguments
    as :func:`_launch_triton`. Every buffer it reads is made contiguous fp32 (uniforms fp64) here, and kept
    alive by this frame for the duration of the call."""
    from fractal_kernels import cpu
    lib = cpu.library()
    if lib is None:
        raise BackendUnavailable(f"pixel_head_sample: backend 'cpu' unavailable: {cpu.status()[1]}")
    w = [t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in weights]
    w += _transposed_cpu(w)
    ptrs = (ctypes.c_void_p * len(w))(*[t.data_ptr() for t in w])
    cond = cond.float().contiguous()
    rows, c_in = cond.shape
    width, depth, hidden = w[4].shape[0], w[8].shape[0], w[14].shape[1]
    cfg_c = cfg_t.float().contiguous() if cfg_t is not None else None
    uni = uniforms.double().contiguous() if uniforms is not None else None
    exp = exponentials.float().contiguous() if exponentials is not None else None
    draw = 3 if greedy else 2 if exp is not None else 0 if uni is not None else 1
    ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
    rc = lib.fk_pixel_head_sample_f32(
        cond.data_ptr(), rows, c_in, ptrs, width, depth, hidden, num_heads, int(guided), ptr(cfg_c),
        float(cfg_scalar), float(inv_temp), float(filter_threshold), float(top_p), draw, ptr(uni), ptr(exp),
        (seed_hi << 32) | seed_lo, offset & ((1 << 64) - 1), ids.data_ptr(), ptr(logits))
    if rc != 0:
        raise RuntimeError(f"pixel_head_sample: the CPU kernel rejected its arguments (code {rc})")


# ---- custom op: one op in a profiler / torch.compile graph ------------------------------------------------

@torch.library.custom_op("fractal_kernels::pixel_head_sample", mutates_args=())
def _pixel_head_op(cond: torch.Tensor, weights: List[torch.Tensor], num_heads: int, guided: bool,
                   cfg: Optional[torch.Tensor], cfg_scalar: float, inv_temp: float, filter_threshold: float,
                   top_p: float, greedy: bool, uniforms: Optional[torch.Tensor], seed_lo: int, seed_hi: int,
                   offset: int, exponentials: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    bsz = cond.shape[0] // 2 if guided else cond.shape[0]
    ids = torch.empty(bsz, 3, dtype=torch.int64, device=cond.device)
    launch = _launch_cpu if kernel == "cpu" else _launch_triton
    launch(cond, PixelHeadWeights(*weights), num_heads, guided, cfg, cfg_scalar, inv_temp, filter_threshold,
           top_p, greedy, uniforms, seed_lo, seed_hi, offset, ids, exponentials=exponentials)
    return ids


@_pixel_head_op.register_fake
def _(cond, weights, num_heads, guided, cfg, cfg_scalar, inv_temp, filter_threshold, top_p, greedy, uniforms,
      seed_lo, seed_hi, offset, exponentials, kernel):
    bsz = cond.shape[0] // 2 if guided else cond.shape[0]
    return cond.new_empty(bsz, 3, dtype=torch.int64)


# ---- validation and the public entry point -----------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_weights(weights, cond: torch.Tensor, num_heads) -> PixelHeadWeights:
    if not isinstance(weights, tuple) or len(weights) != len(PixelHeadWeights._fields):
        raise TypeError(f"weights: expected a PixelHeadWeights (see fractal_kernels.reference.pixel_head."
                        f"pack_pixel_head_weights), got {type(weights).__name__}")
    w = PixelHeadWeights(*weights)
    for name, t in zip(w._fields, w):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"weights.{name}: expected a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != cond.device:
            raise ValueError(f"weights.{name}: on {t.device}, cond on {cond.device}")
    if w.ln_w.dim() != 1:
        raise ValueError(f"weights.ln_w: expected [W], got {_shape(w.ln_w)}")
    width = w.ln_w.shape[0]
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 or width % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing the width W={width}, got {num_heads!r}")
    if w.qkv_w.dim() != 3 or w.fc1_w.dim() != 3:
        raise ValueError(f"weights.qkv_w / fc1_w: expected [depth, 3W, W] / [depth, M, W], got "
                         f"{_shape(w.qkv_w)} / {_shape(w.fc1_w)}")
    depth, hidden, c_in = w.qkv_w.shape[0], w.fc1_w.shape[1], cond.shape[1]
    expected = dict(
        cond_w=(width, c_in), cond_b=(width,), codebooks=(3, VOCAB, width), mlm_bias=(3, VOCAB), ln_w=(width,),
        ln_b=(width,), norm1_w=(depth, width), norm1_b=(depth, width), qkv_w=(depth, 3 * width, width),
        qkv_b=(depth, 3 * width), proj_w=(depth, width, width), proj_b=(depth, width), norm2_w=(depth, width),
        norm2_b=(depth, width), fc1_w=(depth, hidden, width), fc1_b=(depth, hidden), fc2_w=(depth, width, hidden),
        fc2_b=(depth, width), norm_w=(width,), norm_b=(width,))
    for name, t in zip(w._fields, w):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"weights.{name}: expected shape {expected[name]} (W={width}, C={c_in} from cond, "
                             f"depth={depth}, M={hidden}), got {tuple(t.shape)}")
    return w


def _kernel_supports(width: int) -> bool:
    return MIN_W <= width <= MAX_W and width & (width - 1) == 0


def _check(cond, weights, num_heads, guided, cfg, temperature, filter_threshold, top_p, uniforms, offset,
           exponentials=None):
    if not isinstance(cond, torch.Tensor) or cond.dim() != 2:
        raise ValueError(f"cond: expected a [rows, C] tensor, got {_shape(cond)}")
    if not cond.is_floating_point():
        raise TypeError(f"cond: expected a floating-point tensor, got {cond.dtype}")
    if cond.shape[1] < 1:
        raise ValueError(f"cond: expected C >= 1 channels, got shape {tuple(cond.shape)}")
    w = _check_weights(weights, cond, num_heads)
    if guided is None:
        guided = isinstance(cfg, torch.Tensor) or float(cfg) != 1.0
    rows = cond.shape[0]
    if guided and rows % 2:
        raise ValueError(f"cond: guided sampling takes [2B, C] rows (cond rows then uncond rows), got {rows} rows")
    bsz = rows // 2 if guided else rows
    if isinstance(cfg, torch.Tensor):
        if not guided:
            raise ValueError("cfg: a per-row guidance tensor needs guided=True (cond rows [cond; uncond])")
        if cfg.numel() not in (1, bsz):
            raise ValueError(f"cfg: expected a scalar or {bsz} per-pixel values, got shape {tuple(cfg.shape)}")
        if cfg.device != cond.device:
            raise ValueError(f"cfg: on {cfg.device}, cond on {cond.device}")
    else:
        if not (isinstance(cfg, (int, float)) and math.isfinite(cfg)):
            raise ValueError(f"cfg: expected a finite number or a tensor, got {cfg!r}")
        if not guided and float(cfg) != 1.0:
            raise ValueError(f"cfg: guidance scale {cfg} needs guided=True (cond rows [cond; uncond])")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(filter_threshold, (int, float)) and 0.0 <= filter_threshold <= 1.0):
        raise ValueError(f"filter_threshold: expected a probability in [0, 1], got {filter_threshold!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
    if uniforms is not None:
        if (not isinstance(uniforms, torch.Tensor) or tuple(uniforms.shape) != (3, bsz)
                or not uniforms.is_floating_point()):
            raise ValueError(f"uniforms: expected a float tensor of shape (3, {bsz}) (channel-major), got "
                             f"{_shape(uniforms) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__}")
        if uniforms.device != cond.device:
            raise ValueError(f"uniforms: on {uniforms.device}, cond on {cond.device}")
    if exponentials is not None:
        if uniforms is not None:
            raise ValueError("exponentials: give uniforms or exponentials, not both")
        if (not isinstance(exponentials, torch.Tensor) or tuple(exponentials.shape) != (3, bsz, VOCAB)
                or not exponentials.is_floating_point()):
            raise ValueError(f"exponentials: expected a float tensor of shape (3, {bsz}, {VOCAB}) of Exp(1) noise, got "
                             f"{_shape(exponentials) if isinstance(exponentials, torch.Tensor) else type(exponentials).__name__}")
        if exponentials.device != cond.device:
            raise ValueError(f"exponentials: on {exponentials.device}, cond on {cond.device}")
    if not (isinstance(offset, int) and 0 <= offset < 2 ** 63):
        raise ValueError(f"offset: expected an int in [0, 2^63), got {offset!r}")
    return w, guided, bsz


def _choose(backend: Optional[str], device: torch.device, width: int) -> str:
    choice = backend or os.environ.get("FRACTAL_KERNELS_BACKEND") or "auto"
    if choice == "cuda":
        # the extension has no pixel-head kernel (dispatch.CUDA_SYMBOLS has no entry, so auto never picks it)
        raise BackendUnavailable("pixel_head_sample: no CUDA-extension kernel for this op; use backend='triton' "
                                 "(GPU), 'torch' or None")
    which = resolve("pixel_head_sample", backend, device)
    if which == "triton" and not _kernel_supports(width):
        if choice == "triton":
            raise ValueError(f"weights: width W={width} unsupported by the triton kernel (a power of two in "
                             f"{MIN_W}..{MAX_W}); use backend='torch' or None")
        which = record("pixel_head_sample", "torch")
    return which


def pixel_head_sample(
    cond: torch.Tensor,
    weights: PixelHeadWeights,
    num_heads: int,
    *,
    guided: Optional[bool] = None,
    cfg: Union[float, torch.Tensor] = 1.0,
    temperature: float = 1.0,
    filter_threshold: float = 0.0,
    top_p: float = 1.0,
    uniforms: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
    exponentials: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sample whole pixels with FractalGen's pixel head; returns int64 ids ``[B, 3]`` (R, G, B in 0..255).

    ``cond``: the pixel head's conditions, ``[2B, C]`` (B conditional rows, then the B unconditional rows)
    when ``guided``, else ``[B, C]``; any float dtype. ``weights``: :class:`PixelHeadWeights` from
    :func:`fractal_kernels.reference.pixel_head.pack_pixel_head_weights` (fp32 / bf16 / fp16, upcast on load;
    all math fp32). ``num_heads`` divides the width W. ``guided`` defaults to ``cfg`` being a tensor or != 1.

    Per channel: the head's logits, then exactly :func:`fractal_kernels.sample_logits`: ``logits /
    temperature`` (``0`` = greedy argmax), the reference's low-probability filter, CFG with a scalar or
    per-pixel ``cfg`` ``[B]``, softmax, top-p, inverse-CDF draw. The id drawn for pixel ``b`` is the next
    token of both its cond and uncond rows. Guided with a scalar ``cfg == 1`` samples the conditional rows only.
    Note: ``PixelLoss.sample``'s temperature *multiplies* the logits; pass ``1 / t`` here.

    Randomness: ``uniforms`` ``[3, B]`` (channel-major) if given, else Philox ``(seed, offset + channel * B +
    pixel)`` (``seed=None`` draws one from ``generator`` or the global RNG); identical on every backend. Or
    ``exponentials`` ``[3, B, 256]`` of Exp(1) noise: channel ``c`` takes ``argmax(probs / exponentials[c])``,
    ``torch.multinomial``'s algorithm, so passing the noise it would draw (``torch.empty(B, 256).exponential_()``
    per channel) picks what ``torch.multinomial(probs, 1)`` picks (``PixelLoss`` uses this to keep the
    reference's random stream on a CPU).
    A pixel whose channel-``c`` logits have no finite value (NaN condition or weights) gets -1 for channel
    ``c`` and every later channel. ``backend``: None/"auto" (Triton on CUDA tensors, the compiled C++ kernel
    on CPU tensors when it builds, else PyTorch), "torch", "triton", "cpu"; there is no "cuda" kernel (forcing
    it raises ``BackendUnavailable``). The Triton kernel takes widths that are powers of two in 16..128; auto
    dispatch runs other widths on the torch backend. The CPU kernel takes any width; its logits agree with the
    torch backend's to ~1e-6 (another summation order), so ids can differ where two candidates nearly tie.
    """
    w, guided, bsz = _check(cond, weights, num_heads, guided, cfg, temperature, filter_threshold, top_p, uniforms,
                            offset, exponentials)
    which = _choose(backend, cond.device, w.ln_w.shape[0])
    if bsz == 0:
        return torch.empty(0, 3, dtype=torch.int64, device=cond.device)
    greedy = temperature == 0
    inv_temp = 1.0 if greedy else 1.0 / float(temperature)
    if isinstance(cfg, torch.Tensor) and cfg.numel() == 1:
        cfg = float(cfg)
    if guided and not isinstance(cfg, torch.Tensor) and float(cfg) == 1.0:
        # cfg = 1 is the conditional distribution (as in sample_logits): the uncond rows never matter
        guided, cond = False, cond[:bsz]
    if uniforms is None and exponentials is None and not greedy and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    seed = int(seed or 0) & ((1 << 64) - 1)

    if which == "torch":
        u = uniforms
        if u is None and not greedy and exponentials is None:
            u = philox_uniform(seed, offset, 3 * bsz, cond.device).reshape(3, bsz)
        return pixel_head_sample_reference(cond, w, num_heads, guided=guided, cfg=cfg, inv_temperature=inv_temp,
                                           filter_threshold=float(filter_threshold), top_p=float(top_p), uniforms=u,
                                           greedy=greedy, exponentials=exponentials)
    cfg_t = cfg.reshape(-1).float().contiguous() if isinstance(cfg, torch.Tensor) else None
    cfg_scalar = 1.0 if cfg_t is not None else float(cfg)
    uni = uniforms.contiguous() if uniforms is not None else None  # fp64 uniforms stay fp64, as in sample_logits
    exp = exponentials.contiguous() if exponentials is not None and not greedy else None
    return _pixel_head_op(cond if cond.stride(1) == 1 else cond.contiguous(), list(w), num_heads, guided, cfg_t,
                          cfg_scalar, inv_temp, float(filter_threshold), float(top_p), greedy, uni,
                          seed & 0xFFFFFFFF, seed >> 32, int(offset), exp, which)
