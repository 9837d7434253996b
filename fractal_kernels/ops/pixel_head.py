"""Fused pixel head: FractalGen's whole pixel (R, G, B) sampled in one Triton launch.

The pixel head (``fractal_models.pixelloss.PixelLoss``) is a 4-token causal transformer ``[condition, R, G, B]``
whose token ``c`` gives channel ``c``'s 256-way logits; each channel is drawn with the pipeline of
:func:`fractal_kernels.sample_logits` and the drawn id is the next token. Done with PyTorch ops that is ~150
small launches per call; every pixel is independent, so here one Triton program runs the whole 3-channel
loop for ``BLOCK_B`` pixels (their conditional *and* unconditional rows) and writes only the ids.

Kernel design:

* rows of a program: ``[cond rows of BLOCK_B pixels; their uncond rows]`` as one ``[R, W]`` tile
  (``R = 2 * BLOCK_B`` guided, else ``BLOCK_B``), so every weight tile is loaded once for both halves;
* per channel, only the new token goes through the blocks (a KV cache): keys/values of tokens 0 and 1 live in
  a small fp32 global scratch ``[depth, 2, rows, 2W]``; attention over <= 3 keys is an online softmax on
  ``[R, H, Dh]`` views (elementwise products + ``tl.sum``), no dot needed;
* Linear layers are ``tl.dot`` of the ``[R, W]`` tile with ``[W, N]`` weight tiles in fp32 ("ieee"), the MLP
  hidden dim in chunks of ``HC`` columns, the logits one ``[R, W] x [W, 256]`` dot per channel;
* the sampler is ``_sample_logits_kernel``'s math inline (its ``_sanitize``, ``_filter_cfg_mix``, ``_bisect_threshold``,
  ``_philox_uniform``); the cond / uncond halves are split with a permute + ``tl.split``.

Numerics: weights and conditions of any float dtype are upcast on load; all math in fp32. The torch backend is
``fractal_kernels.reference.pixel_head.pixel_head_sample_reference``.

Randomness: explicit ``uniforms [3, B]`` (channel-major), or Philox4x32-10 keyed by ``seed`` with counter
``offset + channel * B + pixel`` -- the same function on both backends, so a seed gives the same ids.
"""
from __future__ import annotations

import ctypes
import math
import os
from typing import List, Optional, Union

import torch

