"""``nn.Module`` drop-ins over the kernels (the layer above ``fractal_kernels.ops``; ops never import it).

* :class:`Attention` -- the MAR level's bidirectional attention; :class:`CausalAttention` -- the pixel head's;
* :class:`RoPEAttention` -- the AR level's (LlamaGen) attention with 2-D RoPE and a :class:`KVCache`;
* :func:`swap_attention` -- replace the attention modules of a reference-code model with these, in place;
* :mod:`fractal_kernels.nn.backend` -- when a module runs the kernels (``use_kernel``) and with which argument.

Parameter names and constructors are the public reference's, so checkpoints load into either.
"""
from fractal_kernels.nn.attention import Attention, CausalAttention
from fractal_kernels.nn.backend import BACKENDS, attn_dropout, autocast_on, kernel_backend, use_kernel
from fractal_kernels.nn.rope_attention import Attention as RoPEAttention
from fractal_kernels.nn.rope_attention import AttentionArgs, KVCache, apply_rotary_emb
from fractal_kernels.nn.swap import swap_attention

__all__ = ["Attention", "AttentionArgs", "BACKENDS", "CausalAttention", "KVCache", "RoPEAttention",
           "apply_rotary_emb", "attn_dropout", "autocast_on", "kernel_backend", "swap_attention", "use_kernel"]
