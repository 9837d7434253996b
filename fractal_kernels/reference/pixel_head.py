"""Reference math of :func:`fractal_kernels.pixel_head_sample`: FractalGen's pixel head sampling a whole pixel.

The pixel head (``fractal_models.pixelloss.PixelLoss``) is a causal transformer over the tokens
``[condition, R, G, B]``; channel ``c``'s logits come from token ``c`` (token 0 = ``cond_proj(cond)``,
token 1 / 2 = the R / G codebook embedding of the id drawn for the previous channel). Per channel the draw is
:func:`fractal_kernels.reference.pixel_sampling.sample_logits_reference`, i.e. the op
:func:`fractal_kernels.sample_logits` (temperature *divides* there: pass ``inv_temperature = 1 / t`` of the op,
which is the ``temperature`` of ``PixelLoss.sample``, since the model multiplies).

This file is plain fp32 PyTorch and recomputes the whole token prefix for every channel (no KV cache), so it
reads like the model and is obviously causal.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from fractal_kernels.reference.pixel_sampling import CfgLike, sample_logits_reference

LN_EPS = 1e-6
VOCAB = 256


class PixelHeadWeights(NamedTuple):
    """The pixel head's parameters, per-block ones stacked on a leading ``[depth]`` dimension.

    ``W`` = width, ``C`` = condition channels, ``D`` = depth, ``M`` = MLP hidden width (``4 W``).
    """
    cond_w: torch.Tensor    # [W, C]
    cond_b: torch.Tensor    # [W]
    codebooks: torch.Tensor  # [3, 256, W]  r, g, b embedding tables (also the output matrices)
    mlm_bias: torch.Tensor  # [3, 256]
    ln_w: torch.Tensor      # [W]
    ln_b: torch.Tensor      # [W]
    norm1_w: torch.Tensor   # [D, W]
    norm1_b: torch.Tensor   # [D, W]
    qkv_w: torch.Tensor     # [D, 3W, W]
    qkv_b: torch.Tensor     # [D, 3W]
    proj_w: torch.Tensor    # [D, W, W]
    proj_b: torch.Tensor    # [D, W]
    norm2_w: torch.Tensor   # [D, W]
    norm2_b: torch.Tensor   # [D, W]
    fc1_w: torch.Tensor     # [D, M, W]
    fc1_b: torch.Tensor     # [D, M]
    fc2_w: torch.Tensor     # [D, W, M]
    fc2_b: torch.Tensor     # [D, W]
    norm_w: torch.Tensor    # [W]
    norm_b: torch.Tensor    # [W]


def _stack(tensors, shape, like: torch.Tensor) -> torch.Tensor:
    # depth 0 has nothing to stack but still needs a [0, ...] tensor of the right trailing shape
    if not tensors:
        return like.new_zeros((0,) + tuple(shape))
    return torch.stack([t.detach() for t in tensors]).contiguous()


def pack_pixel_head_weights(pixel_loss: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> PixelHeadWeights:
    """Gather a ``PixelLoss`` module's parameters into :class:`PixelHeadWeights` (contiguous, detached).

    ``dtype`` converts every tensor (default: keep the module's dtype). A missing qkv bias becomes zeros.
    """
    m = pixel_loss
    ref = m.cond_proj.weight
    width = ref.shape[0]
    blocks = list(m.blocks)
    hidden = blocks[0].mlp.fc1.weight.shape[0] if blocks else 4 * width

    def qkv_bias(block):
        b = block.attn.qkv.bias
        return b if b is not None else torch.zeros(3 * width, dtype=ref.dtype, device=ref.device)

    w = PixelHeadWeights(
        cond_w=m.cond_proj.weight.detach().contiguous(),
        cond_b=m.cond_proj.bias.detach().contiguous(),
        codebooks=torch.stack([m.r_codebook.weight, m.g_codebook.weight, m.b_codebook.weight]).detach().contiguous(),
        mlm_bias=torch.cat([m.r_mlm.bias, m.g_mlm.bias, m.b_mlm.bias]).detach().contiguous(),
        ln_w=m.ln.weight.detach().contiguous(),
        ln_b=m.ln.bias.detach().contiguous(),
        norm1_w=_stack([b.norm1.weight for b in blocks], (width,), ref),
        norm1_b=_stack([b.norm1.bias for b in blocks], (width,), ref),
        qkv_w=_stack([b.attn.qkv.weight for b in blocks], (3 * width, width), ref),
        qkv_b=_stack([qkv_bias(b) for b in blocks], (3 * width,), ref),
        proj_w=_stack([b.attn.proj.weight for b in blocks], (width, width), ref),
        proj_b=_stack([b.attn.proj.bias for b in blocks], (width,), ref),
        norm2_w=_stack([b.norm2.weight for b in blocks], (width,), ref),
        norm2_b=_stack([b.norm2.bias for b in blocks], (width,), ref),
        fc1_w=_stack([b.mlp.fc1.weight for b in blocks], (hidden, width), ref),
        fc1_b=_stack([b.mlp.fc1.bias for b in blocks], (hidden,), ref),
        fc2_w=_stack([b.mlp.fc2.weight for b in blocks], (width, hidden), ref),
        fc2_b=_stack([b.mlp.fc2.bias for b in blocks], (width,), ref),
        norm_w=m.norm.weight.detach().contiguous(),
        norm_b=m.norm.bias.detach().contiguous(),
    )
    if dtype is not None:
        w = PixelHeadWeights(*(t.to(dtype) for t in w))
    return w


def pixel_head_hidden_reference(tokens: torch.Tensor, weights: PixelHeadWeights, num_heads: int) -> torch.Tensor:
    """Final normalised hidden states ``[R, T, W]`` of embedded tokens ``[R, T, W]`` (causal, fp32)."""
    w = PixelHeadWeights(*(t.float() for t in weights))
    rows, seq, width = tokens.shape
    head_dim = width // num_heads
    x = F.layer_norm(tokens.float(), (width,), w.ln_w, w.ln_b, LN_EPS)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
    for d in range(w.qkv_w.shape[0]):
        h = F.layer_norm(x, (width,), w.norm1_w[d], w.norm1_b[d], LN_EPS)
        qkv = F.linear(h, w.qkv_w[d], w.qkv_b[d]).reshape(rows, seq, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [R, H, T, Dh]
        scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        o = (probs @ v).transpose(1, 2).reshape(rows, seq, width)
        x = x + F.linear(o, w.proj_w[d], w.proj_b[d])
        h = F.layer_norm(x, (width,), w.norm2_w[d], w.norm2_b[d], LN_EPS)
        x = x + F.linear(F.gelu(F.linear(h, w.fc1_w[d], w.fc1_b[d])), w.fc2_w[d], w.fc2_b[d])
    return F.layer_norm(x, (width,), w.norm_w, w.norm_b, LN_EPS)


def pixel_head_sample_reference(
    cond: torch.Tensor,
    weights: PixelHeadWeights,
    num_heads: int,
    *,
    guided: bool,
    cfg: CfgLike,
    inv_temperature: float,
    filter_threshold: float,
    top_p: float,
    uniforms: Optional[torch.Tensor],
    greedy: bool = False,
    return_logits: bool = False,
    exponentials: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Sample R, G, B ids ``[B, 3]`` (int64) for conditions ``cond`` (``[2B, C]`` cond rows then uncond rows
    when ``guided``, else ``[B, C]``).

    Channel ``c`` draws from ``sample_logits_reference(logits[:B], logits[B:] or None, ...)`` with uniforms
    ``uniforms[c]`` (``[3, B]``; unused when ``greedy``); the id drawn for pixel ``b`` becomes the next token of
    both row ``b`` and row ``B + b``. A pixel whose channel-``c`` logits have no finite value (e.g. a NaN
    condition) gets id -1 for channel ``c`` and every later channel (they would condition on it).
    ``return_logits`` also returns the raw logits ``[3, rows, 256]`` (before temperature / CFG).
    ``exponentials`` ``[3, B, 256]`` (Exp(1) noise, instead of ``uniforms``): channel ``c`` draws
    ``argmax(probs / exponentials[c])``, the algorithm of ``torch.multinomial(probs, 1)``, which with the noise
    it would draw (``torch.empty_like(probs).exponential_()``) picks exactly the same index.
    """
    w = PixelHeadWeights(*(t.float() for t in weights))
    rows = cond.shape[0]
    bsz = rows // 2 if guided else rows
    device = cond.device
    tokens = [F.linear(cond.float(), w.cond_w, w.cond_b)]  # [rows, W] per token
    ids = torch.full((bsz, 3), -1, dtype=torch.int64, device=device)
    dead = torch.zeros(bsz, dtype=torch.bool, device=device)
    all_logits = []
    for c in range(3):
        h = pixel_head_hidden_reference(torch.stack(tokens, dim=1), w, num_heads)[:, c]  # [rows, W]
        logits = h @ w.codebooks[c].t() + w.mlm_bias[c]  # [rows, 256]
        all_logits.append(logits)
        race = exponentials is not None and not greedy
        drawn, probs = sample_logits_reference(
            logits[:bsz], logits[bsz:] if guided else None, cfg=cfg, inv_temperature=inv_temperature,
            filter_threshold=filter_threshold, top_p=top_p, top_k=0,
            uniforms=torch.zeros(bsz, device=device) if race else None if uniforms is None else uniforms[c],
            greedy=greedy)
        if race:  # the inverse-CDF draw above only told which rows are valid
            drawn = torch.where(drawn >= 0, (probs / exponentials[c].float()).argmax(dim=-1), drawn)
        drawn = torch.where(dead, torch.full_like(drawn, -1), drawn)
        dead = dead | (drawn < 0)
        ids[:, c] = drawn
        if c < 2:
            nxt = drawn.clamp(min=0)  # a dead pixel's placeholder token; its ids stay -1 anyway
            if guided:
                nxt = torch.cat([nxt, nxt])
            tokens.append(w.codebooks[c][nxt])
    if return_logits:
        return ids, torch.stack(all_logits)
    return ids
