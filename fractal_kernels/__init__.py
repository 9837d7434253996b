"""fractal-kernels: fused kernels for fractal generative models, their dispatch and reference math.

This release ships the pure-PyTorch reference of every op (``fractal_kernels.reference``) and the
dispatcher that reports which backends exist on this machine; the Triton and CUDA kernels plug into it.
"""
from fractal_kernels.dispatch import available_backends, backend_report

__version__ = "0.1.0"
__all__ = ["available_backends", "backend_report", "__version__"]
