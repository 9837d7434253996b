"""Tiny-sequence attention: Triton kernels (forward, backward, KV-cache decode with fused RoPE), their
launchers, the ``torch.library`` custom ops and the public entry points.

Layers (each imports only the ones above it):

* :mod:`.kernels` -- the ``@triton.jit`` kernels and their inlined helpers (only with triton installed);
* :mod:`.launch` -- launch configuration (:func:`_attn_config`), the launchers and the input checks;
* :mod:`.register` -- the ``torch.library`` custom ops, their fake (meta) kernels and autograd;
* :mod:`.api` -- the public entry points (their backend choice: ``fractal_kernels.dispatch.choose_attention``).

This package re-exports the names of all four, so ``fractal_kernels.ops.tiny_attention.X`` keeps working;
patch a name where it is looked up (e.g. ``tiny_attention.launch._attn_fwd_kernel``).

Entry points (q, k, v ``[N, H, L, D]``; any strides with a contiguous head dim, i.e. ``stride(-1) == 1``):

* :func:`tiny_attention` -- bidirectional or causal self-attention, optional per-sequence lengths, autograd.
* :func:`tiny_attention_packed` -- reads the qkv projection's output ``[N, L, 3*H*D]`` through strided views
  and returns ``[N, L, H*D]`` for the output projection; its backward writes ``d(qkv)`` in place, so no
  permute/contiguous copy surrounds the kernels either way.
* :func:`tiny_attention_decode` -- causal decode of the last ``Lq`` positions against a KV cache, with the
  AR level's 2-D rotary embedding applied inside the kernel when ``freqs_cis`` is given (forward only).

Numerics: scores ``q k^T * scale`` and the softmax in fp32 whatever the input dtype (the MAR/AR levels'
numerics; the pixel head's reference computes scores in the input dtype, identical in fp32), output in the
input dtype. The log-sum-exp is kept for the backward pass, which accumulates dq, dk, dv in fp32.

Kernel design (memory-bound workload: L ~ 4..64 tokens, ~10 FLOP/byte): for L <= 64 one program takes the
*whole* sequence of ``G = TILE // Lp`` (sequence, head) pairs at once (``Lp`` = L rounded up to a power of
two) as one ``[G*Lp, D]`` tile with a block-diagonal mask, so a tile is never mostly padding (L=4: 16 pairs
per program) and one pass needs no online-softmax loop; the backward does dq, dk, dv in one kernel from
the same tile. Longer sequences stream keys in blocks with an online softmax (backward: one kernel for
dk/dv, one for dq). Tiles, warps and pipelining depth come from :func:`_attn_config` per GPU arch. Under
``TRITON_INTERPRET=1`` (CPU tests) dots run on fp32 operands because the interpreter's bf16 ``tl.dot`` is
wrong, but the production rounding points stay: P is rounded to the 16-bit input dtype before P.V and RoPE
rounds to the input dtype, as on a GPU (the backward's TF32 operand rounding is not emulated).

Dispatch (``fractal_kernels.dispatch``): "torch" runs ``fractal_kernels.reference.attention``; "triton" these
kernels; "cuda" the ``csrc/tiny_attention`` kernels (forward/backward; decode has no CUDA version). ``auto``
on a GPU uses SDPA instead for lengths past the crossover measured by the benchmark
(``attention_crossover.json``, see ``fractal_kernels.policy``), else past the cost MODEL's length for the GPU's
arch (``policy.attention_sdpa_rule``; today none), and always past ``MAX_L`` (``dispatch.ATTENTION_MAX_L``);
``dispatch.explain_attention`` says which decided.
"""
from __future__ import annotations

from fractal_kernels.dispatch import BackendUnavailable, record, resolve  # noqa: F401 (old import paths)
from fractal_kernels.dispatch import ATTENTION_MAX_L as MAX_L  # noqa: F401
from fractal_kernels.dispatch import attention_crossover as _measured_crossover  # noqa: F401
from fractal_kernels.ops.tiny_attention.kernels import (HAS_TRITON, MAX_D, PACK_MAX_L, STREAM_BLOCK,  # noqa: F401
                                                        SUPPORTED_D, TILE)
from fractal_kernels.ops.tiny_attention.launch import (_attn_config, _block_d, _bwd_into, _Cfg,  # noqa: F401
                                                       _check_dtype, _check_head_dim_scale, _check_lens, _check_qkv,
                                                       _check_strides, _dropout_seed, _fwd_into,
                                                       _out_like_heads_last, _packed_layout, _precision, _seed_words,
                                                       _shape, _strides, _triton_bwd, _triton_fwd, _uniform_lens)
from fractal_kernels.ops.tiny_attention.register import (_bwd_op, _decode_op, _fwd_op, _packed_bwd_op,  # noqa: F401
                                                         _packed_fwd_op, _split_qkv)
from fractal_kernels.ops.tiny_attention.api import (_choose, _no_cuda_dropout, _reference, _sdpa,  # noqa: F401
                                                    tiny_attention, tiny_attention_decode, tiny_attention_packed)
from fractal_kernels.ops.tiny_attention import api, kernels, launch, register  # noqa: F401

if HAS_TRITON:
    from fractal_kernels.ops.tiny_attention.kernels import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,  # noqa: F401
                                                            _attn_bwd_packed_kernel, _attn_fwd_kernel)

