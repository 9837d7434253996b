"""Backend discovery: which of CUDA extension -> Triton -> PyTorch can run here, and why not.

Kernels register themselves per op and backend; until an op has a kernel, the PyTorch reference is what
runs. ``backend_report()`` is what ``fractalgen info`` prints.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Tuple

import torch

BACKENDS = ("cuda", "triton", "torch")


def _cuda_extension() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    try:
        importlib.import_module("fractal_kernels._C")
    except ImportError as e:
        return False, f"CUDA extension not built ({e}); build with FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e ."
    return True, "compiled extension fractal_kernels._C"


def _triton() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name(0)}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors, slow)"
    return False, f"triton {triton.__version__} installed but no GPU (set TRITON_INTERPRET=1 for the CPU interpreter)"


def backend_report() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (available, reason)}`` for this process."""
    return {"cuda": _cuda_extension(), "triton": _triton(), "torch": (True, f"torch {torch.__version__}")}


def available_backends() -> List[str]:
    """Backends usable here, in dispatch preference order."""
    return [name for name, (ok, _) in backend_report().items() if ok]
