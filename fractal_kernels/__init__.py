"""fractal-kernels: fused kernels for fractal generative models, their dispatch and reference math.

Ops (each dispatches CUDA extension -> Triton -> PyTorch; ``backend=`` forces one):

* :func:`sample_logits` -- the pixel head's fused CFG + filter + temperature + top-k/top-p sampler;
* :func:`pixel_cross_entropy` / :func:`pixel_log_probs` -- fused logits + cross-entropy / log-probabilities.

``fractal_kernels.reference`` holds the pure-PyTorch math of every op.
"""
from fractal_kernels.dispatch import available_backends, backend_report, last_backend
from fractal_kernels.ops.pixel_cross_entropy import pixel_cross_entropy, pixel_log_probs
from fractal_kernels.ops.sample_logits import sample_logits

__version__ = "0.1.0"
__all__ = ["available_backends", "backend_report", "last_backend", "pixel_cross_entropy", "pixel_log_probs",
           "sample_logits", "__version__"]
