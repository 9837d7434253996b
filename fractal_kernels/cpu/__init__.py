"""Compiled CPU kernels: plain C++ built on first use with the system compiler, loaded with ctypes.

Why: on a CPU, FractalGen's tiny ops cost their dispatch, not their FLOPs (a pixel-head call is ~100 PyTorch
ops on tensors of a few hundred elements). A C++ loop over the pixels does the same math in one call. The
sources use no torch headers, so building is one ``c++ -O3 -shared`` call (about a second), not a
torch-extension build; ``ninja`` and the CUDA toolchain are not involved.

The library is cached under ``$FRACTAL_KERNELS_CACHE`` (default ``~/.cache/fractal_kernels``), keyed by a hash
of the source, the compiler and the flags; it is written to a temporary file and renamed, so concurrent
processes never load a half-written file. If no compiler works, :func:`library` returns None, :func:`status`
says why, and the ops fall back to PyTorch (``auto``) or raise (forced ``backend="cpu"``).
``FRACTAL_KERNELS_CPU=0`` turns the compiled kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("pixel_head_cpu.cpp",)
# no -ffast-math (NaN/inf handling must stay exact); -fno-trapping-math lets the compiler vectorise the selects
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math")
_LOCK = threading.Lock()
_STATE: dict = {}


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cache_dir() -> str:
    root = os.environ.get("FRACTAL_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fractal_kernels")
    return root


def _build(cxx: str) -> str:
    paths = [os.path.join(_HERE, s) for s in SOURCES]
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join((cxx,) + FLAGS).encode())
    target_dir = _cache_dir()
    target = os.path.join(target_dir, f"libfractal_kernels_cpu-{digest.hexdigest()[:16]}.so")
    if os.path.exists(target):
        return target
    os.makedirs(target_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, *paths, "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cxx)} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> Tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("FRACTAL_KERNELS_CPU", "1") == "0":
        return None, "compiled CPU kernels disabled (FRACTAL_KERNELS_CPU=0)"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install g++/clang++)"
    try:
        lib = ctypes.CDLL(_build(cxx))
    except Exception as e:  # noqa: BLE001 - any failure means: no compiled CPU kernels, and why
        return None, f"building the CPU kernels failed: {type(e).__name__}: {str(e)[:300]}"
    fn = lib.fk_pixel_head_sample_f32
    p, i64, u64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int
    fn.argtypes = [p, i64, i64, p, i64, i64, i64, i64, c_int, p, f32, f32, f32, f32, c_int, p, p, u64, u64, p, p]
    fn.restype = c_int
    return lib, f"compiled C++ ({os.path.basename(cxx)} {' '.join(FLAGS[:1])})"


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library (built on first call), or None when it cannot be built here."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"], _STATE["why"] = _load()
                if _STATE["lib"] is None and os.environ.get("FRACTAL_KERNELS_CPU", "1") != "0":
                    # auto dispatch then quietly runs the slower PyTorch path: say so once
                    warnings.warn(f"fractal_kernels: compiled CPU kernels unavailable ({_STATE['why']}); CPU ops run "
                                  f"on PyTorch (FRACTAL_KERNELS_CPU=0 silences this)", RuntimeWarning, stacklevel=2)
    return _STATE["lib"]


def status() -> Tuple[bool, str]:
    """(available, reason) of the compiled CPU kernels."""
    library()
    return _STATE["lib"] is not None, _STATE["why"]


def _reset_for_tests() -> None:
    _STATE.clear()
