"""Backend choice for every op: CUDA extension -> Triton -> PyTorch, forceable, and visible.

``resolve(op, backend, device, dtype=..., shape_class=...)`` returns the backend that will run:

* ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"`` force one (an unavailable forced backend, or one that cannot
  run this call's shape or dtype, is an error that says why);
* ``None``/``"auto"`` (or the ``FRACTAL_KERNELS_BACKEND`` environment variable) picks, among the backends that
  support the call (:func:`register_support`): on a CUDA tensor the CUDA extension if it is built *and* the op
  is listed as verified on a real GPU (``cuda_verified.json``, see :mod:`fractal_kernels.policy`), else
  Triton, else PyTorch; on a CPU tensor the compiled C++ CPU kernel for the ops that have one (``CPU_OPS``,
  see :mod:`fractal_kernels.cpu`) when it builds here, else PyTorch (the Triton interpreter,
  ``TRITON_INTERPRET=1``, is for testing and must be forced).

Support: ``shape_class`` is a small hashable description of what in the call matters to some backend (make it
with :func:`shape_class`, e.g. ``shape_class(V=256)``); per (op, backend) predicates registered here say
whether that backend runs it (the CUDA sampler takes V <= 1024, the CUDA attention D in {16, 32, 64, 80, 128}
and no dropout, the torch attention no dropout together with ``seqlens``), and ``auto`` falls through to the
next backend. An op that passes no ``shape_class`` gets today's choice.

Cost per call: the support of a call is computed once per (op, device type, dtype, shape class) and cached; the
extension import, the policy files, triton's import and the device name are each looked up once per process.
:func:`reload` forgets all of it (tests, and writers of the policy files).

Per-op choices beyond the support predicates live here too, so every op's policy is in this module:
:func:`choose_attention` (fp64 on torch, SDPA past ``ATTENTION_MAX_L``, the measured or the MODEL's crossover),
:func:`choose_attention_decode`, :func:`choose_pixel_head` (widths the Triton kernel does not take go to
torch) and :func:`choose_block_stack` (fuse a level's blocks or not); the other ops call :func:`resolve`.

``last_backend(op)`` tells which backend ran last for an op; ``FRACTAL_KERNELS_VERBOSE=1`` prints each choice.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from fractal_kernels import policy
from fractal_kernels._jit import JIT as _JIT, cuda_sources, jit_build as _jit_build  # noqa: F401 (re-exported)
from fractal_kernels._record import forget, last_backend, record  # noqa: F401 (what ran: part of this API)

BACKENDS = ("cuda", "triton", "cpu", "torch")
# ops with a compiled C++ CPU kernel (fractal_kernels/cpu): where PyTorch's per-op dispatch dominates on a CPU
CPU_OPS = ("pixel_head_sample",)
# op name -> the function of fractal_kernels._C that implements its CUDA path
CUDA_SYMBOLS = {"sample_logits": "sample_logits", "pixel_cross_entropy": "ce_rows",
                "tiny_attention": "tiny_attention_fwd"}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op here (or not this call's shape/dtype)."""


# Per-process caches. Plain dicts, not functools.lru_cache: torch.compile traces through the dispatch and warns
# about every lru_cache it meets.
_EXT: Dict[str, object] = {}
_NAMES: Dict[Optional[int], str] = {}
_UNSUPPORTED: Dict[tuple, Optional[str]] = {}
_ORDER: Dict[tuple, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {}

def _cuda_ext():
    """The compiled extension module, or None. The import is tried once per process (an absent extension
    costs nothing per call); ``FRACTAL_KERNELS_JIT=1`` builds it on first use where CUDA exists."""
    if "mod" not in _EXT:
        try:
            _EXT["mod"] = importlib.import_module("fractal_kernels._C")
        except ImportError:
            _EXT["mod"] = None
    if _EXT["mod"] is None and os.environ.get("FRACTAL_KERNELS_JIT") == "1" and _cuda_available():
        return _jit_build()
    return _EXT["mod"]


def _cuda_available() -> bool:
    if "cuda" not in _EXT:
        _EXT["cuda"] = torch.cuda.is_available()
    return _EXT["cuda"]


def device_name(index: Optional[int] = None) -> str:
    """``torch.cuda.get_device_name`` of a CUDA device (the current one for None), asked once per device."""
    if index not in _NAMES:
        _NAMES[index] = torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)
    return _NAMES[index]


