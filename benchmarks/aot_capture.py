"""Replay the library's launchers on a machine without a GPU and record what each Triton launch would compile.

Used by :mod:`benchmarks.aot`. The public ops run on CPU tensors that *report* ``device == cuda`` (a
:class:`GPUView` subclass plus a torch-function mode that turns ``device="cuda"`` factory arguments into CPU
allocations), so every ``device.type == "cuda"`` branch of a launcher takes its GPU side, and inside
``fractal_kernels._target.target_arch(arch)`` every ``device_arch()`` answers ``arch``. ``JITFunction.run`` is
replaced by a recorder: each launch is bound with Triton's own binder for ``GPUTarget("cuda", arch, 32)``
(the code a GPU launch runs: pointer dtypes, i32/i64 ints, ints equal to 1 as constexprs, 16-divisibility of
pointers and ints) and nothing is launched. What the harness patches, and only while capturing:

* ``JITFunction.run`` (the recorder);
* ``fractal_kernels.dispatch._triton`` -> available, so ``backend="triton"`` resolves on these "GPU" tensors
  (the dispatcher's device checks themselves are untouched: the tensors look like CUDA tensors);
* nothing in the launchers. Output buffers are never written (no kernel runs), so the captured calls must not
  depend on kernel outputs; they do not (shapes and strides only).

Must run in a process without ``TRITON_INTERPRET=1`` (then ``triton.jit`` makes interpreter objects and the
launchers take their interpreter branches); :func:`capture` refuses otherwise.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode

_CUDA = torch.device("cuda", 0)


class GPUView(torch.Tensor):
    """A CPU tensor that reports itself as a CUDA tensor (``.device``, ``.is_cuda``); storage stays on the CPU."""

    @property
    def device(self):  # noqa: D401 - property
        return _CUDA

    @property
    def is_cuda(self):
        return True


def _wrap(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, GPUView):
        return x.as_subclass(GPUView)
    if isinstance(x, tuple):
        return tuple(_wrap(e) for e in x)
    if isinstance(x, list):
        return [_wrap(e) for e in x]
    return x


def _is_cuda(d) -> bool:
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(t, torch.Tensor):
                yield t


class CudaOnCPU(TorchFunctionMode):
    """Factories asked for ``device="cuda"`` allocate on the CPU; every tensor an op returns while the mode is on
    is a :class:`GPUView`. The library's custom ops (namespace ``fractal_kernels``) are redispatched below
    the torch-function layer with this mode re-entered, so their Python implementations (which allocate with
    ``device=q.device``) run under it too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name in ("to", "cuda", "new_empty", "new_zeros", "new_full", "new_ones"):
            args = list(args)
            for i, a in enumerate(args):
                if _is_cuda(a):
                    args[i] = "cpu"
            if name == "cuda":
                return _wrap(args[0])
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "fractal_kernels":
            ks = None
            for t in _tensors(args, kwargs):
                k = torch._C._dispatch_keys(t)
                ks = k if ks is None else ks | k
            # drop the fallthrough keys above the autograd kernel (a plain call skips them)
            ks = ks & torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.AutocastCPU)
            ks = ks.remove(torch._C.DispatchKey.ADInplaceOrView)
            # gradients reach the backward ops as plain tensors (autograd's engine makes them in C++): they live
            # on the GPU in a real run, so they are GPUViews here too
            args = [_wrap(a) for a in args]
            kwargs = {k: _wrap(v) for k, v in kwargs.items()}
            with self:
                return _wrap(func.redispatch(ks, *args, **kwargs))
        # everything computed while capturing is GPU data in the run being modelled (the cases make CUDA
        # tensors only), including what autograd's engine hands to a backward as plain tensors
        return _wrap(func(*args, **kwargs))


