"""Fused pixel logits + cross-entropy (training) and log-probabilities (NLL evaluation).

Computes ``cross_entropy(x @ weight^T + bias, target)`` without keeping ``[N, V]`` fp32 logits or their
gradient alive: rows are processed in chunks of ``CHUNK_ROWS``; per chunk the logits come from one fp32
GEMM, a row kernel (Triton, or CUDA) turns them *in place* into ``softmax - onehot`` while writing the
per-row loss, and two more GEMMs fold that into ``dx`` and ``dweight``/``dbias``. For ``reduction`` "mean"
or "sum" the gradients are produced during the forward pass (nothing but ``dx``, ``dweight``, ``dbias`` is
kept); for "none" the backward recomputes the chunks with the per-row output gradients.

Peak extra memory: one ``[CHUNK_ROWS, V]`` fp32 buffer plus the gradients themselves, versus
``2 x [N, V]`` fp32 for the reference (logits and their gradient). Numerics: fp32 logits, log-sum-exp with
max subtraction, fp32 accumulation of the gradients; outputs are cast back to the inputs' dtypes.

Layers (each imports only the ones above it):

* :mod:`.kernels` -- the ``@triton.jit`` row kernel (loss and ``softmax - onehot`` in place); only with triton;
* :mod:`.launch` -- the row launcher (Triton or CUDA), the chunked GEMM loop (``CHUNK_ROWS``) and the input checks;
* :mod:`.register` -- the autograd function;
* :mod:`.api` -- the public :func:`pixel_cross_entropy` / :func:`pixel_log_probs` and their backend choice.

This package re-exports their names, so ``fractal_kernels.ops.pixel_cross_entropy.X`` keeps working; patch a name
where it is looked up (e.g. ``pixel_cross_entropy.launch.CHUNK_ROWS``).
"""
from fractal_kernels.dispatch import resolve, shape_class  # noqa: F401 (old import paths)
from fractal_kernels.ops.pixel_cross_entropy.kernels import HAS_TRITON  # noqa: F401
from fractal_kernels.ops.pixel_cross_entropy.launch import CHUNK_ROWS, REDUCTIONS, _check, _chunked, _rows  # noqa: F401
from fractal_kernels.ops.pixel_cross_entropy.register import _PixelCrossEntropy  # noqa: F401
from fractal_kernels.ops.pixel_cross_entropy.api import pixel_cross_entropy, pixel_log_probs  # noqa: F401
from fractal_kernels.ops.pixel_cross_entropy import api, kernels, launch, register  # noqa: F401

if HAS_TRITON:
    from fractal_kernels.ops.pixel_cross_entropy.kernels import _ce_rows_kernel  # noqa: F401