def _cuda_extension() -> Tuple[bool, str]:
    if not _cuda_available():
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


def _triton_version() -> Optional[str]:
    if "triton" not in _EXT:
        try:
            import triton
            _EXT["triton"] = triton.__version__
        except ImportError:
            _EXT["triton"] = None
    return _EXT["triton"]


def _triton() -> Tuple[bool, str]:
    version = _triton_version()
    if version is None:
        return False, "triton is not installed"
    if _cuda_available():
        return True, f"triton {version} on {device_name(0)}"
    if triton_interpreting():
        return True, f"triton {version} interpreter (TRITON_INTERPRET=1, CPU tensors, slow)"
    return False, f"triton {version} installed but no GPU (set TRITON_INTERPRET=1 for the CPU interpreter)"


def backend_report() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (available, reason)}`` for this process."""
    return {"cuda": _cuda_extension(), "triton": _triton(), "cpu": _cpu_kernels(),
            "torch": (True, f"torch {torch.__version__}")}


def available_backends() -> List[str]:
    """Backends usable here, in dispatch preference order."""
    return [name for name, (ok, _) in backend_report().items() if ok]


def cuda_verified_ops() -> List[str]:
    """Ops whose CUDA kernels passed their tests on a real GPU (package data and overlay, see
    :mod:`fractal_kernels.policy`; read once per process)."""
    return sorted(policy.load().verified)


def reload() -> None:
    """Forget every per-process cache of the dispatch: the extension import, the policy files, triton's
    import, device names and the per-shape support decisions. For tests and for writers of the policy files."""
    for cache in (_EXT, _NAMES, _UNSUPPORTED, _ORDER):
        cache.clear()
    policy.clear()


# ------------------------------------------------------------------------------------------------ support
Predicate = Callable[[Optional[torch.dtype], Mapping[str, Any]], Optional[str]]
_SUPPORT: Dict[Tuple[str, str], List[Predicate]] = {}


def shape_class(**features: Any) -> Tuple[Tuple[str, Any], ...]:
    """The hashable shape class of a call, from the few features some backend's support depends on
    (e.g. ``V``, ``D``, ``dropout``, ``varlen``); keep the values coarse: decisions are cached per class."""
    return tuple(sorted(features.items()))


def register_support(op: str, backend: str, predicate: Predicate) -> None:
    """Add a predicate ``(dtype, features) -> None`` (runs) ``| reason`` (does not) for ``op`` on ``backend``.
    Features missing from a call's shape class must count as supported."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _SUPPORT.setdefault((op, backend), []).append(predicate)
    _UNSUPPORTED.clear()
    _ORDER.clear()


