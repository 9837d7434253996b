"""Backend choice for every op: CUDA extension -> Triton -> PyTorch, forceable, and visible.

``resolve(op, backend, device)`` returns the backend that will run:

* ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"`` force one (an unavailable forced backend is an error that
  says why);
* ``None``/``"auto"`` (or the ``FRACTAL_KERNELS_BACKEND`` environment variable) picks: on a CUDA tensor the
  CUDA extension if it is built *and* the op is listed as verified on a real GPU
  (``benchmarks/results/cuda_verified.json``), else Triton, else PyTorch; on a CPU tensor the compiled C++
  CPU kernel for the ops that have one (``CPU_OPS``, see :mod:`fractal_kernels.cpu`) when it builds here,
  else PyTorch (the Triton interpreter, ``TRITON_INTERPRET=1``, is for testing and must be forced).

``last_backend(op)`` tells which backend ran last for an op; ``FRACTAL_KERNELS_VERBOSE=1`` prints each choice.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")
# ops with a compiled C++ CPU kernel (fractal_kernels/cpu): where PyTorch's per-op dispatch dominates on a CPU
CPU_OPS = ("pixel_head_sample",)
# op name -> the function of fractal_kernels._C that implements its CUDA path
CUDA_SYMBOLS = {"sample_logits": "sample_logits", "pixel_cross_entropy": "ce_rows",
                "tiny_attention": "tiny_attention_fwd"}
_LAST: Dict[str, str] = {}
_VERIFIED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                              "results", "cuda_verified.json")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op here."""


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JIT: Dict[str, object] = {}


def cuda_sources(root: str = _REPO) -> List[str]:
    """The extension's sources (every ``csrc/**/*.cu`` and ``*.cpp``), as ``setup.py`` and CMake build them."""
    import glob
    csrc = os.path.join(root, "csrc")
    return sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True)
                  + glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))


def _jit_build():
    """Compile the extension on first use with ``torch.utils.cpp_extension.load`` (``FRACTAL_KERNELS_JIT=1``):
    the fallback when ``fractal_kernels._C`` was not built at install time. Needs a CUDA torch, nvcc and the
    ``csrc/`` sources (a source checkout or editable install); minutes the first time, cached after."""
    if "ext" not in _JIT:
        _JIT["ext"] = None
        sources = cuda_sources()
        if not sources:
            _JIT["why"] = "no csrc/ sources next to the package (JIT needs a source checkout)"
            return None
        try:
            from torch.utils.cpp_extension import load
            _JIT["ext"] = load(name="fractal_kernels_C", sources=sources,
                               extra_include_paths=[os.path.join(_REPO, "csrc")], extra_cflags=["-O3"],
                               extra_cuda_cflags=["-O3", "-lineinfo"],
                               verbose=os.environ.get("FRACTAL_KERNELS_VERBOSE") == "1")
        except Exception as e:  # a failed build degrades to Triton/PyTorch, and says why
            _JIT["why"] = f"JIT build failed: {type(e).__name__}: {str(e)[:300]}"
            print(f"fractal_kernels: CUDA extension {_JIT['why']}", file=sys.stderr)
    return _JIT["ext"]


def _cuda_ext():
    try:
        return importlib.import_module("fractal_kernels._C")
    except ImportError:
        if os.environ.get("FRACTAL_KERNELS_JIT") == "1" and torch.cuda.is_available():
            return _jit_build()
        return None


def _cuda_extension() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    if _cuda_ext() is None:
        if "why" in _JIT:
            return False, f"CUDA extension: {_JIT['why']}"
        return False, ("CUDA extension not built; build with FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . "
                       "--no-build-isolation, or set FRACTAL_KERNELS_JIT=1 to compile it on first use")
    return True, "compiled extension fractal_kernels._C"


def _cpu_kernels() -> Tuple[bool, str]:
    from fractal_kernels import cpu
    return cpu.status()


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
    return {"cuda": _cuda_extension(), "triton": _triton(), "cpu": _cpu_kernels(),
            "torch": (True, f"torch {torch.__version__}")}


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
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'cpu', 'torch', got {choice!r}")
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
    elif choice == "cpu":
        if op not in CPU_OPS:
            raise BackendUnavailable(f"{op}: backend 'cpu' has no kernel for this op (compiled CPU kernels: "
                                     f"{', '.join(CPU_OPS)}); use 'torch' or None")
        if device.type != "cpu":
            raise BackendUnavailable(f"{op}: backend 'cpu' needs CPU tensors, got {device.type} tensors")
        ok, why = _cpu_kernels()
        if not ok:
            raise BackendUnavailable(f"{op}: backend 'cpu' unavailable: {why}")
    elif choice == "auto":
        choice = "torch"
        if device.type == "cpu" and op in CPU_OPS and _cpu_kernels()[0]:
            choice = "cpu"
        elif device.type == "cuda":
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


def forget(op: Optional[str] = None) -> None:
    """Clear what :func:`last_backend` remembers for ``op`` (every op if None), so a caller can tell which ops
    ran, and where, inside a block (the benchmarks do, to fail a row that fell back to another backend)."""
    if op is None:
        _LAST.clear()
    else:
        _LAST.pop(op, None)
