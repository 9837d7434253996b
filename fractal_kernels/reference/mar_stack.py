"""Reference math of :func:`fractal_kernels.ops.mar_stack.mar_block_stack`: a MAR level's transformer blocks and
its final LayerNorm (``fractal_models.mar.MAR``: pre-LN ViT blocks, full bidirectional attention, exact GELU).

Per block: ``x = x + proj(attn(LN1(x)))``, ``x = x + fc2(gelu(fc1(LN2(x))))``; then ``LN(x)``. All math in fp32.
Each linear's input is rounded to the weight dtype first (what autocast does before a 16-bit GEMM; a no-op for
fp32 weights), the products are then exact in fp32 and accumulate in fp32; the outputs stay fp32 (autocast
would round them to 16 bits: this op keeps them, so it is closer to the fp32 model than autocast is).
Attention scores and softmax in fp32 (``q k^T * head_dim ** -0.5``). A NaN anywhere in a sequence reaches every
token of it through the attention (as in the model).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MarStackWeights(NamedTuple):
    """A MAR level's block stack, per-block tensors stacked on a leading ``[depth]`` dim (``D`` = width,
    ``M`` = MLP hidden width). The four matrices are in the pack dtype; LayerNorm params and biases fp32."""
    norm1_w: torch.Tensor  # [depth, D]
    norm1_b: torch.Tensor  # [depth, D]
    qkv_w: torch.Tensor    # [depth, 3D, D]
    qkv_b: torch.Tensor    # [depth, 3D]   (zeros where the module has no qkv bias)
    proj_w: torch.Tensor   # [depth, D, D]
    proj_b: torch.Tensor   # [depth, D]
    norm2_w: torch.Tensor  # [depth, D]
    norm2_b: torch.Tensor  # [depth, D]
    fc1_w: torch.Tensor    # [depth, M, D]
    fc1_b: torch.Tensor    # [depth, M]
    fc2_w: torch.Tensor    # [depth, D, M]
    fc2_b: torch.Tensor    # [depth, D]
    norm_w: torch.Tensor   # [D]  the level's final LayerNorm
    norm_b: torch.Tensor   # [D]
    eps: float             # LayerNorm eps (the same for every norm of the level)


def _stack(ts, shape, dtype, like) -> torch.Tensor:
    if not ts:  # depth 0: the final norm only
        return torch.zeros((0,) + tuple(shape), dtype=dtype, device=like.device)
    return torch.stack([t.detach().to(dtype) for t in ts]).contiguous()


def pack_mar_stack(blocks: Sequence[torch.nn.Module], norm: torch.nn.Module, dtype: torch.dtype) -> MarStackWeights:
    """Gather a MAR level's blocks (duck-typed: ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
    ``mlp.fc2``) and final LayerNorm ``norm`` into :class:`MarStackWeights`; matrices in ``dtype`` (fp32, bf16
    or fp16), the rest fp32. Every LayerNorm must have the same eps (the kernel takes one)."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype: expected one of {WEIGHT_DTYPES}, got {dtype}")
    blocks = list(blocks)
    ref = norm.weight
    width = ref.shape[0]
    f32 = torch.float32
    eps = float(norm.eps)
    for i, b in enumerate(blocks):
        for name in ("norm1", "norm2"):
            if float(getattr(b, name).eps) != eps:
                raise ValueError(f"blocks[{i}].{name}: eps {getattr(b, name).eps} differs from norm's {eps} "
                                 f"(the fused stack takes one eps)")
    hidden = blocks[0].mlp.fc1.weight.shape[0] if blocks else 4 * width

    def qkv_bias(b):
        bias = b.attn.qkv.bias
        return bias if bias is not None else torch.zeros(3 * width, device=ref.device)

    return MarStackWeights(
        norm1_w=_stack([b.norm1.weight for b in blocks], (width,), f32, ref),
        norm1_b=_stack([b.norm1.bias for b in blocks], (width,), f32, ref),
        qkv_w=_stack([b.attn.qkv.weight for b in blocks], (3 * width, width), dtype, ref),
        qkv_b=_stack([qkv_bias(b) for b in blocks], (3 * width,), f32, ref),
        proj_w=_stack([b.attn.proj.weight for b in blocks], (width, width), dtype, ref),
        proj_b=_stack([b.attn.proj.bias for b in blocks], (width,), f32, ref),
        norm2_w=_stack([b.norm2.weight for b in blocks], (width,), f32, ref),
        norm2_b=_stack([b.norm2.bias for b in blocks], (width,), f32, ref),
        fc1_w=_stack([b.mlp.fc1.weight for b in blocks], (hidden, width), dtype, ref),
        fc1_b=_stack([b.mlp.fc1.bias for b in blocks], (hidden,), f32, ref),
        fc2_w=_stack([b.mlp.fc2.weight for b in blocks], (width, hidden), dtype, ref),
        fc2_b=_stack([b.mlp.fc2.bias for b in blocks], (width,), f32, ref),
        norm_w=norm.weight.detach().to(f32).contiguous(),
        norm_b=norm.bias.detach().to(f32).contiguous(),
        eps=eps,
    )


def _linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the input rounded to the weight dtype (autocast's cast), exact products, accumulation in a's dtype (fp32;
    # fp64 for the tests' rounding-faithful reference)
    cd = a.dtype
    return F.linear(a.to(w.dtype).to(cd), w.to(cd), b.to(cd))


def mar_block_stack_reference(x: torch.Tensor, weights: MarStackWeights, num_heads: int, *,
                              compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` ``[N, L, D]`` through every block of ``weights`` and the final norm; ``[N, L, D]`` in x's dtype.

    ``compute_dtype`` float64 gives the tests a reference that rounds only where the kernel rounds (each linear's
    input to the weight dtype, the output to x's dtype) and is otherwise exact, so a check against it does not
    depend on the CPU's fp32 summation order."""
    w = weights
    n, seq, width = x.shape
    dh = width // num_heads
    eps = w.eps
    cd = compute_dtype
    h = x.to(cd)
    for d in range(w.qkv_w.shape[0]):
        a = F.layer_norm(h, (width,), w.norm1_w[d].to(cd), w.norm1_b[d].to(cd), eps)
        qkv = _linear(a, w.qkv_w[d], w.qkv_b[d])  # [N, L, 3D]
        q, k, v = qkv.reshape(n, seq, 3, num_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, Dh]
        p = torch.softmax((q @ k.transpose(-2, -1)) * dh ** -0.5, dim=-1)
        o = (p @ v).transpose(1, 2).reshape(n, seq, width)
        h = h + _linear(o, w.proj_w[d], w.proj_b[d])
        a = F.layer_norm(h, (width,), w.norm2_w[d].to(cd), w.norm2_b[d].to(cd), eps)
        h = h + _linear(F.gelu(_linear(a, w.fc1_w[d], w.fc1_b[d])), w.fc2_w[d], w.fc2_b[d])
    return F.layer_norm(h, (width,), w.norm_w.to(cd), w.norm_b.to(cd), eps).to(x.dtype)
