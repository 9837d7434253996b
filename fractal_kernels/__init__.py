"""fractal-kernels: fused kernels for fractal generative models, their dispatch and reference math.

Ops (each dispatches CUDA extension -> Triton -> PyTorch; ``backend=`` forces one):

* :func:`sample_logits` -- the pixel head's fused CFG + filter + temperature + top-k/top-p sampler;
* :func:`pixel_head_sample` -- the whole pixel head (condition -> R, G, B ids: transformer, logits and sampler
  for all three channels) in one Triton launch;
* :func:`pixel_cross_entropy` / :func:`pixel_log_probs` -- fused logits + cross-entropy / log-probabilities;
* :func:`tiny_attention`, :func:`tiny_attention_packed`, :func:`tiny_attention_decode` -- attention over many
  tiny sequences (forward/backward, packed qkv, KV-cache decode with fused RoPE);
* :func:`mar_block_stack` / :func:`ar_block_stack_decode` -- a whole level step of a small MAR / AR level (every
  block and the final norm; the AR step KV-cached) in one Triton launch, weights from :func:`pack_mar_stack` /
  :func:`pack_ar_stack`;
* :func:`fused_linear` -- a linear over many rows with the LayerNorm before it and the bias, GELU or residual add
  after it in one launch (the MAR levels at large batch);
* :func:`skinny_linear` -- a linear over few rows (AR decode steps) spread over every SM, with the RMSNorm
  before it, SwiGLU's gate and the residual add fused;
* :func:`swap_attention` (``fractal_kernels.nn``, with the ``nn.Module`` drop-ins) -- put the attention kernels
  into a model in place.

``fractal_kernels.reference`` holds the pure-PyTorch math of every op.
"""
from fractal_kernels.dispatch import available_backends, backend_report, last_backend
from fractal_kernels.ops.pixel_cross_entropy import pixel_cross_entropy, pixel_log_probs
from fractal_kernels.ops.pixel_head import pixel_head_sample
from fractal_kernels.ops.sample_logits import sample_logits
from fractal_kernels.ops.tiny_attention import tiny_attention, tiny_attention_decode, tiny_attention_packed
from fractal_kernels.ops.mar_stack import mar_block_stack, pack_mar_stack
from fractal_kernels.ops.ar_stack import ar_block_stack_decode, ar_stack_cache, pack_ar_stack
from fractal_kernels.ops.skinny_linear import skinny_linear
from fractal_kernels.ops.fused_linear import fused_linear
from fractal_kernels.nn import swap_attention

__version__ = "0.1.0"
"""The package version (PEP 440), the same as the distribution's."""
__all__ = ["ar_block_stack_decode", "ar_stack_cache", "available_backends", "backend_report", "fused_linear",
           "last_backend",
           "mar_block_stack", "pack_ar_stack", "pack_mar_stack", "pixel_cross_entropy", "pixel_head_sample",
           "pixel_log_probs", "sample_logits", "skinny_linear", "swap_attention", "tiny_attention", "tiny_attention_decode",
           "tiny_attention_packed", "__version__"]