def unsupported(op: str, backend: str, dtype: Optional[torch.dtype] = None,
                shape: Tuple[Tuple[str, Any], ...] = ()) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` for this dtype and shape class, or None if it can (cached)."""
    key = (op, backend, dtype, shape)
    if key not in _UNSUPPORTED:
        why = None
        for predicate in _SUPPORT.get((op, backend), ()):
            why = predicate(dtype, dict(shape))
            if why:
                break
        _UNSUPPORTED[key] = why or None
    return _UNSUPPORTED[key]


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_V = 1024                        # csrc/bindings.cpp: one CUDA block per row
CUDA_ATTENTION_D = (16, 32, 64, 80, 128)  # csrc/tiny_attention: tiny_attention_supports_head_dim
ATTENTION_MAX_L = 512                     # longest sequence of the attention kernels; auto: SDPA past it
PIXEL_HEAD_TRITON_W = (16, 128)           # widths of the Triton pixel head: powers of two in this range


def _dtype_in(allowed, what):
    def check(dtype, features):
        if dtype is not None and dtype not in allowed:
            return f"{what}: dtype {dtype} unsupported (takes {', '.join(str(d) for d in allowed)})"
        return None
    return check


def _max_v(name):
    def check(dtype, features):
        v = features.get("V")
        if v is not None and v > CUDA_MAX_V:
            return f"{name}: V={v} over the CUDA kernel's limit {CUDA_MAX_V}"
        return None
    return check


def _cuda_attention(dtype, features):
    d = features.get("D")
    if d is not None and d not in CUDA_ATTENTION_D:
        return f"q: head dim D={d} not one the CUDA kernels take {CUDA_ATTENTION_D}"
    if features.get("dropout"):
        return "dropout_p: the CUDA kernels have no dropout"
    return None


def _torch_attention(dtype, features):
    if features.get("dropout") and features.get("varlen"):
        return "dropout_p: not supported together with seqlens on the torch backend"
    return None


register_support("sample_logits", "cuda", _max_v("cond_logits"))
register_support("sample_logits", "cuda", _dtype_in(_KERNEL_DTYPES, "cond_logits"))
register_support("pixel_cross_entropy", "cuda", _max_v("weight"))
register_support("tiny_attention", "cuda", _cuda_attention)
register_support("tiny_attention", "cuda", _dtype_in(_KERNEL_DTYPES, "q"))
register_support("tiny_attention", "triton", _dtype_in(_KERNEL_DTYPES, "q"))
register_support("tiny_attention", "torch", _torch_attention)
register_support("mar_block_stack", "triton", _dtype_in(_KERNEL_DTYPES, "x"))


# ----------------------------------------------------------------------------------------------- choice
def _auto_order(op: str, device_type: str, dtype: Optional[torch.dtype],
                shape: Tuple[Tuple[str, Any], ...]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(backends that support the call in preference order, reasons of those that do not) for ``auto``;
    computed once per (op, device type, dtype, shape class)."""
    key = (op, device_type, dtype, shape)
    if key in _ORDER:
        return _ORDER[key]
    if device_type == "cuda":
        order: Tuple[str, ...] = ("cuda", "triton", "torch")
    elif device_type == "cpu" and op in CPU_OPS:
        order = ("cpu", "torch")
    else:
        order = ("torch",)
    ok, why = [], []
    for b in order:
        reason = unsupported(op, b, dtype, shape)
        (why.append(f"{b}: {reason}") if reason else ok.append(b))
    _ORDER[key] = (tuple(ok), tuple(why))
    return _ORDER[key]


def _usable(op: str, backend: str) -> bool:
    """Availability for auto (process-wide caches only: no import, file read or device query per call)."""
    if backend == "cuda":
        ext = _cuda_ext()
        return ext is not None and hasattr(ext, CUDA_SYMBOLS.get(op, op)) and op in policy.load().verified
    if backend == "triton":
        return _triton()[0]
    if backend == "cpu":
        return _cpu_kernels()[0]
    return True


def resolve(op: str, backend: Optional[str], device: torch.device, *, dtype: Optional[torch.dtype] = None,
            shape_class: Tuple[Tuple[str, Any], ...] = ()) -> str:
    """The backend that runs ``op`` on ``device`` for a call of this ``dtype`` and ``shape_class`` (see the
    module docstring); records it for ``last_backend``."""
    choice = backend or os.environ.get("FRACTAL_KERNELS_BACKEND") or "auto"
    if choice == "auto":
        ok, why = _auto_order(op, device.type, dtype, shape_class)
        for b in ok:
            if _usable(op, b):
                return record(op, b)
        raise BackendUnavailable(f"{op}: no backend here runs this call ({'; '.join(why)})"
                                 + ("; backend='triton' with TRITON_INTERPRET=1 runs it on CPU tensors"
                                    if device.type == "cpu" and not unsupported(op, "triton", dtype, shape_class)
                                    else ""))
    if choice not in BACKENDS:
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'cpu', 'torch', got {choice!r}")
    if choice == "cuda":
        if device.type != "cuda":
            raise BackendUnavailable(f"{op}: backend 'cuda' needs CUDA tensors, got {device.type} tensors")
        ext = _cuda_ext()
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
    reason = unsupported(op, choice, dtype, shape_class)
    if reason:
        raise BackendUnavailable(f"{op}: backend {choice!r} cannot run this call: {reason}; use another "
                                 f"backend or None")
    return record(op, choice)


# ------------------------------------------------------------------------------------ per-op choices
# What auto decides beyond the support predicates, for the ops whose choice is more than resolve(): SDPA for
# long attention, the fp64 attention, the pixel head's widths. The ops call these; nothing else chooses.

def attention_crossover(D: int, dtype: torch.dtype, device: Optional[torch.device] = None) -> Optional[int]:
    """Length from which SDPA beat the kernel in the benchmark run recorded for this device (if any; the
    policy files and the device name are read once per process: the dispatch is hot)."""
    if device is None:
        device = torch.device("cuda") if _cuda_available() else torch.device("cpu")
    name = device_name(device.index) if device.type == "cuda" else ""
    return policy.load().crossover_length(name, str(dtype).replace("torch.", ""), D)


def explain_attention(op: str, backend: Optional[str], dtype: torch.dtype, device: torch.device, D: int, L: int,
                      dropout: bool = False, varlen: bool = False) -> Tuple[str, str]:
    """:func:`choose_attention`'s answer and why. Under ``auto``, a call the kernels take goes to SDPA by
    :func:`fractal_kernels.policy.attention_sdpa_rule`: a measured crossover for this device name, else on a CUDA
    device the MODEL's length for its arch (``block_stack_model.json``), else the kernel."""
    if dtype == torch.float64:
        if backend not in (None, "auto", "torch"):
            raise TypeError(f"q: float64 runs on the torch backend only (the {backend} kernels take fp32/bf16/fp16)")
        return resolve(op, "torch", device), "float64: the torch backend only"
    forced = backend not in (None, "auto") or os.environ.get("FRACTAL_KERNELS_BACKEND") not in (None, "", "auto")
    if L > ATTENTION_MAX_L:
        if forced and (backend or os.environ.get("FRACTAL_KERNELS_BACKEND")) != "torch":
            raise ValueError(f"q: sequence length L={L} over the kernels' limit {ATTENTION_MAX_L}; use backend=None "
                             f"(SDPA) or 'torch'")
        if not forced:
            return record(op, "sdpa" if device.type == "cuda" else "torch"), f"L={L} > {ATTENTION_MAX_L}: no kernel"
    shape = shape_class(D=D, dropout=dropout, varlen=varlen)
    which = resolve(op, backend, device, dtype=dtype, shape_class=shape)
    # SDPA's path runs the reference for varlen / dropout: only calls the torch backend runs can go there
    if forced or which == "torch" or unsupported(op, "torch", dtype, shape) is not None:
        return which, "forced" if forced else "no SDPA here" if which == "torch" else "SDPA's path cannot run this call"
    from fractal_kernels._target import device_arch
    cuda = device.type == "cuda"
    sdpa, why = policy.attention_sdpa_rule(L, D, str(dtype).replace("torch.", ""), arch=device_arch(device) if cuda
                                           else None, device_name=device_name(device.index) if cuda else "")
    return (record(op, "sdpa") if sdpa else which), why


def choose_attention(op: str, backend: Optional[str], dtype: torch.dtype, device: torch.device, D: int, L: int,
                     dropout: bool = False, varlen: bool = False) -> str:
    """The backend for this attention call; 'sdpa' when ``auto`` hands it to PyTorch SDPA
    (:func:`explain_attention`)."""
    return explain_attention(op, backend, dtype, device, D, L, dropout, varlen)[0]


def attention_without_cuda_dropout(which: str, backend: Optional[str], dropout_p: float) -> str:
    """A dropout call chosen for the CUDA attention kernels (which have none) goes to Triton, or raises if forced."""
    if dropout_p > 0 and which == "cuda":
        if backend == "cuda":
            raise BackendUnavailable("tiny_attention: the CUDA kernels have no dropout; use backend='triton' or None")
        return record("tiny_attention", "triton")
    return which


def choose_attention_decode(backend: Optional[str], dtype: torch.dtype, device: torch.device) -> str:
    """The backend of a KV-cache decode step: fp64 on torch; there is no CUDA decode kernel."""
    op = "tiny_attention_decode"
    which = resolve(op, backend, device) if dtype != torch.float64 else resolve(op, "torch", device)
    if which == "cuda":
        raise BackendUnavailable("tiny_attention_decode: no CUDA decode kernel; use backend='triton' or None")
    return which


def pixel_head_triton_supports(width: int) -> bool:
    lo, hi = PIXEL_HEAD_TRITON_W
    return lo <= width <= hi and width & (width - 1) == 0


def choose_pixel_head(backend: Optional[str], device: torch.device, width: int) -> str:
    """The pixel head's backend; auto runs widths the Triton kernel does not take on the torch backend."""
    choice = backend or os.environ.get("FRACTAL_KERNELS_BACKEND") or "auto"
    if choice == "cuda":
        # the extension has no pixel-head kernel (CUDA_SYMBOLS has no entry, so auto never picks it)
        raise BackendUnavailable("pixel_head_sample: no CUDA-extension kernel for this op; use backend='triton' "
                                 "(GPU), 'torch' or None")
    which = resolve("pixel_head_sample", backend, device)
    if which == "triton" and not pixel_head_triton_supports(width):
        if choice == "triton":
            raise ValueError(f"weights: width W={width} unsupported by the triton kernel (a power of two in "
                             f"{PIXEL_HEAD_TRITON_W[0]}..{PIXEL_HEAD_TRITON_W[1]}); use backend='torch' or None")
        which = record("pixel_head_sample", "torch")
    return which


def choose_schedule(op: str, schedule: Optional[str], device: torch.device, width: int, rows: int,
                    wdtype: torch.dtype) -> Tuple[str, str]:
    """A phased op's Triton schedule and why (``op`` "pixel_head" / "ar_step",
    :func:`fractal_kernels.policy.schedule_rule`: forced by ``schedule`` or its environment variable, else the
    crossover data at this call's rows on a CUDA device's arch); recorded as the op ``<op>_schedule``
    (:func:`last_backend`)."""
    from fractal_kernels._target import device_arch
    which, why = policy.schedule_rule(op, width, schedule=schedule, rows=rows, dtype=str(wdtype)[6:],
                                      arch=device_arch(device) if device.type == "cuda" else None)
    return record(f"{op}_schedule", which), why


MAR_STACK_MAX_L = 64  # longest sequence (prefix tokens included) of the fused MAR stack's Triton kernel


def explain_block_stack(op: str, backend: Optional[str], device: torch.device, width: int,
                        fuse: Optional[bool] = None, *, policy_only: bool = False, n: Optional[int] = None,
                        dtype: Optional[torch.dtype] = None) -> Tuple[Optional[str], str]:
    """:func:`choose_block_stack`'s answer and why; ``policy_only``: the rule's answer where Triton runs, without
    resolving a backend here (``fractalgen info`` on a machine without a GPU). With ``n`` (sequences / rows per
    call) and the weight ``dtype`` on a CUDA device, the fused-stack crossover data decides (``policy.block_stack_rule``:
    the MODEL's ``fractal_kernels/data/block_stack_model.json``, a measured overlay over it)."""
    arch = None
    if device.type == "cuda" and n is not None and dtype is not None:
        from fractal_kernels._target import device_arch
        arch = device_arch(device)
    fused, why = policy.block_stack_rule(width, fuse, op=op, n=n, arch=arch,
                                         dtype=None if dtype is None else str(dtype).replace("torch.", ""))
    if not fused:
        return None, why
    if policy_only:
        return "triton", why
    which = resolve(op, backend, device)
    if which != "triton":
        return None, f"{why}, but the backend is {which}: only the Triton kernel fuses"
    return which, why


def choose_block_stack(op: str, backend: Optional[str], device: torch.device, width: int,
                       fuse: Optional[bool] = None, n: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Backend of a fused block stack (``op``: ``mar_block_stack`` / ``ar_block_stack_decode``) for a level of
    ``width``, or None: op by op. Only the Triton kernel fuses; by default a level fuses only where the crossover
    data says the fused stack wins at ``n`` rows of weight ``dtype`` on this GPU (today's MODEL data: nowhere), else
    by ``policy.BLOCK_STACK_MAX_WIDTH`` (0: none); ``fuse`` (the level's ``fused_stack``) forces either way."""
    return explain_block_stack(op, backend, device, width, fuse, n=n, dtype=dtype)[0]