def backward(out: torch.Tensor) -> None:
    """``out.float().sum().backward()`` with the backward graph run under the current :class:`CudaOnCPU`
    (calling ``Tensor.backward`` would go through the mode's handler, which runs with the mode switched off)."""
    with torch._C.DisableTorchFunctionSubclass():
        loss = out.float().sum()
        ones = torch.ones_like(loss)
    torch.autograd.Variable._execution_engine.run_backward((loss,), (ones,), False, False, (), True, True)


def bind_launch(fn, args, kwargs, arch: int) -> Dict[str, Any]:
    """What ``fn[grid](*args, **kwargs)`` would compile on ``sm_<arch>``: Triton 3.9's own binder and
    ``_pack_args`` with a CUDA backend for that target (no driver needed)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    # JITFunction.run adds these before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    defaults = backend.parse_options({}).__dict__
    # num_warps / num_stages always (the launcher's or Triton's default), plus any other option it passed
    launch_options = {"num_warps": options.num_warps, "num_stages": options.num_stages}
    for k in kwargs:
        if k in defaults and k not in ("debug", "instrumentation_mode", "fpsan_homomorphic_casts"):
            v = getattr(options, k)
            launch_options[k] = list(v) if isinstance(v, tuple) else v
    if options.debug:
        launch_options["debug"] = True
    for path, value in constexprs.items():
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise TypeError(f"{fn.__name__}: constexpr at {path} is a {type(value).__name__}; the AOT record "
                            f"stores plain values only")
    return {
        "kernel": fn.__name__, "module": fn.module, "triton": triton.__version__,
        "signature": dict(signature),
        "constexprs": [[list(p), v] for p, v in sorted(constexprs.items())],
        "attrs": [[list(p), [list(a) for a in v]] for p, v in sorted(attrs.items())],
        "options": launch_options,
        "divisible_16": sorted(fn.arg_names[p[0]] for p, v in attrs.items()
                               if any(a[0] == "tt.divisibility" and a[1] == 16 for a in v)),
        "constexpr_values": {fn.arg_names[p[0]]: v for p, v in constexprs.items()},
    }


def _check_env() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("benchmarks.aot: TRITON_INTERPRET=1 is set; the capture must replay the GPU launch "
                           "path (run it in a process without the interpreter)")
    from triton.runtime.jit import JITFunction
    from fractal_kernels.ops import tiny_attention
    if not isinstance(tiny_attention._attn_fwd_kernel, JITFunction):
        raise RuntimeError("benchmarks.aot: the kernels were created by the Triton interpreter "
                           "(TRITON_INTERPRET was set when fractal_kernels was imported)")


@contextlib.contextmanager
def capturing(arch: int, sink: List[Dict[str, Any]], override: Optional[Callable] = None):
    """Inside: library launches are recorded into ``sink`` (bound for ``arch``) instead of run. ``override``
    (the seeded-regression hook) may rewrite a launch's kwargs before binding: ``override(name, kwargs)``."""
    _check_env()
    from triton.runtime.jit import JITFunction
    from fractal_kernels import dispatch
    from fractal_kernels._target import target_arch

    def record_launch(self, *args, grid, warmup, **kwargs):
        where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not isinstance(a, GPUView)]
        if where:
            names = [self.arg_names[i] for i in where]
            raise RuntimeError(f"{self.__name__}: tensor arguments {names} are plain CPU tensors: the capture "
                               f"missed an allocation (the launch would see a CPU tensor)")
        if override is not None:
            kwargs = override(self.__name__, dict(kwargs))
        spec = bind_launch(self, args, kwargs, arch)
        spec["grid"] = [int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,))]
        sink.append(spec)
        return None

    saved_run, saved_triton = JITFunction.run, dispatch._triton
    JITFunction.run = record_launch
    dispatch._triton = lambda: (True, "AOT capture (benchmarks.aot): launches recorded, not run")
    try:
        with target_arch(arch), CudaOnCPU():
            yield
    finally:
        JITFunction.run, dispatch._triton = saved_run, saved_triton
