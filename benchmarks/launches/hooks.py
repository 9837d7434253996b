"""The counting hooks: a ``TorchDispatchMode`` that classifies every ATen op (custom ops re-run inside it), a
``TorchFunctionMode`` for the host/device bookkeeping (factories, moves, fused functions), the Triton launcher
hook, and :func:`counting`, the context manager that installs them."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, List, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .classification import (CUDA_FUSED_FUNCTIONS, CUSTOM_NAMESPACES, FACTORIES, Counts, _DATA_FACTORIES,
                             _device_property, _is_host_device, _mark_host, _tensors, classify, is_host, op_name)


class _State:
    def __init__(self, execute_kernels: bool) -> None:
        self.counts = Counts()
        self.labels: List[str] = ["generate"]
        self.execute_kernels = execute_kernels
        self.suppress = 0  # >0: inside a Triton kernel body / our own bookkeeping: count nothing
        self.host_factory = 0  # >0: inside a factory call without device=: outputs are host tensors
        self.custom_depth = 0

    @property
    def label(self) -> str:
        return self.labels[-1]

    def launch(self, kind: str, n: int = 1) -> None:
        if n:
            self.counts.launches[(self.label, kind)] += n

    def copy(self, kind: str) -> None:
        self.counts.launches[(self.label, kind)] += 1
        self.counts.copies[(self.label, kind)] += 1

    def sync(self, kind: str) -> None:
        self.counts.syncs[(self.label, kind)] += 1


_ACTIVE: List[_State] = []


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if st.suppress:
            return func(*args, **kwargs)
        name = op_name(func)
        if name.split("::")[0] in CUSTOM_NAMESPACES:
            return self._custom(func, name, args, kwargs)
        ins = _tensors(args)
        if kwargs:
            ins += _tensors(kwargs)
        out = func(*args, **kwargs)
        if st.host_factory or (ins and all(is_host(t) for t in ins)):
            _mark_host(out)  # CPU work of the host: no launch, no sync
            return out
        k, c, s = classify(func, args, kwargs, out)
        if name == "copy_" and len(args) > 1 and is_host(args[1]) and args[1].numel() > 1:
            st.copy("memcpy_h2d")  # device tensor written from host data
            st.sync("memcpy_h2d")
            return out
        st.launch(name, k)
        for _ in range(c):
            st.copy("memcpy_d2h")
        for _ in range(s):
            st.sync(name)
        if k:
            for t in ins:
                if t.dim() > 0 and is_host(t):
                    st.counts.unclassified_implicit[(st.label, name)] += 1
        return out

    def _custom(self, func, name, args, kwargs):
        """A custom op: its Python implementation re-run under a fresh mode, so its launcher's ATen ops and its
        Triton launches are counted."""
        from torch._library.custom_ops import OPDEFS
        opdef = OPDEFS.get(name)
        st = self.state
        if opdef is None:  # not ours to look into: one launch
            st.launch(name)
            return func(*args, **kwargs)
        st.labels.append(st.label)  # same level
        st.custom_depth += 1
        try:
            with _DispatchCounter(st):
                out = opdef._init_fn(*args, **kwargs)
        finally:
            st.custom_depth -= 1
            st.labels.pop()
        if not st.execute_kernels:
            st.suppress += 1
            try:
                for t in _tensors(out):
                    t.zero_()
            finally:
                st.suppress -= 1
        return out


class _FunctionCounter(TorchFunctionMode):
    """Host/device bookkeeping at the Python API level (see the module docstring)."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if st.suppress:
            return func(*args, **kwargs)
        if func in CUDA_FUSED_FUNCTIONS:
            if any(not is_host(t) for t in _tensors((args, kwargs))):
                st.launch(CUDA_FUSED_FUNCTIONS[func])
                return self._quiet(func, args, kwargs)
            return func(*args, **kwargs)
        if func in FACTORIES:
            device = kwargs.get("device")
            if device is None or _is_host_device(device):
                st.host_factory += 1
                try:
                    out = func(*args, **kwargs)
                finally:
                    st.host_factory -= 1
                _mark_host(out)
                return out
            if func in _DATA_FACTORIES:
                data = args[0] if args else kwargs.get("data")
                if isinstance(data, torch.Tensor) and not is_host(data):
                    return func(*args, **kwargs)
                out = self._quiet(func, args, kwargs)
                st.copy("memcpy_h2d")
                st.sync("memcpy_h2d")
                return out
            return func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            if isinstance(args[0], torch.Tensor) and not is_host(args[0]):
                st.copy("memcpy_d2h")
                st.sync(f"{func.__name__}")
            return self._quiet(func, args, kwargs)
        return func(*args, **kwargs)

    def _quiet(self, func, args, kwargs):
        self.state.suppress += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.state.suppress -= 1

    def _move(self, func, args, kwargs):
        st = self.state
        src = args[0]
        if func is torch.Tensor.cpu:
            target, dtype, non_blocking = "host", None, bool(kwargs.get("non_blocking", False))
        elif func is torch.Tensor.cuda:
            target, dtype, non_blocking = "device", None, bool(kwargs.get("non_blocking", False))
        else:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            target = None if device is None else "host" if _is_host_device(device) else "device"
        src_host = is_host(src)
        if target is None or (target == "host") == src_host:
            return func(*args, **kwargs)  # no transfer: a dtype cast (dispatched and counted) or a no-op
        # a transfer: one copy (+ a sync when blocking), a dtype change on the device is one more kernel
        st.copy("memcpy_h2d" if src_host else "memcpy_d2h")
        if not non_blocking:
            st.sync("memcpy_h2d" if src_host else "memcpy_d2h")
        if dtype is not None and dtype != src.dtype:
            st.launch("_to_copy")
        st.suppress += 1
        try:
            out = src.to(dtype=dtype or src.dtype, copy=True)
        finally:
            st.suppress -= 1
        if target == "host":
            _mark_host(out)
        return out


def _patch_triton() -> None:
    """Hook the Triton launchers once: a launch under an active counter is recorded (and, in count-only mode,
    not executed); the interpreter's own tensor work inside it is not counted."""
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction
    for cls in (interp.InterpretedFunction, JITFunction):
        if getattr(cls.run, "_fk_launches", False):
            continue
        orig = cls.run

        @functools.wraps(orig)
        def run(self, *args, _orig=orig, **kwargs):
            st = _ACTIVE[-1] if _ACTIVE else None
            if st is None or st.suppress or kwargs.get("warmup"):
                return _orig(self, *args, **kwargs)
            name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")
            st.launch(f"triton:{name}")
            if not st.execute_kernels:
                return None
            st.suppress += 1
            try:
                return _orig(self, *args, **kwargs)
            finally:
                st.suppress -= 1
        run._fk_launches = True
        cls.run = run


@contextlib.contextmanager
def counting(execute_kernels: bool = True, host_tensors: Sequence[torch.Tensor] = ()) -> Iterator[_State]:
    """Count launches/copies/syncs of the code run inside (see the module docstring). ``host_tensors``: tensors
    that exist before the block and live on the host in the simulated run."""
    try:
        _patch_triton()
    except ImportError:
        pass
    st = _State(execute_kernels)
    _mark_host(list(host_tensors))
    _ACTIVE.append(st)
    torch.Tensor.device = property(_device_property)
    try:
        with _FunctionCounter(st), _DispatchCounter(st):
            yield st
    finally:
        del torch.Tensor.device
        _ACTIVE.pop()
