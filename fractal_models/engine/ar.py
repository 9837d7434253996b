"""The fast engine's AR level loop: :meth:`fractal_models.ar.AR.sample` with ``fast=True`` (no known pixels)
lands here.

Functions of the level module ``m`` (a :class:`fractal_models.ar.AR`, read through its attributes, never
imported). The reference's KV-cached loop with the per-step bookkeeping cut; on the torch backend the same math
op for op (equal images in fp32), on a kernel backend each block is the decode kernel with RoPE inside.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fractal_kernels import dispatch
from fractal_kernels.ops.ar_stack import ArStackWeights, ar_block_stack_decode, ar_stack_cache, pack_ar_stack
from fractal_kernels.ops.skinny_linear import skinny_linear
from fractal_kernels.ops.tiny_attention import tiny_attention_decode
from fractal_models.engine import graphs as _graphs
from fractal_models.engine.alternatives import explain_alternative
from fractal_models.layers import autocast_on, is_one as _is_one, kernel_backend, use_kernel


def sample(m, cond_list: List[torch.Tensor], cfg, cfg_schedule: str, temperature: float,
                 filter_threshold: float, next_level_sample_function: Callable, visualize=False,
                 step_graphs: Optional[bool] = None) -> torch.Tensor:
    """The KV-cached loop of :meth:`AR.sample` with the per-step bookkeeping cut: only the newest patch is
    embedded (no doubled copy of all patches per step), results are written in place (no clones), and the
    no-op dropout modules are not called. On the torch backend the same math op for op (the tests check
    equal images in fp32); on a kernel backend each block is the decode kernel (RoPE inside), a fused
    RMSNorm and the Linear layers -- or, when ``dispatch.choose_block_stack`` fuses the level (eval mode and
    ``m.fused_stack=True``; no level fuses by default), all blocks and ``m.norm`` of a step are one :func:`ar_block_stack_decode`
    launch on its own cache (weights packed once, :func:`_packed_stack`). Otherwise, with ``step_graphs`` (None:
    the level's ``step_graphs`` attribute, default False) on a CUDA device, the op-by-op step is replayed from
    per-position CUDA graphs kept on the level (:mod:`fractal_models.engine.graphs`)."""
    guided = not _is_one(cfg)
    rows = cond_list[0].size(0)
    bsz = rows // 2 if guided else rows
    device = cond_list[0].device
    dim = 3 * m.patch_size ** 2
    freqs = m.freqs_cis_on(device)
    fused = _fused_stack_backend(m, device, rows)
    skinny = None if fused is not None else explain_skinny_step(m, device, rows=rows)[0]
    step_fn = _blocks_step if skinny is None else _blocks_step_skinny_linears
    graphs = None
    if fused is not None:  # every block and m.norm as one launch per step, on the op's own cache
        stack = _packed_stack(m, device)
        stack_cache = ar_stack_cache(stack, rows, m.seq_len, device)
    else:  # per-position graphs (their static caches attached to the blocks), or None: eager on fresh caches
        graphs = _graphs.begin(m, rows, device, freqs, step_fn, step_graphs, visualize)
        if graphs is None:
            m.setup_caches(rows, m.seq_len, device=device, freqs_cis=freqs)
    prev = None  # the last sampled patch of every row [rows, 1, dim]
    pos_embed = m.pos_embed_learned.unbind(1)  # per-position [1, E] views, made once (no op per step)
    outs = []  # sampled patches [B, 1, dim], concatenated at the end
    try:
        for step in range(m.seq_len):
            h = m.cond_emb(cond_list[0]).unsqueeze(1) if step == 0 else m.patch_emb(prev)
            h = m.patch_emb_ln(h + pos_embed[step])
            if fused is not None:
                h = ar_block_stack_decode(h[:, 0], stack, stack_cache, step, freqs, m.config.n_head, backend=fused)
            elif graphs is not None:
                h = graphs.step(h, step)
            else:
                h = step_fn(m, h, step, freqs)
            cfg_iter = 1 + (cfg - 1) * (step + 1) / m.seq_len if cfg_schedule == "linear" else cfg
            sampled = next_level_sample_function(cond_list=[h], cfg=cfg_iter, temperature=temperature,
                                                 filter_threshold=filter_threshold)
            sampled = sampled.reshape(bsz, 1, dim)
            if sampled.dtype != torch.float32:  # the reference's patches are fp32
                sampled = sampled.float()
            outs.append(sampled)
            prev = torch.cat([sampled, sampled], dim=0) if guided else sampled
            if visualize:
                rest = sampled.new_zeros(bsz, m.seq_len - step - 1, dim)  # patches not sampled yet
                visualize(m.unpatchify(torch.cat(outs + [rest], dim=1)))
    finally:
        m.clear_caches()
    return m.unpatchify(torch.cat(outs, dim=1))


def _blocks_step(m, h: torch.Tensor, step: int, freqs: torch.Tensor, skinny: Optional[str] = None) -> torch.Tensor:
    """The blocks and ``m.norm`` of one step, op by op: ``h`` ``[rows, 1, E]`` -> ``[rows, E]``. ``skinny``
    (a backend, from :func:`explain_skinny_step`): each block as 4 :func:`skinny_linear` launches around the
    decode kernel (norms, SwiGLU, residuals and the cache write fused into the linears) instead of ~13."""
    if skinny is not None:
        return _blocks_step_skinny(m, h[:, 0], step, skinny)
    cos = sin = None
    for block in m.blocks:
        att = block.attention
        if use_kernel(att.backend, h.device):
            # kernel path: fused RMSNorm op and the decode kernel (RoPE inside), close to but not
            # bit-identical with the reference's op-by-op RMSNorm
            h = h + _attend_step_kernel(att, _rms_norm_fused(block.attention_norm, h), step)
            h = h + block.feed_forward.ffn(_rms_norm_fused(block.ffn_norm, h))
        else:
            if cos is None:  # [1, D/2] each, shared by every block's q and k
                cos, sin = freqs[step:step + 1].unbind(-1)
            h = h + _attend_step(att, _rms_norm(block.attention_norm, h), step, cos, sin)
            h = h + block.feed_forward.ffn(_rms_norm(block.ffn_norm, h))
    return m.norm(h)[:, 0]


def _blocks_step_skinny_linears(m, h: torch.Tensor, step: int, freqs: torch.Tensor) -> torch.Tensor:
    """:func:`_blocks_step` with the linears as Triton :func:`skinny_linear` launches (one function object, so the
    step graphs key on it)."""
    return _blocks_step(m, h, step, freqs, "triton")


def _fused_stack_backend(m, device: torch.device, rows: int = None):
    """"triton" when this step's blocks and ``m.norm`` run as one :func:`ar_block_stack_decode` launch, else None:
    the level in eval mode and ``dispatch.choose_block_stack``'s choice at ``rows`` rows (the crossover data, the
    default rule, or the level's ``fused_stack`` attribute: None = the rule, True / False = force)."""
    return explain_fused_stack(m, device, rows=rows)[0]


def explain_fused_stack(m, device: torch.device, backend=None, policy_only: bool = False, rows: int = None):
    """(``"triton"`` or None, why) for :func:`_fused_stack_backend`; ``backend`` overrides the blocks' own; ``rows``
    (when known) lets the crossover data decide per N."""
    if m.training:
        return None, "train mode: op by op"
    if len(m.blocks) == 0:
        return None, "no blocks"
    dtype = (torch.get_autocast_dtype(device.type) if autocast_on(device.type)
             else m.blocks[0].attention.wqkv.weight.dtype)
    kb = kernel_backend(backend or m.blocks[0].attention.backend)
    fuse = m.__dict__.get("fused_stack")
    which, why = dispatch.explain_block_stack("ar_block_stack_decode", kb, device, m.config.dim, fuse=fuse,
                                              policy_only=policy_only, n=rows, dtype=dtype)
    if which is not None or fuse is False:
        return which, why
    # the op's phased schedule (the step split over the grid) where its crossover data says it wins at this N
    # (ar_block_stack_decode takes the same schedule from the same rule)
    from fractal_kernels import policy
    from fractal_kernels._target import device_arch
    sched, swhy = policy.schedule_rule("ar_step", m.config.dim, rows=rows, dtype=str(dtype)[6:],
                                       arch=device_arch(device) if device.type == "cuda" else None)
    if sched == "tiles":
        return None, f"{why}; phased step: {swhy}"
    if not policy_only and dispatch.resolve("ar_block_stack_decode", kb, device) != "triton":
        return None, f"{why}; phased step: {swhy}, but only the Triton kernel has it"
    return "triton", f"the phased step ({sched}): {swhy}"


def _packed_stack(m, device: torch.device) -> ArStackWeights:
    """The level's stacked weights for the fused step, packed once per (dtype, device) and kept on the module
    (``_fused_stack_cache``, not in the state dict); repacked when a parameter is replaced or changed in place
    (data pointer or version counter). Linear weights in the autocast dtype under autocast, else their own."""
    dtype = (torch.get_autocast_dtype(device.type) if autocast_on(device.type)
             else m.blocks[0].attention.wqkv.weight.dtype)
    params = list(m.blocks.parameters()) + list(m.norm.parameters())
    sig = tuple((p.data_ptr(), p._version) for p in params)
    cache = m.__dict__.setdefault("_fused_stack_cache", {})
    hit = cache.get((dtype, device))
    if hit is None or hit[0] != sig:
        hit = cache[(dtype, device)] = (sig, pack_ar_stack(m.blocks, m.norm, dtype))
    return hit[1]


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`RMSNorm` without the no-op casts of fp32 inputs (same math, op for op)."""
    xf = x if x.dtype == torch.float32 else x.float()
    out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + norm.eps)
    return (out if out.dtype == x.dtype else out.type_as(x)) * norm.weight


def _attend_step(att: nn.Module, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:meth:`Attention.attend` for one cached position ``pos`` on the reference math, with fewer operators:
    q and k rotated together (RoPE is elementwise: the same products per element), no no-op casts, and no
    causal mask (a single query at the newest position sees every cached key). ``x`` ``[B, 1, dim]``; ``cos``,
    ``sin`` ``[1, D/2]`` of position ``pos``."""
    bsz = x.shape[0]
    n_head, head_dim, dim = att.n_head, att.head_dim, att.dim
    qkv = att.wqkv(x)  # [B, 1, 3 dim]
    qk = qkv[..., :2 * dim]
    xs = (qk if qk.dtype == torch.float32 else qk.float()).reshape(bsz, 1, 2 * n_head, head_dim // 2, 2)
    x0, x1 = xs.unbind(-1)
    rot = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3)  # [B, 1, 2H, D]
    if rot.dtype != qkv.dtype:
        rot = rot.to(qkv.dtype)
    q, k = rot.transpose(1, 2).split(n_head, dim=1)  # [B, H, 1, D]
    v = qkv[..., 2 * dim:].reshape(bsz, 1, n_head, head_dim).transpose(1, 2)
    cache = att.kv_cache
    cache.k[:, :, pos:pos + 1] = k
    cache.v[:, :, pos:pos + 1] = v
    cache.length = pos + 1
    keys, values = cache.k[:, :, :pos + 1], cache.v[:, :, :pos + 1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        scores = ((q if q.dtype == torch.float32 else q.float()) @ keys.transpose(-2, -1)) * head_dim ** -0.5
    probs = torch.softmax(scores, dim=-1)
    out = (probs if probs.dtype == values.dtype else probs.to(values.dtype)) @ values  # [B, H, 1, D]
    return att.wo(out.transpose(1, 2).reshape(bsz, 1, dim))


def _rms_norm_fused(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`RMSNorm` as one ``F.rms_norm`` op (fp32 math, cast back, then the weight): the kernel path's."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps=norm.eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).type_as(x) * norm.weight


def _attend_step_kernel(att: nn.Module, x: torch.Tensor, pos: int) -> torch.Tensor:
    """:meth:`Attention.attend` for one cached position on the decode kernel, in the fewest ops: q, k, v as one
    permuted view of the projection, key and value written into the cache with one copy, RoPE in the kernel
    (the cache holds un-rotated keys), the ``[B, H, 1, D]`` output read as ``[B, 1, dim]`` without a copy."""
    return att.wo(_decode_from_qkv(att, att.wqkv(x), pos).reshape(x.shape[0], 1, att.dim))


def _decode_from_qkv(att: nn.Module, qkv: torch.Tensor, pos: int) -> torch.Tensor:
    """The cache write and the decode kernel of one position from the projection ``qkv`` ``[B, (1,) 3 dim]``;
    returns the attention output ``[B, H, 1, D]`` (before ``wo``)."""
    bsz = qkv.shape[0]
    cache = att.kv_cache
    qkv = qkv.view(bsz, 1, 3, att.n_head, att.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, 1, D]
    if getattr(cache, "slots", None) is None:  # per-position [2, B, H, 1, D] views of the cache, made once
        cache.slots = cache.kv.split(1, dim=3)
    cache.slots[pos].copy_(qkv[1:])
    return _decode_q(att, qkv[0], pos)


def _decode_q(att: nn.Module, q: torch.Tensor, pos: int) -> torch.Tensor:
    """The decode kernel of position ``pos`` (its key and value already in the cache) for the queries ``q``
    ``[B, H, 1, D]``; the attention output ``[B, H, 1, D]``."""
    cache = att.kv_cache
    cache.length = pos + 1
    q = q if q.dtype == cache.kv.dtype else q.to(cache.kv.dtype)
    return tiny_attention_decode(q, cache.k, cache.v, pos + 1, freqs_cis=cache.freqs_cis,
                                 backend=kernel_backend(att.backend))


SKINNY_OP = "ar_skinny_step"  # the crossover data's name of this step (benchmarks/costmodel/crossover.py)


def explain_skinny_step(m, device: torch.device, backend=None, policy_only: bool = False,
                        rows: int = None) -> Tuple[Optional[str], str]:
    """(backend of :func:`skinny_linear` or None, why) for the op-by-op step's linears: the kernel path in eval
    mode, and the level's ``skinny_linears`` attribute (True / False force; None: the crossover data at ``rows``
    rows on this GPU -- ``policy.crossover_rule`` over ``fractal_kernels/data/block_stack_model.json``, op
    ``ar_skinny_step`` -- else off, the safe default; :func:`~fractal_models.engine.alternatives.explain_alternative`)."""
    att = m.blocks[0].attention if len(m.blocks) else None
    return explain_alternative(m, device, backend, policy_only, rows, attention=att,
                               weight=att.wqkv.weight if att is not None else None, width=m.config.dim, op=SKINNY_OP,
                               kernel_op="skinny_linear", attr="skinny_linears", what="the skinny-linear step")


def _blocks_step_skinny(m, x: torch.Tensor, pos: int, backend: str) -> torch.Tensor:
    """One step's blocks with the linears as :func:`skinny_linear` launches: ``x`` ``[rows, E]`` (the fp32
    residual stream) -> ``m.norm(x)`` ``[rows, E]``. Weights from :func:`_packed_stack` (the autocast dtype);
    the roundings are the op's (one at each linear's input, one at its output), not autocast's per-op ones."""
    stack = _packed_stack(m, x.device)
    bsz = x.shape[0]
    for i, block in enumerate(m.blocks):
        att = block.attention
        # the key and value go straight into the cache slot of this position (no copy launch); q comes back
        q = skinny_linear(x, stack.wqkv[i], norm_weight=block.attention_norm.weight,
                          norm_eps=block.attention_norm.eps, backend=backend, kv_out=att.kv_cache.kv[:, :, :, pos])
        o = _decode_q(att, q.view(bsz, 1, att.n_head, att.head_dim).transpose(1, 2), pos)  # [B, H, 1, D]
        x = skinny_linear(o.reshape(x.shape[0], att.dim), stack.wo[i], residual=x, backend=backend)
        g = skinny_linear(x, stack.w1[i], gate=stack.w3[i], norm_weight=block.ffn_norm.weight,
                          norm_eps=block.ffn_norm.eps, backend=backend)
        x = skinny_linear(g, stack.w2[i], residual=x, backend=backend)
    return m.norm(x)
