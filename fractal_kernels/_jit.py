"""The CUDA extension's sources and its build on first use (``FRACTAL_KERNELS_JIT=1``), for
:mod:`fractal_kernels.dispatch`."""
from __future__ import annotations

import os
import sys
from typing import Dict, List

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JIT: Dict[str, object] = {}  # "ext": the built module or None, "why": why the build failed


def cuda_sources(root: str = _REPO) -> List[str]:
    """The extension's sources (every ``csrc/**/*.cu`` and ``*.cpp``), as ``setup.py`` and CMake build them."""
    import glob
    csrc = os.path.join(root, "csrc")
    return sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True)
                  + glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))


def jit_build():
    """Compile the extension on first use with ``torch.utils.cpp_extension.load`` (``FRACTAL_KERNELSJIT=1``):
    the fallback when ``fractal_kernels._C`` was not built at install time. Needs a CUDA torch, nvcc and the
    ``csrc/`` sources (a source checkout or editable install); minutes the first time, cached after."""
    if "ext" not in JIT:
        JIT["ext"] = None
        sources = cuda_sources()
        if not sources:
            JIT["why"] = "no csrc/ sources next to the package (JIT needs a source checkout)"
            return None
        try:
            from torch.utils.cpp_extension import load
            JIT["ext"] = load(name="fractal_kernels_C", sources=sources,
                               extra_include_paths=[os.path.join(_REPO, "csrc")], extra_cflags=["-O3"],
                               extra_cuda_cflags=["-O3", "-lineinfo"],
                               verbose=os.environ.get("FRACTAL_KERNELS_VERBOSE") == "1")
        except Exception as e:  # a failed build degrades to Triton/PyTorch, and says why
            JIT["why"] = f"JIT build failed: {type(e).__name__}: {str(e)[:300]}"
            print(f"fractal_kernels: CUDA extension {JIT['why']}", file=sys.stderr)
    return JIT["ext"]
