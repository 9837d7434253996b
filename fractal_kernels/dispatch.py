"""Backend choice for every op: CUDA extension -> Triton -> PyTorch, forceable, and visible.

``resolve(op, backend, device)`` returns the backend that will run:

* ``"torch"``, ``"triton"``, ``"cuda"`` force one (an unavailable forced backend is an error that says why);
* ``None``/``"auto"`` (or the ``FRACTAL_KERNELS_BACKEND`` environment variable) picks: on a CUDA tensor the
  CUDA extension if it is built *and* the op is listed as verified on a real GPU
  (``benchmarks/results/cuda_verified.json``), else Triton, else PyTorch; on a CPU tensor PyTorch (the
  Triton interpreter, ``TRITON_INTERPRET=1``, is for testing and must be forced).

``last_backend(op)`` tells which backend ran last for an op; ``FRACTAL_KERNELS_VERBOSE=1`` prints each choice.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "torch")
# op name -> the function of fractal_kernels._C that implements its CUDA path
CUDA_SYMBOLS = {"sample_logits": "sample_logits", "pixel_cross_entropy": "ce_rows",
                "tiny_attention": "tiny_attention_fwd"}
_LAST: Dict[str, str] = {}
_VERIFIED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                              "results", "cuda_verified.json")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op here."""


def _cuda_ext():
    try:
        return importlib.import_module("fractal_kernels._C")
    except ImportError:
        return None


def _cuda_extension() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    if _cuda_ext() is None:
        return False, "CUDA extension not built; build with FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation"
    return True, "compiled extension fractal_kernels._C"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton() -> Tuple[bool, str]:
    try:
        import triton
    except ImportError:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name(0)}"
    if triton_interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors, slow)"
    return False, f"triton {triton.__version__} installed but no GPU (set TRITON_INTERPRET=1 for the CPU interpreter)"


def backend_report() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (available, reason)}`` for this process."""
    return {"cuda": _cuda_extension(), "triton": _triton(), "torch": (True, f"torch {torch.__version__}")}


def available_backends() -> List[str]:
    """Backends usable here, in dispatch preference order."""
    return [name for name, (ok, _) in backend_report().items() if ok]


def cuda_verified_ops() -> List[str]:
    """Ops whose CUDA kernels passed their tests on a real GPU (recorded by the GPU test run)."""
    try:
        with open(_VERIFIED_FILE) as f:
            return list(json.load(f).get("ops", []))
    except (OSError, ValueError):
        return []


def resolve(op: str, backend: Optional[str], device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` (see module docstring); records it for ``last_backend``."""
    choice = backend or os.environ.get("FRACTAL_KERNELS_BACKEND") or "auto"
    if choice not in BACKENDS + ("auto",):
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'torch', got {choice!r}")
    if choice == "cuda":
        ext = _cuda_ext()
        if device.type != "cuda":
            raise BackendUnavailable(f"{op}: backend 'cuda' needs CUDA tensors, got {device.type} tensors")
        if ext is None or not hasattr(ext, CUDA_SYMBOLS.get(op, op)):
            raise BackendUnavailable(f"{op}: backend 'cuda' unavailable: {_cuda_extension()[1]}")
    elif choice == "triton":
        ok, why = _triton()
        if not ok:
            raise BackendUnavailable(f"{op}: backend 'triton' unavailable: {why}")
        if device.type != "cuda" and not triton_interpreting():
            raise BackendUnavailable(f"{op}: backend 'triton' on {device.type} tensors needs TRITON_INTERPRET=1")
    elif choice == "auto":
        choice = "torch"
        if device.type == "cuda":
            ext = _cuda_ext()
            if ext is not None and hasattr(ext, CUDA_SYMBOLS.get(op, op)) and op in cuda_verified_ops():
                choice = "cuda"
            elif _triton()[0]:
                choice = "triton"
    return record(op, choice)


def record(op: str, choice: str) -> str:
    """Note that ``choice`` runs ``op`` (for ``last_backend`` and ``FRACTAL_KERNELS_VERBOSE``); returns it.
    Ops call it directly for choices outside the three backends (e.g. "sdpa" for long attention)."""
    _LAST[op] = choice
    if os.environ.get("FRACTAL_KERNELS_VERBOSE") == "1":
        print(f"fractal_kernels: {op} -> {choice}", file=sys.stderr)
    return choice


def last_backend(op: str) -> Optional[str]:
    """The backend that ran ``op`` most recently in this process (None if it has not run)."""
    return _LAST.get(op)
