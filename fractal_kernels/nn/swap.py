""":func:`swap_attention`: put the tiny-attention kernels into a FractalGen model built from the public reference
code (LTH14/fractalgen) or from ``fractal_models``, keeping every parameter name.

The drop-ins (:mod:`fractal_kernels.nn.attention`, :mod:`fractal_kernels.nn.rope_attention`) keep the
reference's parameter names (``qkv``/``proj`` for the MAR level and the pixel head, ``wqkv``/``wo`` for the AR
level) and run the reference math on ``backend="torch"`` or the kernels otherwise:

* MAR ``Attention`` (bidirectional, fp32 scores) -> :class:`fractal_kernels.nn.Attention`;
* pixel head ``CausalAttention`` -> :class:`fractal_kernels.nn.CausalAttention`;
* AR (LlamaGen-style) ``Attention`` -> :class:`fractal_kernels.nn.RoPEAttention` (2-D RoPE; with the drop-in's
  KV cache its decode steps run the decode kernel with RoPE inside; full-sequence calls from any model).

``fractal_models`` builds its levels from these same classes, so its models are drop-ins already (switched in
place). :func:`swap_attention` replaces every other such module of a model in place, weights included, so a
checkpoint of the original model still loads into the swapped one (``strict=True``).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from fractal_kernels.nn.attention import Attention, CausalAttention
from fractal_kernels.nn.backend import BACKENDS
from fractal_kernels.nn.rope_attention import Attention as RoPEAttention
from fractal_kernels.nn.rope_attention import AttentionArgs


def _converted(module: nn.Module, backend: str) -> Optional[nn.Module]:
    if isinstance(module, (Attention, CausalAttention, RoPEAttention)):
        module.backend = backend
        return None  # already a drop-in: switched in place
    names = {n for n, _ in module.named_children()}
    if {"qkv", "proj"} <= names and hasattr(module, "num_heads"):
        dim = module.qkv.in_features
        cls = CausalAttention if "causal" in type(module).__name__.lower() else Attention
        attn_drop = getattr(getattr(module, "attn_drop", None), "p", 0.0)
        proj_drop = getattr(getattr(module, "proj_drop", None), "p", 0.0)
        new = cls(dim, module.num_heads, qkv_bias=module.qkv.bias is not None, attn_drop=attn_drop,
                  proj_drop=proj_drop)
    elif {"wqkv", "wo"} <= names and hasattr(module, "n_head"):
        dim = module.wqkv.in_features
        resid = getattr(getattr(module, "resid_dropout", None), "p", 0.1)
        new = RoPEAttention(AttentionArgs(dim=dim, n_head=module.n_head,
                                          attn_dropout_p=getattr(module, "attn_dropout_p", 0.0),
                                          resid_dropout_p=resid))
    else:
        return None
    param = next(module.parameters())
    new = new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(module.state_dict(), strict=True)
    new.train(module.training)
    new.backend = backend
    return new


def swap_attention(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace the attention modules of ``model`` (in place) with the kernel drop-ins on ``backend``
    ("torch" | "auto" | "triton" | "cuda"); returns ``model``. Parameters and their names are unchanged."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _converted(child, backend)
            if new is not None:
                setattr(parent, name, new)
    return model
