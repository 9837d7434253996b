"""The fast engine's pixel head: ``PixelLoss.sample(use_cache=True)`` / :meth:`PixelLoss.sample_cached` land here.

Functions of the pixel head ``head`` (a :class:`fractal_models.pixelloss.PixelLoss`, read through its attributes,
never imported): the KV-cached PyTorch loop (one new token per channel against cached keys/values; the same pixels
bit for bit in fp32 on the torch backend), the whole pixel in one fused :func:`fractal_kernels.pixel_head_sample`
call on a kernel backend (or the compiled C++ head on a CPU), and the caches they keep on the module (packed
weights, value tables, per-channel statistics).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch

from fractal_kernels.reference.pixel_head import VOCAB
from fractal_kernels.reference.pixel_sampling import CfgLike
from fractal_models.layers import PixelDraw, autocast_on, is_one as _is_one, multinomial_draw, use_kernel


def sample_cached(
    head,
    cond_list: Sequence[torch.Tensor],
    temperature: float,
    cfg: CfgLike,
    filter_threshold: float = 0,
    *,
    top_p: float = 1.0,
    draw: Optional[PixelDraw] = None,
    known: Optional[torch.Tensor] = None,
    known_mask: Optional[torch.Tensor] = None,
    return_probs: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """:meth:`sample` with a KV cache: channel ``c`` runs only token ``c`` (condition, R, G) through the
    blocks, its query attending to the cached keys/values of the earlier tokens.

    Equal to :meth:`sample` because the pixel head is causal: channel c's logits come from token c,
    which sees tokens 0..c only, and those are the same at every step (the condition, then the ids
    already drawn). The global RNG is consumed exactly as the reference does (one ``randn`` of
    ``[rows, 3]`` per channel for the target-rounding noise, then the draw), so seeded runs match
    too. Inference only (no dropout); plain fp32 PyTorch math in the reference's op order, whatever
    the backend (the draw still uses the fused sampler on a kernel backend, as :meth:`sample` does).
    """
    guided = not _is_one(cfg)
    cond = cond_list[0]
    rows = cond.size(0)
    bsz = rows // 2 if guided else rows
    device = cond.device
    draw = draw or multinomial_draw
    head_backend = head._fused_head_backend(device)
    if (head_backend is not None and known is None and not return_probs
            and (draw is multinomial_draw or hasattr(draw, "uniforms"))
            and not head.__dict__.get("_fused_head_failed")):
        try:
            return head._sample_fused_head(cond, bsz, guided, temperature, cfg, filter_threshold, top_p, draw,
                                           head_backend)
        except Exception as e:  # noqa: BLE001 - auto dispatch degrades, a forced backend does not
            if head.backend != "auto":
                raise
            warnings.warn(f"fractal_kernels: the fused pixel head failed on {device} ({type(e).__name__}: "
                          f"{str(e)[:200]}); backend 'auto' falls back to the KV-cached PyTorch path for this "
                          f"head", RuntimeWarning)
            head.__dict__["_fused_head_failed"] = True
    mean, std = channel_stats(head, device)
    if known is not None:
        known = known.reshape(bsz, 3).to(device=device, dtype=torch.float32)
        known_mask = known_mask.reshape(bsz, 3).to(device=device, dtype=torch.bool)
    fused = use_kernel(head.backend, device) and (draw is multinomial_draw or hasattr(draw, "uniforms"))
    pad = _gemm_pad(rows)
    width = head.ln.normalized_shape[0]
    # per call, not per channel and block: the zero qkv rows past the token and the causal mask
    zeros = torch.zeros(rows + pad, 2, 3 * width, device=device, dtype=head.blocks[0].attn.qkv.weight.dtype)
    masked = ~torch.ones(4, 4, dtype=torch.bool, device=device).tril()
    caches: List[List[torch.Tensor]] = [[] for _ in head.blocks]
    codebooks = head._codebooks()
    values, all_probs = [], []
    ids = None  # ids of the previous channel, one per row [rows]
    for i in range(3):
        # The reference's rounding noise (target_ids on the [rows, 3] input): drawn for the RNG stream.
        noise = torch.randn(rows, 3, device=device, dtype=torch.float32)
        if i == 0:
            x = head.cond_proj(cond)
            # the reference concatenates this token with codebook embeddings: under autocast the bf16
            # projection is promoted to the tables' dtype before the LayerNorm; do the same
            token_dtype = torch.promote_types(x.dtype, codebooks[0][0].weight.dtype)
            if x.dtype != token_dtype:
                x = x.to(token_dtype)
        else:
            if known is not None:  # the reference's rounding of the previous channel, row by row
                col = torch.cat([values[-1], values[-1]]) if guided else values[-1]
                ids = ((col * std[i - 1] + mean[i - 1]) * 255 + 1e-2 * noise[:, i - 1]).round().long()
            # else ids are the drawn ones: (id / 255 - m) / s maps back to id within 1e-4, the noise adds
            # |1e-2 * randn| < 0.1, so the reference's rounding returns the drawn id exactly
            x = codebooks[i - 1][0](ids)
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, -1)])
        h = token_step(head, x.unsqueeze(1), i, caches, pad, zeros, masked)
        with torch.autocast(device_type=h.device.type, enabled=False):
            cb, mlm = codebooks[i]
            h = h[:rows, 0] if pad else h[:, 0]
            w = cb.weight
            logits = mlm(h if h.dtype == torch.float32 else h.float(),
                         w if w.dtype == torch.float32 else w.float())
        sampled_ids, probs = head._draw_channel(logits, i, bsz, guided, fused, temperature, cfg, filter_threshold,
                                                top_p, draw, return_probs)
        if known is not None:
            value = (sampled_ids.float() / 255 - mean[i]) / std[i]
            values.append(torch.where(known_mask[:, i], known[:, i], value))
        else:
            values.append(sampled_ids)  # mapped to pixel values below, all channels in one go
            if i < 2:
                ids = torch.cat([sampled_ids, sampled_ids]) if guided else sampled_ids
        all_probs.append(probs)
    if known is not None:
        pixel_values = torch.stack(values, dim=1)
    else:
        pixel_values = ids_to_values(head, torch.stack(values, dim=1))
    if return_probs:
        return pixel_values, torch.stack(all_probs)
    return pixel_values


def fused_head_backend(head, device: torch.device) -> Optional[str]:
    """The ``pixel_head_sample`` backend :meth:`sample_cached` runs the whole pixel with, or None for the
    KV-cached PyTorch path: the model's kernel backend on a GPU; on a CPU with ``backend="auto"``, the
    compiled C++ kernel when it builds here (fp32 weights, no autocast: it computes in fp32 only, so a bf16
    run keeps the PyTorch path whose rounding matches the reference's)."""
    if use_kernel(head.backend, device):
        return "triton" if head.backend == "cuda" else head.backend  # no CUDA-extension version of this op
    if (head.backend == "auto" and device.type == "cpu" and not autocast_on("cpu")
            and head.cond_proj.weight.dtype == torch.float32):
        from fractal_kernels import cpu
        if cpu.library() is not None:
            return "cpu"
    return None


def sample_fused_head(head, cond: torch.Tensor, bsz: int, guided: bool, temperature: float, cfg: CfgLike,
                       filter_threshold: float, top_p: float, draw: PixelDraw, backend: str) -> torch.Tensor:
    """The whole pixel (3 channels, both CFG halves, the sampler) in one :func:`fractal_kernels.pixel_head_sample`
    call: one launch on a GPU (one C++ call on a CPU) instead of ~100 ops; ``backend`` from
    :meth:`_fused_head_backend`.

    Draws: with ``draw.uniforms`` (the equivalence mode) those uniforms; on the CPU kernel with the reference's
    ``torch.multinomial`` draw, the Exp(1) noise ``torch.multinomial`` would draw, made here in the reference's
    order, so the op picks the reference's ids (up to near-ties of the logits' last bits); else Philox from
    one seed per call. In the first two modes the reference's rounding-noise draws are made too, so the
    global RNG stream (and the random orders of the levels above) stays the reference's."""
    from fractal_kernels.ops.pixel_head import pixel_head_sample
    device = cond.device
    uniforms = exponentials = None
    if hasattr(draw, "uniforms"):
        uniforms = torch.stack([draw.uniforms(bsz, c).to(device) for c in range(3)])
        for _ in range(3):
            torch.randn(cond.size(0), 3, device=device)
    elif backend == "cpu":
        # per channel the reference draws randn(rows, 3) (rounding noise), then multinomial's Exp(1) noise
        exponentials = torch.empty(3, bsz, VOCAB, device=device)
        for c in range(3):
            torch.randn(cond.size(0), 3, device=device)
            exponentials[c].exponential_()
    cfg_arg = cfg
    if not guided:  # e.g. per-row cfg values that are all 1 (known pixels at cfg 1): unguided rows only
        cfg_arg = 1.0
    elif isinstance(cfg, torch.Tensor):
        cfg_arg = cfg.reshape(-1).to(device) if cfg.numel() > 1 else float(cfg)
    ids = pixel_head_sample(cond, packed_weights(head, ), head.blocks[0].attn.num_heads if head.blocks else 1,
                            guided=guided, cfg=cfg_arg, temperature=1.0 / temperature,
                            filter_threshold=filter_threshold, top_p=top_p, uniforms=uniforms,
                            exponentials=exponentials, backend=backend,
                            value_table=value_table(head, device)[0])
    return ids  # the values: the op looked them up


def ids_to_values(head, ids: torch.Tensor) -> torch.Tensor:
    """Pixel ids ``[B, 3]`` -> normalised values ``[B, 3]`` by table lookup: one op instead of four, the
    table holding exactly ``(id / 255 - mean) / std`` in float32 (the reference's math). Id -1 (a row
    without a finite logit, see :func:`fractal_kernels.pixel_head_sample`) maps to NaN."""
    table, channel = value_table(head, ids.device)
    return table[channel, ids]


def value_table(head, device: torch.device) -> tuple:
    """(``[3, 257]`` float32 table of each channel's value ``(id / 255 - mean) / std`` with NaN in column 256
    for id -1, the ``[1, 3]`` channel index), made once per device."""
    cache = head.__dict__.setdefault("_value_table_cache", {})
    if device not in cache:
        mean, std = head._stats(device)
        table = (torch.arange(256, device=device, dtype=torch.float32) / 255 - mean[:, None]) / std[:, None]
        table = torch.cat([table, table.new_full((3, 1), float("nan"))], dim=1)  # [3, 257]; column -1 = NaN
        cache[device] = (table, torch.arange(3, device=device).view(1, 3))
    return cache[device]


def packed_weights(head):
    """This head's weights packed for :func:`pixel_head_sample`, re-packed only when a parameter changed
    (in place or replaced: keyed on storage pointers and version counters)."""
    from fractal_kernels.reference.pixel_head import pack_pixel_head_weights
    # the submodules are listed once (walking the module tree each call costs more than the fused CPU head);
    # their parameter dicts are read every call, so a replaced parameter is seen
    modules = head.__dict__.get("_module_list")
    if modules is None:
        modules = head.__dict__["_module_list"] = list(head.modules())
    # a dtype or device change makes new storage, so the pointer and version counter cover it
    key = tuple((p.data_ptr(), p._version) for m in modules for p in m._parameters.values() if p is not None)
    cached = head.__dict__.get("_packed_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, pack_pixel_head_weights(head))
        head.__dict__["_packed_cache"] = cached
    return cached[1]


def channel_stats(head, device: torch.device) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per-channel 0-d mean/std tensors on ``device`` (the values of :meth:`_stats`), made once per device."""
    cache = head.__dict__.setdefault("_channel_stats_cache", {})
    if device not in cache:
        mean, std = head._stats(device)
        cache[device] = (list(mean.unbind(0)), list(std.unbind(0)))
    return cache[device]


def token_step(head, x: torch.Tensor, pos: int, caches: List[List[torch.Tensor]], pad: int,
                zeros: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Final normalised hidden state ``[N, 1, W]`` of token ``pos`` (embedded ``x`` ``[N, 1, W]``), given the
    cached qkv rows of tokens ``0..pos-1`` (one list per block); appends this token's. Mirrors
    :class:`CausalBlock` / :class:`CausalAttention` (torch path) for that token's row.

    LayerNorms, Linear layers and the MLP run on this token only. The attention itself (a few hundred
    FLOPs per row) runs on the reference's exact shapes and layout, the 4-token qkv ``[N, 4, 3W]`` with
    zeros past ``pos`` (``zeros`` ``[N, 2, 3W]``), and keeps output row ``pos``: the GEMMs then round
    exactly like the reference's (a ``[1, D] @ [D, pos + 1]`` product may take another BLAS kernel). The
    zero rows never matter: the causal mask (``masked``: True above the diagonal) gives them probability 0
    and ``0 * v`` adds an exact zero. Same ops as :func:`attention_reference` with ``scores_fp32=False``,
    minus the no-op casts. The last ``pad`` rows of ``x`` are dummies (see :func:`_gemm_pad`); the
    attention runs without them, on the reference's batch."""
    x = head.ln(x)
    n, _, c = x.shape
    m = n - pad
    for block, cache in zip(head.blocks, caches):
        attn = block.attn
        qkv_t = attn.qkv(block.norm1(x))  # [N, 1, 3W]
        cache.append(qkv_t)
        if pos == 0:
            # one visible key: softmax is exactly 1, and 1 * v0 + exact zeros is v0 in the reference too
            o = qkv_t[:, :, 2 * c:]
        else:
            if zeros.dtype != qkv_t.dtype:  # under autocast
                zeros = zeros.to(qkv_t.dtype)
            qkv = torch.cat(cache + [zeros if pos == 1 else zeros[:, :1]], dim=1)
            if pad:
                qkv = qkv[:m]
            qkv = qkv.reshape(m, 4, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # [N, H, 4, Dh]
            with torch.autocast(device_type=x.device.type, enabled=False):
                scores = (q @ k.transpose(-2, -1)) * attn.scale  # input dtype, as the reference
            scores = scores.masked_fill(masked, float("-inf"))
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # promote_types(q, fp32)
            probs = torch.softmax(scores if scores.dtype == acc else scores.to(acc), dim=-1)
            o = (probs if probs.dtype == v.dtype else probs.to(v.dtype)) @ v
            o = o.transpose(1, 2)[:, pos:pos + 1].reshape(m, 1, c)
            if pad:
                o = torch.cat([o, o[-1:].expand(pad, -1, -1)])
        x = x + attn.proj(o)
        mlp = block.mlp
        x = x + mlp.fc2(mlp.act(mlp.fc1(block.norm2(x))))
    return head.norm(x)


def _gemm_pad(rows: int) -> int:
    """Dummy rows to add to the cached pixel head's token batch so its matmuls round like the reference's.

    The reference runs the blocks' Linear layers on ``4 * rows`` token rows; a GEMM's rounding of a row can
    depend on the number of rows M: CPU BLAS takes other kernels, summing in another order, for small M, and
    which M depends on the CPU (MKL on AVX2 for M < 12 not a multiple of 4; on AVX-512 for some M up to 15,
    depending on K and N). Below 16 rows the one-token batch is padded to the reference's own ``4 * rows``
    rows (the same kernel; a negligible cost at that size); from 16 rows on both sides are past every
    small-M kernel seen, and no padding is needed."""
    return 3 * rows if 0 < rows < 16 else 0