from fractal_kernels.dispatch import BackendUnavailable, record, resolve
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
HIDDEN_CHUNK = 64

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
    def _linear_w(x, w_ptr, b_ptr, cols, W: tl.constexpr):
        # [R, W] @ weight[W rows of W]^T + bias -> [R, W]; w_ptr points at the first of W contiguous rows
        wt = tl.load(w_ptr + cols[None, :] * W + cols[:, None]).to(tl.float32)  # [W(in), W(out)]
        y = tl.dot(x, wt, input_precision="ieee", out_dtype=tl.float32)
        return y + tl.load(b_ptr + cols).to(tl.float32)[None, :]

    @triton.jit
    def _heads(t, R: tl.constexpr, H: tl.constexpr, DH: tl.constexpr):
        return tl.reshape(t, [R, H, DH])

    @triton.jit
    def _pixel_head_kernel(
        cond_ptr, cond_w, cond_b, cb_ptr, mlm_b, ln_w, ln_b,
        n1_w, n1_b, qkv_w, qkv_b, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, nf_w, nf_b,
        cfg_ptr, u_ptr, e_ptr, ids_ptr, kv_ptr, logits_ptr,
        B, C, n_rows, stride_cond,
        scale, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
        GUIDED: tl.constexpr, CFG_PER_ROW: tl.constexpr, HAS_UNIFORMS: tl.constexpr, HAS_EXP: tl.constexpr,
        DO_TOP_P: tl.constexpr,
        GREEDY: tl.constexpr, WRITE_LOGITS: tl.constexpr,
        W: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, DEPTH: tl.constexpr, HID: tl.constexpr,
        HC: tl.constexpr, BK: tl.constexpr, BLOCK_B: tl.constexpr, V: tl.constexpr,
    ):
        NH: tl.constexpr = 2 if GUIDED else 1
        R: tl.constexpr = NH * BLOCK_B
        pid = tl.program_id(0)
        r = tl.arange(0, R)
        pix_r = pid * BLOCK_B + r % BLOCK_B  # pixel of each tile row
        rmask = pix_r < B
        grow = (r // BLOCK_B) * B + pix_r  # row in cond / scratch: uncond rows sit B rows below
        g64 = grow.to(tl.int64)
        pix = pid * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB] one per pixel (sampler side)
        pmask = pix < B
        p64 = pix.to(tl.int64)
        cols = tl.arange(0, W)
        vcols = tl.arange(0, V)
        vmask = vcols < V
        vm2 = pmask[:, None] & vmask[None, :]

        dead = tl.zeros([BLOCK_B], dtype=tl.int32)  # 1: an earlier channel had no finite logit, ids stay -1
        emb = tl.zeros([R], dtype=tl.int32)  # codebook row of the token being embedded
        for c in tl.static_range(3):
            # ---- token c's embedding [R, W]
            if c == 0:
                tok = tl.zeros([R, W], dtype=tl.float32)
                for k0 in range(0, C, BK):
                    kk = k0 + tl.arange(0, BK)
                    km = kk < C
                    xa = tl.load(cond_ptr + g64[:, None] * stride_cond + kk[None, :],
                                 mask=rmask[:, None] & km[None, :], other=0.0).to(tl.float32)
                    wt = tl.load(cond_w + cols[None, :] * C + kk[:, None], mask=km[:, None], other=0.0)
                    tok += tl.dot(xa, wt.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
                tok += tl.load(cond_b + cols).to(tl.float32)[None, :]
            else:
                tok = tl.load(cb_ptr + (c - 1) * V * W + emb[:, None].to(tl.int64) * W + cols[None, :]).to(tl.float32)
            x = _layer_norm(tok, ln_w, ln_b, cols, W)

            # ---- the blocks, this token only, against cached keys/values of tokens < c
            for d in range(DEPTH):
                h = _layer_norm(x, n1_w + d * W, n1_b + d * W, cols, W)
                q = _linear_w(h, qkv_w + d * 3 * W * W, qkv_b + d * 3 * W, cols, W)
                k = _linear_w(h, qkv_w + d * 3 * W * W + W * W, qkv_b + d * 3 * W + W, cols, W)
                v = _linear_w(h, qkv_w + d * 3 * W * W + 2 * W * W, qkv_b + d * 3 * W + 2 * W, cols, W)
                if c < 2:  # token 2 (G) is the last one any channel reads
                    kv_off = ((d * 2 + c) * n_rows + g64)[:, None] * (2 * W) + cols[None, :]
                    tl.store(kv_ptr + kv_off, k, mask=rmask[:, None])
                    tl.store(kv_ptr + kv_off + W, v, mask=rmask[:, None])
                qh = _heads(q, R, H, DH)
                # online softmax over keys c (own), then 0 .. c-1 (cached): [R, H] scores, [R, H, DH] acc
                m_i = tl.sum(qh * _heads(k, R, H, DH), axis=2) * scale
                l_i = tl.full([R, H], 1.0, dtype=tl.float32)
                acc = _heads(v, R, H, DH)
                for j in tl.static_range(c):
                    off = ((d * 2 + j) * n_rows + g64)[:, None] * (2 * W) + cols[None, :]
                    kj = tl.load(kv_ptr + off, mask=rmask[:, None], other=0.0)
                    vj = tl.load(kv_ptr + off + W, mask=rmask[:, None], other=0.0)
                    s = tl.sum(qh * _heads(kj, R, H, DH), axis=2) * scale
                    m_new = tl.maximum(m_i, s)
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new)
                    l_i = l_i * alpha + p
                    acc = acc * alpha[:, :, None] + p[:, :, None] * _heads(vj, R, H, DH)
                    m_i = m_new
                o = tl.reshape(acc / l_i[:, :, None], [R, W])
                x = x + _linear_w(o, proj_w + d * W * W, proj_b + d * W, cols, W)
                # MLP, hidden dim in HC-column chunks: gelu(h @ fc1^T + b1) @ fc2^T accumulated, then + b2
                h = _layer_norm(x, n2_w + d * W, n2_b + d * W, cols, W)
                mlp = tl.zeros([R, W], dtype=tl.float32)
                for j0 in range(0, HID, HC):
                    hc = j0 + tl.arange(0, HC)
                    hm = hc < HID
                    w1 = tl.load(fc1_w + d * HID * W + hc[None, :] * W + cols[:, None], mask=hm[None, :], other=0.0)
                    b1 = tl.load(fc1_b + d * HID + hc, mask=hm, other=0.0).to(tl.float32)
                    a = tl.dot(h, w1.to(tl.float32), input_precision="ieee", out_dtype=tl.float32) + b1[None, :]
                    a = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
                    w2 = tl.load(fc2_w + d * W * HID + cols[None, :] * HID + hc[:, None], mask=hm[:, None], other=0.0)
                    mlp += tl.dot(a, w2.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
                x = x + mlp + tl.load(fc2_b + d * W + cols).to(tl.float32)[None, :]

            # ---- channel c's logits [R, V]: final norm, codebook c as the output matrix, mlm bias
            hn = _layer_norm(x, nf_w, nf_b, cols, W)
            cbt = tl.load(cb_ptr + c * V * W + vcols[None, :] * W + cols[:, None]).to(tl.float32)  # [W, V]
            logits = tl.dot(hn, cbt, input_precision="ieee", out_dtype=tl.float32)
            logits += tl.load(mlm_b + c * V + vcols).to(tl.float32)[None, :]
            if WRITE_LOGITS:
                tl.store(logits_ptr + (c * n_rows + g64)[:, None] * V + vcols[None, :], logits, mask=rmask[:, None])

            # ---- the sampler (math of _sample_logits_kernel, V = 256, no top-k)
            if GUIDED:
                xc, xu = tl.split(tl.permute(tl.reshape(logits, [2, BLOCK_B, V]), (1, 2, 0)))
            else:
                xc = logits
            x_s = _sanitize(xc * inv_temp)
            if GUIDED:
                u = _sanitize(xu * inv_temp)
                if CFG_PER_ROW:
                    wcfg = tl.load(cfg_ptr + pix, mask=pmask, other=1.0).to(tl.float32)[:, None]
                else:
                    wcfg = cfg_scalar
                x_s = _filter_cfg_mix(x_s, u, wcfg, filter_threshold)
            xmax = tl.max(x_s, axis=1)
            valid = xmax > float("-inf")
            shift = tl.where(valid, xmax, 0.0)
            # rows without a finite logit (and padding pixels) divide by 1, not 0: no NaN, zero probabilities
            e = tl.where(valid[:, None] & vm2, tl.exp(x_s - shift[:, None]), 0.0)
            pr = e / tl.where(valid & pmask, tl.sum(e, axis=1), 1.0)[:, None]
            if DO_TOP_P:
                t = _bisect_threshold(pr, vmask, top_p, True, BLOCK_B)
                pr = tl.where(pr >= t[:, None], pr, 0.0)
                pr = pr / tl.where(valid & pmask, tl.sum(pr, axis=1), 1.0)[:, None]
            if GREEDY:
                idx = tl.argmax(x_s, axis=1)
            elif HAS_EXP:
                # exponential race, torch.multinomial's algorithm: argmax of p / e, e ~ Exp(1) given
                ev = tl.load(e_ptr + (c * B + p64)[:, None] * V + vcols[None, :], mask=vm2, other=1.0)
                idx = tl.argmax(pr / ev.to(tl.float32), axis=1)
            else:
                if HAS_UNIFORMS:
                    uni = tl.load(u_ptr + c * B + pix, mask=pmask, other=0.5).to(tl.float64)
                else:
                    uni = _philox_uniform(seed_lo, seed_hi, (p64 + c * B + offset).to(tl.uint64)).to(tl.float64)
                idx = _inverse_cdf_draw(pr, vmask, uni)
            idx = tl.where(valid & (dead == 0), idx, -1)
            dead = tl.where(idx < 0, 1, dead)
            tl.store(ids_ptr + p64 * 3 + c, idx.to(tl.int64), mask=pmask)
            if c < 2:
                nxt = tl.maximum(idx, 0).to(tl.int32)  # a dead pixel's placeholder token
                if GUIDED:
                    emb = tl.reshape(tl.permute(tl.join(nxt, nxt), (1, 0)), [R])
                else:
                    emb = nxt
                # the next token reads keys/values other threads of this program stored
                tl.debug_barrier()


def _block_b(bsz: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 16
    # the interpreter pays per program and per op, not per row: fewer, bigger programs
    return max(16, min(128, triton.next_power_of_2(bsz)))


def _launch_triton(cond, weights: PixelHeadWeights, num_heads, guided, cfg_t, cfg_scalar, inv_temp, filter_threshold,
                   top_p, greedy, uniforms, seed_lo, seed_hi, offset, ids, logits=None, block_b=None,
                   exponentials=None) -> None:
    """Run the kernel: ``ids`` ``[B, 3]`` int64 out; ``logits`` (debug) ``[3, rows, 256]`` fp32 raw logits out."""
    w = PixelHeadWeights(*(t.contiguous() for t in weights))
    rows, c_in = cond.shape
    bsz = ids.shape[0]
    width = w.ln_w.shape[0]
    depth = w.qkv_w.shape[0]
    hidden = w.fc1_w.shape[1]
    head_dim = width // num_heads
    block_b = block_b or _block_b(bsz, cond.device)
    n_rows = 2 * bsz if guided else bsz
    kv = torch.empty(max(depth, 1) * 2 * n_rows * 2 * width, dtype=torch.float32, device=cond.device)
    dummy = ids
    grid = (triton.cdiv(bsz, block_b),)
    _pixel_head_kernel[grid](
        cond, *w,
        cfg_t if cfg_t is not None else dummy, uniforms if uniforms is not None else dummy,
        exponentials if exponentials is not None else dummy, ids, kv,
        logits if logits is not None else dummy,
        bsz, c_in, n_rows, cond.stride(0),
        head_dim ** -0.5, inv_temp, cfg_scalar, filter_threshold, top_p, seed_lo, seed_hi, offset,
        GUIDED=guided, CFG_PER_ROW=cfg_t is not None, HAS_UNIFORMS=uniforms is not None,
        HAS_EXP=exponentials is not None, DO_TOP_P=top_p < 1.0,
        GREEDY=greedy, WRITE_LOGITS=logits is not None,
        W=width, H=num_heads, DH=head_dim, DEPTH=depth, HID=hidden,
        HC=min(HIDDEN_CHUNK, max(16, triton.next_power_of_2(hidden))),
        BK=min(64, max(16, triton.next_power_of_2(c_in))), BLOCK_B=block_b, V=VOCAB,
        num_warps=4 if width <= 32 else 8,
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
