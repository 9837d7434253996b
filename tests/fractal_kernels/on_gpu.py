"""Kernel tests on a GPU (issue #27, item 4): the interpreter suite's tests, unchanged, with every Triton launch
run on CUDA tensors.

On a machine with a GPU ``tests/conftest.py`` leaves the interpreter off, so a test that calls a Triton kernel
on CPU tensors (``backend="triton"`` or a launcher) would raise ``BackendUnavailable``. Inside
:func:`cpu_tests_on_cuda` instead:

* every Triton launch (``JITFunction.run``) gets CUDA copies of its CPU tensor arguments -- each CPU storage
  copied once, views rebuilt with the same sizes, strides and offset, so aliasing and strided views stay as the
  launcher computed them -- runs compiled for the GPU, and every storage it was given is copied back (outputs,
  in-place caches, workspaces), so the test compares on the CPU against the same references and tolerances;
* the dispatcher lets ``backend="triton"`` through for CPU tensors (its ``triton_interpreting`` check only; the
  launchers still see the interpreter off, so they pick the GPU configurations: ``interpret`` defaults to
  "CPU tensors under the interpreter");
* launchers specialise for the GPU's architecture (``fractal_kernels._target.target_arch``), not the CPU
  default.

Tests that make CUDA tensors themselves (``kernel_device``) pass through untouched. Host code that branches on
``tensor.device.type == "cuda"`` sees CPU tensors here; the launchers' configuration choice does not depend on
it (``*_config(..., interpret=...)``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Tuple

import torch


class _Storages:
    """Copies on ``device`` of the CPU storages handed to one launch (one per (storage, dtype)); ``device`` may
    be the CPU itself (the shim's own test on a machine without a GPU: distinct copies all the same)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copies: Dict[Tuple[int, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}

    def to_device(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return t
        st = t.untyped_storage()
        key = (st.data_ptr(), t.dtype)
        if key not in self.copies:
            flat = torch.empty(0, dtype=t.dtype).set_(st, 0, (st.nbytes() // t.element_size(),), (1,))
            self.copies[key] = (flat, flat.to(self.device, copy=True))
        return self.copies[key][1].as_strided(t.size(), t.stride(), t.storage_offset())

    def copy_back(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for flat, dev in self.copies.values():
            flat.copy_(dev)


def launch_on(run: Callable, device: torch.device) -> Callable:
    """``run`` (a kernel class's ``run(self, *args, grid, warmup, **kwargs)``) with its CPU tensor arguments
    copied to ``device`` and copied back after the launch."""

    def run_on_device(self, *args, grid, warmup, **kwargs):
        st = _Storages(device)
        with torch.no_grad():
            args = [st.to_device(a) for a in args]
            kwargs = {k: st.to_device(v) for k, v in kwargs.items()}
            with (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
                out = run(self, *args, grid=grid, warmup=warmup, **kwargs)
            st.copy_back()
        return out
    return run_on_device


@contextlib.contextmanager
def cpu_tests_on_cuda(monkeypatch, device: torch.device) -> Iterator[None]:
    """Inside: Triton launches with CPU tensors run on ``device`` (module docstring)."""
    from triton.runtime.jit import JITFunction

    from fractal_kernels import dispatch
    from fractal_kernels._target import device_arch, target_arch

    monkeypatch.setattr(JITFunction, "run", launch_on(JITFunction.run, device))
    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: True)
    with target_arch(device_arch(device)):
        yield
