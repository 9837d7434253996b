"""Fused pixel sampler: temperature, the reference's low-probability filter, CFG, top-k, top-p, softmax and
the draw in one pass over each row (``[N, V]`` logits, V = 256 for pixels; any V up to 4096).

The public op :func:`sample_logits` validates inputs and dispatches (CUDA -> Triton -> PyTorch, see
``fractal_kernels.dispatch``). The math is
``fractal_kernels.reference.pixel_sampling.sample_logits_reference``; randomness is Philox4x32-10 keyed by
``(seed, offset + row)`` (``fractal_kernels.reference.philox``), identical on every backend.

Numerics: the sampler contract of ``fractal_kernels.reference.pixel_sampling`` (its module docstring). fp32
everywhere (inputs of any float dtype are upcast on load); truncation thresholds are found by a 31-step
bisection on the fp32 bit patterns of the probabilities, so no sort is needed and the result is the exact k-th
value / nucleus boundary; the draw is the contract's exact fixed-point CDF (``_inverse_cdf_draw``, shared with
the pixel head).

Layers (each imports only the ones above it):

* :mod:`.kernels` -- the ``@triton.jit`` sampler kernel and the helpers the other ops' kernels share (Philox,
  sanitising, the top-k/top-p bisection, the inverse-CDF draw, the filter + CFG mix); only with triton;
* :mod:`.launch` -- the Triton launcher and the input checks;
* :mod:`.api` -- the public :func:`sample_logits` and its backend choice (no custom op: the sampler has no autograd).

This package re-exports their names, so ``fractal_kernels.ops.sample_logits.X`` keeps working; patch a name
where it is looked up (e.g. ``sample_logits.api.resolve``).
"""
from fractal_kernels.dispatch import resolve, shape_class  # noqa: F401 (old import paths)
from fractal_kernels.ops.sample_logits.kernels import HAS_TRITON, MAX_V  # noqa: F401
from fractal_kernels.ops.sample_logits.launch import _check, _launch_triton  # noqa: F401
from fractal_kernels.ops.sample_logits.api import sample_logits  # noqa: F401
from fractal_kernels.ops.sample_logits import api, kernels, launch  # noqa: F401

if HAS_TRITON:
    from fractal_kernels.ops.sample_logits.kernels import (_bisect_threshold, _filter_cfg_mix,  # noqa: F401
                                                           _inverse_cdf_draw, _philox_uniform,
                                                           _sample_logits_kernel, _sanitize)
