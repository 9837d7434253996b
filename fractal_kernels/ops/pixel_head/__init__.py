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

Layers (each imports only the ones above it):

* :mod:`.kernels` -- the ``@triton.jit`` pixel-head kernel and its inlined helpers; only with triton;
* :mod:`.launch` -- the launch configuration (:func:`pixel_head_config`), the Triton and C++ CPU launchers and the
  input checks;
* :mod:`.register` -- the ``torch.library`` custom op ``fractal_kernels::pixel_head_sample`` and its fake kernel;
* :mod:`.api` -- the public :func:`pixel_head_sample` (its backend choice: ``fractal_kernels.dispatch.choose_pixel_head``).

This package re-exports their names, so ``fractal_kernels.ops.pixel_head.X`` keeps working; patch a name
where it is looked up (e.g. ``pixel_head.launch._pixel_head_kernel``).
"""
from fractal_kernels.dispatch import BackendUnavailable, record, resolve  # noqa: F401 (old import paths)
from fractal_kernels.dispatch import PIXEL_HEAD_TRITON_W
from fractal_kernels.dispatch import pixel_head_triton_supports as _kernel_supports  # noqa: F401
from fractal_kernels.ops.pixel_head.kernels import HAS_TRITON  # noqa: F401
from fractal_kernels.ops.pixel_head.launch import (_TRANSPOSED, PixelHeadConfig, _check, _check_weights,  # noqa: F401
                                                   _gpu_launch, _launch_cpu, _launch_triton,
                                                   _shape, _sm_count, _transposed_cpu,
                                                   pixel_head_config)
from fractal_kernels.ops.pixel_head.register import _pixel_head_op  # noqa: F401
from fractal_kernels.ops.pixel_head.api import _choose, pixel_head_sample  # noqa: F401
from fractal_kernels.ops.pixel_head import api, kernels, launch, register  # noqa: F401

MIN_W, MAX_W = PIXEL_HEAD_TRITON_W

if HAS_TRITON:
    from fractal_kernels.ops.pixel_head.kernels import _pixel_head_kernel  # noqa: F401
