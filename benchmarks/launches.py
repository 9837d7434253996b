"""Kernel launches and host<->device syncs per image of ``generate``, counted exactly on a CPU, plus a labelled
roofline MODEL (FLOPs, bytes, hardware floors, a launch term) for the five published configs.

``python -m benchmarks.launches`` writes ``benchmarks/results/launches/launches.{json,md,png}``;
``--tiny`` runs the three tiny configs only (what CI runs, a few minutes).

How a launch is counted (one classification, :func:`classify`, tested on small programs in
``tests/test_launches.py``):

* The run executes on the CPU under two modes. A ``TorchDispatchMode`` sees every ATen op *after* the
  composite decompositions PyTorch makes on every device (``aten::linear`` reaches it as ``t`` + ``addmm``,
  ``layer_norm`` as ``native_layer_norm``, ``softmax`` as ``_softmax``, ``matmul`` as views + ``bmm``), i.e.
  at the level where a backend kernel runs; each op there is classified:

  - ``NON_LAUNCHING``: views, metadata and allocations (view, reshape aliases, expand, t, transpose, permute,
    select, slice, as_strided, unsqueeze, squeeze, unbind, split, detach, alias, empty*, lift_fresh, ...): 0.
  - ``CUDA_MULTI``: ops whose CUDA implementation launches several kernels or synchronises, from the ATen
    sources (``multinomial`` with one sample: the ``max``/``min`` validity check and the zero-row check, each
    read with ``.item()``, then ``exponential_``, ``div``, ``argmax``: 11 kernels, 2 D2H copies, 2 syncs;
    ``nonzero``: count, D2H copy of the count + sync, select; ``constant_pad_nd``: fill + copy; ``sort`` on a
    row of <= 4096: copy + in-place sort; ``_local_scalar_dense`` (``item``, ``bool``, ``int`` of a tensor):
    a D2H copy + sync; ...).
  - ``index``/``index_put_`` with a boolean index add a ``nonzero`` (data-dependent shape: a sync).
  - every other ATen op: **one launch** (pointwise, reduction, GEMM, copy, fill, RNG). A cuBLAS GEMM is
    counted as one launch (split-K or a separate bias copy can add one on some shapes: the count is then a
    lower bound for GEMMs). An op whose outputs are all empty launches nothing (TensorIterator/GEMM early
    exits).
  - ops of our custom namespace (``fractal_kernels::``): their Python implementation is re-run under the mode,
    so what counts is what they launch -- the ATen ops of their launcher (usually none: ``contiguous`` of
    contiguous tensors, ``empty``) plus one launch per Triton kernel call (``kernel[grid](...)``, hooked at the
    Triton launcher, named ``triton:<kernel>``). What the Triton interpreter does inside a kernel is not counted.

* Functions that PyTorch decomposes on a CPU but runs as one fused kernel on CUDA are counted at the
  ``TorchFunctionMode`` level (``CUDA_FUSED_FUNCTIONS``: ``F.rms_norm`` -> ``_fused_rms_norm``, one kernel on
  CUDA builds of torch >= 2.9, a decomposition on the CPU build).

* Host vs device. The run stands in for a CUDA run with the model on the GPU: a tensor is *host* when the
  code would leave it on the CPU there -- made by a factory without ``device=`` (``torch.rand(B, L)`` for the
  MAR orders from the CPU generator, ``torch.randint`` seeds), moved with ``.cpu()``, a plain tensor attribute
  of a module (the pixel head's mean/std, the AR RoPE table: not moved by ``model.to``), or computed from
  host tensors only. Host ops launch nothing. ``.to(<device>)`` / ``torch.tensor(..., device=)`` of host data is
  one H2D copy and a sync (PyTorch's blocking copies call ``cudaStreamSynchronize``; ``non_blocking=True``: no
  sync); ``.cpu()``/``.tolist()``/``.numpy()``/``item`` of device data are one D2H copy and a sync. Copies
  count as launches (``memcpy_h2d``/``memcpy_d2h``: stream work with a launch's host cost) and are also
  reported alone. Premise: every explicit device argument in the model code means the model's device.

* Syncs: D2H reads (``item``/``bool``/``int``/``tolist``/``.cpu()``), blocking H2D copies, and the
  data-dependent shapes (``nonzero``, boolean indexing, ``masked_select``, ``unique``, ``repeat_interleave``
  without ``output_size``).

Exact for the published configs without running them at full width, reductions each tested exactly:

1. **Narrow clones** (:func:`narrow_clone`): the same levels, patch grids, depths, steps, condition counts,
   guiding pixels and head counts, every head 8 wide (the MAR guiding-pixel heads, 128 wide in the model, too).
   No code path branches on the width or the head dim (the kernels pad the head dim to a power of two inside;
   the pixel-head kernel takes 16..128 wide heads alike); the head count does matter (one head makes some
   reshapes views), so it is kept. Each level's ``fused_stack`` is pinned to what the width rule decides at
   the original width (:func:`pin_fused_stacks`: a clone fuses the levels its original fuses, and no other).
   Test: a clone and its original give identical counts (tiny configs, also with a lowered width limit).
2. **Memoised sub-level calls** (``memo=True``): every call below level 0 (a level's ``sample``, a pixel head's
   ``sample``) with the same structural key (level, rows, guided or not, cfg type, schedule, settings) launches
   the same ops, so it is executed once per key and replayed (its counts added again) afterwards. Test: memo
   on == memo off, exactly, on the tiny configs, reference loop and fast engine.
   And **count-only kernels** (``execute_kernels=False``): a Triton launch is recorded and its body skipped
   (the custom op's outputs are zero-filled: valid pixel ids), since nothing downstream branches on values.
   Test: executed == count-only on the tiny configs.

3. **Depth**: every generator level is counted 1 and 2 blocks deep and extrapolated to its depth
   (:func:`combine_depths`: a level's own counts are affine in its own depth).
4. **Batch**: the published configs are counted at batch 1; launches/copies/syncs per batch do not depend on
   the batch (:func:`at_batch`), so a batch-B row is the batch-1 count / B per image.

The first call of a model builds a few per-module tables (the MAR step tables, the pixel heads' packed
weights); the counted call is the second (steady state), the first call's extra launches are reported apart.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel backend on a CPU: before triton is imported

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

CUSTOM_NAMESPACES = ("fractal_kernels",)

# ATen ops that launch nothing on CUDA: views, metadata, allocations (op name without overload).
NON_LAUNCHING = frozenset("""
view _unsafe_view _reshape_alias reshape view_as expand expand_as t transpose permute select slice
as_strided unsqueeze squeeze unbind split split_with_sizes chunk tensor_split unfold narrow diagonal
detach alias lift_fresh lift_fresh_copy_noop empty empty_like empty_strided new_empty new_empty_strided
resize_ set_ view_as_real view_as_complex _neg_view _conj _conj_physical_noop real imag movedim
movedim_int squeeze_ unsqueeze_ t_ transpose_ as_strided_ sym_size sym_stride sym_numel sym_storage_offset
is_same_size _nested_tensor_size flatten unflatten promote_types result_type can_cast
_has_compatible_shallow_copy_type is_nonzero_noop
""".split())

# (kernels, D2H copies, syncs) of ops whose CUDA implementation is more than one kernel.
CUDA_MULTI: Dict[str, Tuple[int, int, int]] = {
    # aten/src/ATen/native/Distributions.cpp multinomial_out, fast path for one sample / no replacement:
    # ((max < inf) & (min >= 0)).item(), (sum(1) == 0).sum().item(), exponential_, div, argmax
    "multinomial": (11, 2, 2),
    # cub count of the nonzeros, D2H copy of the count + sync, then the select
    "nonzero": (2, 1, 1),
    "masked_select": (3, 1, 1),
    "_unique2": (4, 1, 1), "unique_dim": (4, 1, 1), "unique_consecutive": (3, 1, 1), "_unique": (4, 1, 1),
    # output_size unknown: the sum of the repeats is read back
    "repeat_interleave": (3, 1, 1),
    "constant_pad_nd": (2, 0, 0),  # fill the output with the pad value, copy the input into its interior
    "sort": (2, 0, 0),  # rows <= 4096: copy into the output, bitonic sort in place (indices filled in-kernel)
    "_local_scalar_dense": (0, 1, 1),  # item / bool / int / float of a device tensor
}
SYNC_KINDS = ("_local_scalar_dense", "nonzero", "masked_select", "repeat_interleave")
BOOL_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})

# Functions the CPU build of torch decomposes but CUDA runs as one kernel: counted at the function level.
CUDA_FUSED_FUNCTIONS = {F.rms_norm: "_fused_rms_norm"}

# Factories that make a tensor from nothing: on the host unless given device= (checked at the function level).
_FACTORY_NAMES = ("zeros ones empty full rand randn randint randperm arange linspace logspace eye tensor "
                  "as_tensor scalar_tensor empty_strided normal tril_indices triu_indices").split()
FACTORIES = frozenset(getattr(torch, n) for n in _FACTORY_NAMES if hasattr(torch, n))
_DATA_FACTORIES = frozenset({torch.tensor, torch.as_tensor})

_HOST = "_fk_launches_host"  # attribute marking a host tensor


def is_host(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(getattr(t, _HOST, False))


# In the counted run a host tensor reports this device (``t.device``), so code that compares devices
# (``if orders.device != device: orders = orders.to(device)``) takes the branch it takes on a GPU machine,
# and tensors made with ``device=host_tensor.device`` are host tensors.
HOST_DEVICE = torch.device("cpu", 0)
_REAL_DEVICE = torch._C.TensorBase.device.__get__


def _is_host_device(device: Any) -> bool:
    d = torch.device(device) if isinstance(device, (str, torch.device)) else None
    return d is not None and d.type == "cpu" and d.index == 0


def _device_property(self: torch.Tensor) -> torch.device:
    return HOST_DEVICE if getattr(self, _HOST, False) else _REAL_DEVICE(self)


def _mark_host(obj: Any) -> None:
    for t in _tensors(obj):
        try:
            setattr(t, _HOST, True)
        except (AttributeError, RuntimeError):
            pass


def _tensors(obj: Any) -> List[torch.Tensor]:
    """The tensors in ``obj`` (nested lists, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    out: List[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
    return out


_OP_NAMES: Dict[Any, str] = {}


def op_name(func) -> str:
    """``aten.addmm.default`` -> ``addmm``; custom ops keep their namespace (``fractal_kernels::x``)."""
    name = _OP_NAMES.get(func)
    if name is None:
        schema = func._schema.name  # e.g. "aten::addmm"
        ns, _, short = schema.partition("::")
        name = _OP_NAMES[func] = short if ns == "aten" else schema
    return name


def classify(func, args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> Tuple[int, int, int]:
    """(kernel launches, D2H copies, syncs) a CUDA device would run for one ATen op on device tensors."""
    name = op_name(func)
    if name in NON_LAUNCHING:
        return 0, 0, 0
    outs = list(_tensors(out))
    if name in CUDA_MULTI:
        k, c, s = CUDA_MULTI[name]
        if name == "repeat_interleave" and (kwargs.get("output_size") is not None or
                                            not any(isinstance(a, torch.Tensor) and a.dim() > 0
                                                    for a in list(args)[:2])):
            return 1, 0, 0
        if name == "sort" and outs and outs[0].numel() == 0:
            return 0, 0, 0
        return k, c, s
    kernels, copies, syncs = 1, 0, 0
    if name in BOOL_INDEX_OPS:
        idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (idx or ())):
            k, c, s = CUDA_MULTI["nonzero"]
            kernels, copies, syncs = kernels + k, c, s
    if outs and all(o.numel() == 0 for o in outs) and not syncs:
        return 0, 0, 0
    return kernels, copies, syncs


class Counts:
    """Counters keyed by (level label, kind): kernel launches (copies included), copies, syncs."""

    def __init__(self) -> None:
        self.launches: Counter = Counter()
        self.copies: Counter = Counter()
        self.syncs: Counter = Counter()
        self.unclassified_implicit: Counter = Counter()  # host tensors fed to device ops (implicit H2D)
        self.calls: Counter = Counter()  # calls of each level's sample (replayed ones included)
        self.rows: Counter = Counter()  # rows (sequences incl. both CFG halves) of those calls

    def _all(self) -> Tuple[Counter, ...]:
        return (self.launches, self.copies, self.syncs, self.unclassified_implicit, self.calls, self.rows)

    def snapshot(self) -> Tuple[Counter, ...]:
        return tuple(Counter(c) for c in self._all())

    def delta_since(self, snap) -> Tuple[Counter, ...]:
        return tuple(c - s for c, s in zip(self._all(), snap))

    def add(self, delta) -> None:
        for mine, d in zip(self._all(), delta):
            mine.update(d)

    def totals(self) -> Dict[str, int]:
        return {"launches": sum(self.launches.values()), "copies": sum(self.copies.values()),
                "syncs": sum(self.syncs.values())}


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


# ---------------------------------------------------------------------------------------------- the models
def _levels(model) -> List[Tuple[Any, str, str]]:
    """(object whose ``sample`` to wrap, label, kind) for every level, top first: the FractalGen node of each
    generator level, the guiding-pixel heads of MAR levels, the last pixel head."""
    from fractal_models.fractalgen import FractalGen
    from fractal_models.mar import MAR
    out, node, lvl = [], model, 0
    while isinstance(node, FractalGen):
        gen = node.generator
        kind = "MAR" if isinstance(gen, MAR) else "AR"
        out.append((node, f"L{lvl} {kind}", kind))
        if isinstance(gen, MAR) and gen.guiding_pixel:
            out.append((gen.guiding_pixel_loss, f"L{lvl} guiding pixel", "pixel"))
        node, lvl = node.next_fractal, lvl + 1
    out.append((node, "pixel head", "pixel"))
    return out


def _narrow_width(heads: int, head_dim: int) -> int:
    """Width of a narrowed level: ``heads`` heads of ``head_dim`` (at least 16, a power of two: what the fused
    pixel-head kernel takes)."""
    return max(16, 1 << max(0, (heads * head_dim - 1).bit_length()))


def narrow_clone(config: str, head_dim: int = 8, **overrides: Any):
    """The config with every head ``head_dim`` wide (generator level width = heads x head_dim; the pixel heads --
    the last level's and the MAR guiding-pixel heads, 128 wide in the model -- at least 16 and a power of two):
    same levels, grids, depths, steps, conditions and **heads** (an ``embed_dim_list`` override names the
    original's widths: they decide which levels fuse their blocks, :func:`pin_fused_stacks`) (the head count changes counts: with one head ``o.transpose(1, 2).reshape`` is a view, with several
    a copy). Random weights (seed 0)."""
    from fractal_models import config_kwargs
    from fractal_models.fractalgen import FractalGen
    from fractal_models.mar import MAR
    from fractal_models.pixelloss import PixelLoss
    kw = config_kwargs(config, **overrides)
    full_widths = kw["embed_dim_list"]
    heads = kw["num_heads_list"]
    # generator levels: exactly heads x head_dim (12 heads x 8 is 96: a power of two would not divide by 12);
    # the pixel head (last entry): a power of two, what its fused kernel takes
    kw["embed_dim_list"] = tuple(h * head_dim for h in heads[:-1]) + (_narrow_width(heads[-1], head_dim),)
    torch.manual_seed(0)
    model = FractalGen(**kw)
    for m in list(model.modules()):
        if isinstance(m, MAR) and m.guiding_pixel:
            old = m.guiding_pixel_loss
            heads = old.blocks[0].attn.num_heads if len(old.blocks) else 1
            m.guiding_pixel_loss = PixelLoss(c_channels=old.cond_proj.in_features,
                                             width=_narrow_width(heads, head_dim), depth=len(old.blocks),
                                             num_heads=heads, r_weight=old.r_weight)
    pin_fused_stacks(model, full_widths)
    return model.eval()


def pin_fused_stacks(model, widths: Sequence[int]) -> None:
    """Fix every generator level's ``fused_stack`` to what the default rule decides at the original ``widths``
    (``policy.block_stack_rule``): a narrow clone must fuse exactly the levels its original fuses, not every
    level (all clone levels are narrow)."""
    from fractal_kernels import policy
    for level, width in zip(model.levels()[:-1], widths):
        level.fused_stack = policy.block_stack_rule(width)[0]


def _host_attributes(model: torch.nn.Module) -> List[torch.Tensor]:
    """Plain tensor attributes of the modules (not parameters/buffers): ``model.to`` leaves them on the CPU."""
    out = []
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def _skey(name: str, v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), str(v.dtype))
    if isinstance(v, (list, tuple)):
        return tuple(_skey(name, x) for x in v)
    if name == "cfg" and isinstance(v, (int, float)):
        return ("cfg", float(v) == 1.0)  # the value never steers control flow, cfg == 1 does
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return type(v).__name__


@contextlib.contextmanager
def instrumented(model, memo: bool) -> Iterator[None]:
    """Wrap every level's ``sample``: counts are attributed to the innermost level running, and with ``memo`` a
    sub-level call is executed once per structural key and replayed afterwards (see the module docstring)."""
    import inspect
    cache: Dict[Any, Any] = {}
    installed = []
    for obj, label, _ in _levels(model):
        orig = obj.sample
        sig = inspect.signature(orig)
        top = obj is model

        def wrapper(*args, _orig=orig, _sig=sig, _label=label, _top=top, **kwargs):
            st = _ACTIVE[-1] if _ACTIVE else None
            if st is None:
                return _orig(*args, **kwargs)
            bound = _sig.bind(*args, **kwargs)
            conds = bound.arguments.get("cond_list")
            rows = int(conds[0].shape[0]) if conds else 0
            key = None
            if memo and not _top:
                key = (_label,) + tuple((k, _skey(k, v)) for k, v in sorted(bound.arguments.items()))
                hit = cache.get(key)
                if hit is not None:
                    st.counts.add(hit[0])
                    st.suppress += 1
                    try:
                        return hit[1].clone()
                    finally:
                        st.suppress -= 1
            snap = st.counts.snapshot() if key is not None else None
            st.counts.calls[_label] += 1
            st.counts.rows[_label] += rows
            st.labels.append(_label)
            try:
                out = _orig(*args, **kwargs)
            finally:
                st.labels.pop()
            if key is not None:
                st.suppress += 1
                try:
                    cache[key] = (st.counts.delta_since(snap), out.clone())
                finally:
                    st.suppress -= 1
            return out
        obj.sample = wrapper
        installed.append(obj)
    try:
        yield
    finally:
        for obj in installed:
            del obj.sample


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread (restored afterwards). Counting is many small ops: on a shared
    2-core machine a second OpenMP thread only spins at every op's barrier waiting for a core (measured: one
    fractalar_in64 job 41.5 s with 2 threads, 5.2 s with 1, same counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_generate(model, batches: Sequence[int], *, fast: bool, backend: str,
                   num_iter_list: Optional[Sequence[int]] = None, cfg: float = 11.0, temperature: float = 1.03,
                   memo: bool = True, execute_kernels: bool = False, warmup: bool = True,
                   seed: int = 0) -> Dict[int, Dict[str, Any]]:
    """Count one ``generate`` batch of ``model`` (on the CPU) per entry of ``batches``; with ``warmup`` each after
    an uncounted call at the same batch (steady state: the per-module tables, and the per-process caches keyed by
    the batch rows such as the decode kernels' length tensors, are built by then). The first call's extra launches
    are reported as ``first_call_extra`` (without ``memo`` only: a memoised warm-up would replay its cache
    building into every replayed call)."""
    from fractal_models import generate
    from fractal_models.sampling import default_num_iter_list
    iters = list(num_iter_list) if num_iter_list is not None else default_num_iter_list(model)
    host = _host_attributes(model)

    def run(batch: int):
        labels = torch.arange(batch) % model.num_classes
        t0 = time.perf_counter()
        with instrumented(model, memo), counting(execute_kernels, host) as st:
            generate(model, labels, num_iter_list=iters, cfg=cfg, temperature=temperature, seed=seed, fast=fast,
                     backend=backend)
        return st.counts, time.perf_counter() - t0

    out = {}
    with one_thread():
        for b in batches:
            cold = run(b) if warmup else None
            c, wall = run(b)
            out[b] = summarize_counts(c, b, cold=cold[0] if cold is not None and not memo else None, wall_s=wall,
                                      path="fast" if fast else "ref", warmup_s=cold[1] if cold is not None else 0.0,
                                      num_iter_list=iters)
    return out


def summarize_counts(c: Counts, batch: int, cold: Optional[Counts] = None, **extra: Any) -> Dict[str, Any]:
    levels = sorted({lbl for lbl, _ in c.launches} | {lbl for lbl, _ in c.syncs} | set(c.calls))
    per_level = {}
    for lbl in levels:
        kinds = {k: n for (l2, k), n in c.launches.items() if l2 == lbl}
        per_level[lbl] = {
            "launches": sum(kinds.values()), "copies": sum(n for (l2, _), n in c.copies.items() if l2 == lbl),
            "syncs": sum(n for (l2, _), n in c.syncs.items() if l2 == lbl),
            "calls": c.calls.get(lbl, 0), "rows": c.rows.get(lbl, 0),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "sync_kinds": {k: n for (l2, k), n in c.syncs.items() if l2 == lbl},
        }
    tot = c.totals()
    out = {"batch": batch, **tot, "launches_per_image": tot["launches"] / batch,
           "copies_per_image": tot["copies"] / batch, "syncs_per_image": tot["syncs"] / batch,
           "levels": per_level,
           "implicit_h2d": {f"{l}|{k}": n for (l, k), n in c.unclassified_implicit.items()}, **extra}
    if cold is not None:
        ct = cold.totals()
        out["first_call_extra"] = {k: ct[k] - tot[k] for k in tot}
    return out


# ------------------------------------------------------------------------------------ the roofline MODEL
# Hardware figures the MODEL assumes (dense bf16 tensor-core peak, HBM bandwidth of a device-to-device copy).
HARDWARE = {
    "H100": {"flops": 989e12, "bytes_per_s": 3.0e12, "note": "H100 SXM: 989 TFLOP/s dense bf16, ~3.0 TB/s copy"},
    "A100": {"flops": 312e12, "bytes_per_s": 2.0e12, "note": "A100 80GB SXM: 312 TFLOP/s dense bf16, ~2.0 TB/s"},
    "RTX4090": {"flops": 165e12, "bytes_per_s": 1.0e12,
                "note": "RTX 4090: 165 TFLOP/s dense bf16 with fp32 accumulation, ~1.0 TB/s (1008 GB/s spec)"},
}
LAUNCH_COST_S = 4e-6  # ASSUMPTION: host cost of one eager launch (PyTorch dispatch + cudaLaunchKernel)
SYNC_COST_S = 10e-6  # ASSUMPTION: extra cost of one host<->device round trip on a nearly empty queue
BYTES = 2  # bf16 weights and activations (autocast on a GPU)
# Bytes moved per attention score element by the reference's attention (fractal_kernels/reference/attention.py,
# fp32 scores [heads, Lq, Lk] in memory): written by the QK^T matmul, read + written by the scale, the MAR levels'
# max (read) and max subtraction (read + written), the AR decode's causal masked_fill (read + written), the
# softmax (read + written), the cast to the value dtype (read fp32, write BYTES), the PV matmul (read BYTES).
# The fast engine's attention kernels keep the scores on chip: none. (The pixel heads' 4 x 4 scores: left out.)
SCORE_BYTES_REF = {"MAR": 4 * (1 + 2 + 1 + 2 + 2 + 1) + 2 * BYTES, "AR": 4 * (1 + 2 + 2 + 2 + 1) + 2 * BYTES}

# Upstream figures the MODEL is calibrated against (reference loop, LTH14/fractalgen issues).
CALIBRATION = [
    {"name": "fractalgen issue #13", "config": "fractalar_in64", "batch": 1, "hardware": "RTX4090",
     "measured_s_per_image": 21.0, "note": "one FractalAR-64 image, 21 s at 12 % GPU use"},
    {"name": "fractalgen issue #19", "config": "fractalmar_large_in256", "batch": 512, "hardware": "H100",
     "measured_s_per_image": 0.82, "note": "~7 min for 512 FractalMAR-L images on one H100"},
]


def _linear_params(module: torch.nn.Module) -> Tuple[int, int]:
    """(weight elements of the Linear layers, sum of their in+out features) inside ``module``."""
    w = io = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            w += m.weight.numel()
            io += m.in_features + m.out_features
    return w, io


def _block_shapes(blocks: torch.nn.ModuleList) -> Dict[str, int]:
    """Per token of one block: matmul weights, activation elements read+written unfused (every op's input and
    output once: the Linear layers, 2 norms, attention q/k/v in and o out, 2 residual adds, the activation
    function) and fused (the block's input and output once)."""
    if not len(blocks):
        return {"matmul_params": 0, "act_unfused": 0, "act_fused": 0, "dim": 0}
    b = blocks[0]
    w, io = _linear_params(b)
    lin = [m for m in b.modules() if isinstance(m, torch.nn.Linear)]
    dim = lin[0].in_features
    hidden = max(m.out_features for m in lin if m.in_features == dim and m.out_features != 3 * dim)
    swiglu = sum(1 for m in lin if m.in_features == dim and m.out_features == hidden) == 2
    act = 5 * hidden if swiglu else 2 * hidden  # silu in/out + product in/in/out, or gelu in/out
    return {"matmul_params": w, "act_unfused": io + 4 * dim + 4 * dim + 6 * dim + act, "act_fused": 2 * dim,
            "dim": dim}


def _params(module: torch.nn.Module, skip: Sequence[torch.nn.Module] = ()) -> int:
    skipped = {id(p) for s in skip for p in s.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in skipped)


def roofline(config: str, batch: int, num_iter_list: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Per level and per image: FLOPs, weight bytes, activation bytes (unfused and fused), for the reference loop
    and the fast engine, from the full-size model's own modules (built on the meta device) and the sampling
    schedule (CFG on: two rows per image). A MODEL: see the README section and the results markdown."""
    from fractal_models import build_model
    from fractal_models.engine.mar import _mar_schedule
    from fractal_models.mar import MAR
    from fractal_models.pixelloss import PixelLoss
    from fractal_models.sampling import default_num_iter_list
    with torch.device("meta"):
        model = build_model(config)
    iters = list(num_iter_list) if num_iter_list is not None else default_num_iter_list(model)
    gens = model.levels()
    rows_per_image = 2.0  # sequences per image entering the current level (both CFG halves)
    calls = 1.0  # calls of the current level per batch (batch-independent)
    out: Dict[str, Dict[str, float]] = {}

    def head(label: str, ph: PixelLoss, rows: float, calls_: float) -> None:
        s = _block_shapes(ph.blocks)
        width = ph.ln.normalized_shape[0]
        depth = len(ph.blocks)
        logits = 2 * width * 256
        cond_in = 2 * ph.cond_proj.weight.numel()
        wbytes = _params(ph) * BYTES
        # reference: per channel all 4 tokens through the blocks and the three logits heads; fast (fused kernel,
        # KV cache): tokens 0..2 once, one logits head per channel, weights read once per call
        ref_f = 3 * (cond_in + 4 * depth * (2 * s["matmul_params"] + 4 * 4 * width) + 4 * 3 * logits)
        fast_f = cond_in + 3 * depth * (2 * s["matmul_params"] + 4 * 2 * width) + 3 * logits
        out[label] = {
            "rows_per_image": rows, "calls_per_batch": calls_, "weight_bytes_per_call": wbytes,
            "ref_flops": rows * ref_f, "fast_flops": rows * fast_f,
            "ref_weight_bytes": 3 * calls_ * wbytes / batch, "fast_weight_bytes": calls_ * wbytes / batch,
            "ref_act_bytes": rows * 3 * 4 * depth * s["act_unfused"] * BYTES,
            "fast_act_bytes": rows * (3 * depth * s["act_fused"] + 3 * 256) * BYTES,
        }

    for lvl, gen in enumerate(gens[:-1]):
        s = _block_shapes(gen.blocks)
        dim, depth, seq_len = s["dim"], len(gen.blocks), gen.seq_len
        skip = [gen.guiding_pixel_loss] if isinstance(gen, MAR) and gen.guiding_pixel else []
        wbytes = _params(gen, skip) * BYTES
        emb = 2 * gen.patch_emb.weight.numel()
        if isinstance(gen, MAR):
            label = f"L{lvl} MAR"
            if skip:
                head(f"L{lvl} guiding pixel", gen.guiding_pixel_loss, rows_per_image, calls)
            steps = min(seq_len, iters[lvl])
            tokens = seq_len + gen.num_conds + int(gen.guiding_pixel)
            sched = _mar_schedule(seq_len, steps, 2.0, "linear")
            nonzero_steps = sum(1 for n_pred, _, _ in sched if n_pred > 0)
            # every step: all tokens through every block (no KV cache in MAR), the patch embedding
            per_seq_f = steps * (tokens * depth * (2 * s["matmul_params"]) + depth * 4 * tokens * tokens * dim
                                 + seq_len * emb)
            act = steps * tokens * depth
            heads = gen.blocks[0].attn.num_heads if depth else 0
            scores = steps * depth * heads * tokens * tokens  # score elements per sequence
            ref_f = fast_f = per_seq_f
        else:
            label = f"L{lvl} AR"
            steps = nonzero_steps = seq_len
            # KV-cached decode (the reference's sample uses the cache too): one token per step, t keys at step t
            per_seq_f = sum(depth * (2 * s["matmul_params"] + 4 * (t + 1) * dim) + emb for t in range(steps))
            act = steps * depth
            heads = gen.blocks[0].attention.n_head if depth else 0
            scores = depth * heads * sum(t + 1 for t in range(steps))
            ref_f = fast_f = per_seq_f
        inv = calls * steps  # step invocations per batch: each reads the level's weights once
        out[label] = {
            "rows_per_image": rows_per_image, "calls_per_batch": calls, "steps_per_call": steps,
            "weight_bytes_per_call": wbytes,
            "ref_flops": rows_per_image * ref_f, "fast_flops": rows_per_image * fast_f,
            "ref_weight_bytes": inv * wbytes / batch, "fast_weight_bytes": inv * wbytes / batch,
            "ref_act_bytes": rows_per_image * (act * s["act_unfused"] * BYTES
                                               + scores * SCORE_BYTES_REF["MAR" if isinstance(gen, MAR) else "AR"]),
            "fast_act_bytes": rows_per_image * act * s["act_fused"] * BYTES,
            "ref_score_bytes": rows_per_image * scores * SCORE_BYTES_REF["MAR" if isinstance(gen, MAR) else "AR"],
        }
        calls *= nonzero_steps
        rows_per_image *= seq_len
    head("pixel head", gens[-1], rows_per_image, calls)
    totals = {k: sum(v[k] for v in out.values()) for k in
              ("ref_flops", "fast_flops", "ref_weight_bytes", "fast_weight_bytes", "ref_act_bytes", "fast_act_bytes")}
    return {"config": config, "batch": batch, "num_iter_list": iters, "levels": out, "totals": totals}


def floors(model: Dict[str, Any], path: str, hardware: str) -> Dict[str, float]:
    """Time floor per image on ``hardware``: per level max(FLOPs / peak, bytes / bandwidth), summed over levels
    (levels run one after another). ``path`` "ref" counts unfused activations, "fast" fused ones (the floor a
    fused engine could reach)."""
    hw = HARDWARE[hardware]
    total = flop_t = byte_t = 0.0
    for v in model["levels"].values():
        f = v[f"{path}_flops"] / hw["flops"]
        b = (v[f"{path}_weight_bytes"] + v[f"{path}_act_bytes"]) / hw["bytes_per_s"]
        total += max(f, b)
        flop_t += f
        byte_t += b
    return {"floor_s": total, "flop_s": flop_t, "byte_s": byte_t}


def predict_s_per_image(model: Dict[str, Any], path: str, hardware: str, launches_per_image: float,
                        syncs_per_image: float) -> Dict[str, float]:
    """MODEL time per image: the device floor plus the host's launch and sync terms (no overlap: in the
    launch-bound regime of tiny kernels the GPU waits for the host)."""
    fl = floors(model, path, hardware)
    launch = launches_per_image * LAUNCH_COST_S
    sync = syncs_per_image * SYNC_COST_S
    return {**fl, "launch_s": launch, "sync_s": sync, "predicted_s": fl["floor_s"] + launch + sync}


# ----------------------------------------------------------------------------------------------- the run
PUBLISHED = ("fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
             "fractalmar_huge_in256")
TINY = ("tiny_mar", "tiny_ar", "tiny_mar_gp")
# the README's sampling settings (cfg, temperature; the reference's iteration counts): counts depend on cfg != 1
# and the schedule only
SAMPLING = {"cfg": 11.0, "temperature": 1.03, "cfg_schedule": "linear"}


def combine_depths(one: Dict[str, Any], two: Dict[str, Any], depths: Dict[str, int]) -> Dict[str, Any]:
    """Counts at the real depths from counts at depth 1 and depth 2 of every generator level (``one``, ``two``:
    :func:`summarize_counts` of the same run with all generator levels 1 and 2 blocks deep). A level's own
    launches, copies and syncs are affine in its own depth (every block issues the same ops; the levels below
    are counted under their own labels), so per label and kind: ``n(d) = n(1) + (n(2) - n(1)) * (d - 1)``.
    Labels without a depth (pixel heads, ``generate``) must agree between the two runs. Tested exactly against
    a direct count (``tests/test_launches.py``)."""
    batch = one["batch"]
    levels = {}
    for lbl in sorted(set(one["levels"]) | set(two["levels"])):
        a, b = one["levels"].get(lbl), two["levels"].get(lbl)
        if a is None or b is None or a["calls"] != b["calls"] or a["rows"] != b["rows"]:
            raise RuntimeError(f"combine_depths: level {lbl!r} differs in structure between depth 1 and 2")
        d = depths.get(lbl)
        if d is None:
            if (a["launches"], a["syncs"], a["copies"]) != (b["launches"], b["syncs"], b["copies"]):
                raise RuntimeError(f"combine_depths: {lbl!r} has no depth but its counts changed with it")
            levels[lbl] = b
            continue

        def affine(x: Dict[str, int], y: Dict[str, int]) -> Dict[str, int]:
            out = {k: x.get(k, 0) + (y.get(k, 0) - x.get(k, 0)) * (d - 1) for k in set(x) | set(y)}
            if any(v < 0 for v in out.values()):
                raise RuntimeError(f"combine_depths: negative count at {lbl!r}")
            return dict(sorted(((k, v) for k, v in out.items() if v), key=lambda kv: -kv[1]))
        kinds = affine(a["kinds"], b["kinds"])
        sync_kinds = affine(a["sync_kinds"], b["sync_kinds"])
        copies = a["copies"] + (b["copies"] - a["copies"]) * (d - 1)
        levels[lbl] = {"launches": sum(kinds.values()), "copies": copies, "syncs": sum(sync_kinds.values()),
                       "calls": a["calls"], "rows": a["rows"], "kinds": kinds, "sync_kinds": sync_kinds,
                       "depth": d, "at_depth_1": a["launches"], "at_depth_2": b["launches"]}
    tot = {k: sum(v[k] for v in levels.values()) for k in ("launches", "copies", "syncs")}
    out = {**two, **tot, "levels": levels, "launches_per_image": tot["launches"] / batch,
           "copies_per_image": tot["copies"] / batch, "syncs_per_image": tot["syncs"] / batch,
           "depth_extrapolated": True, "wall_s": one["wall_s"] + two["wall_s"]}
    out.pop("first_call_extra", None)
    return out


def level_depths(config: str) -> Dict[str, int]:
    """Label of every generator level -> its number of blocks."""
    from fractal_models import config_kwargs
    kw = config_kwargs(config)
    kinds = kw["generator_type_list"]
    return {f"L{i} {kinds[i].upper()}": kw["num_blocks_list"][i] for i in range(len(kw["img_size_list"]) - 1)}


def run_config(config: str, batches: Sequence[int], *, narrow: bool = True,
               num_iter_list: Optional[Sequence[int]] = None, extra_ref_batches: Sequence[int] = (),
               depth_extrapolation: bool = True, batch_extrapolation: bool = True) -> Dict[str, Any]:
    """Reference loop and fast engine (``backend="triton"``) counts of one config at ``batches``: on the narrow
    clone (or the model itself), every generator level counted at depths 1 and 2 and extrapolated to its real
    depth (:func:`combine_depths`), or counted at its real depth directly."""
    from fractal_models import build_model, config_kwargs
    kw = config_kwargs(config)
    n_gen = len(kw["img_size_list"]) - 1

    def model_at(depth: Optional[int]):
        over = {} if depth is None else {"num_blocks_list": (depth,) * n_gen + tuple(kw["num_blocks_list"][n_gen:])}
        if narrow:
            return narrow_clone(config, **over)
        torch.manual_seed(0)
        return build_model(config, **over).eval()

    def count(model, fast: bool, bs: Sequence[int]):
        return count_generate(model, bs, fast=fast, backend="triton" if fast else "torch", num_iter_list=num_iter_list,
                              cfg=SAMPLING["cfg"], temperature=SAMPLING["temperature"], warmup=fast)

    t0 = time.perf_counter()
    out: Dict[str, Any] = {"config": config, "narrow_clone": narrow, "depth_extrapolated": depth_extrapolation,
                           "batch_extrapolated": batch_extrapolation}
    for path, fast, bs in (("ref", False, list(batches) + list(extra_ref_batches)), ("fast", True, list(batches))):
        t = time.perf_counter()
        counted = [1] if batch_extrapolation else bs
        if depth_extrapolation:
            one, two = count(model_at(1), fast, counted), count(model_at(2), fast, counted)
            depths = level_depths(config)
            res = {b: combine_depths(one[b], two[b], depths) for b in counted}
        else:
            res = count(model_at(None), fast, counted)
        out[path] = {b: res[b] if b in res else at_batch(res[1], b) for b in bs}
        out.setdefault("wall_s", {})[path] = time.perf_counter() - t
    out["wall_s"]["total"] = time.perf_counter() - t0
    return out


def at_batch(summary: Dict[str, Any], batch: int) -> Dict[str, Any]:
    """A batch-1 count stated for ``batch``: launches, copies and syncs per *batch* do not depend on the batch
    size (every loop batches over the images; no op's launch count depends on its rows), so per image they are
    the batch-1 count / ``batch``. Tested exactly on the tiny configs (``tests/test_launches.py``), reference loop
    and fast engine, level by level and kind by kind, in the steady state (:func:`count_generate` warms up at the
    counted batch: the decode kernels' per-(rows, length) tensors are built once per process)."""
    out = dict(summary)
    out.update(batch=batch, batch_extrapolated_from=summary["batch"],
               launches_per_image=summary["launches"] / batch, copies_per_image=summary["copies"] / batch,
               syncs_per_image=summary["syncs"] / batch)
    out.pop("first_call_extra", None)
    return out


def job_file(raw_dir: str, config: str, path: str, depth: int) -> str:
    return os.path.join(raw_dir, f"job_{config}_{path}_{depth}.json")


def run_job(config: str, path: str, depth: int, raw_dir: str) -> str:
    """One piece of the published run: ``path`` ("ref"/"fast") of the narrow clone with every generator level
    ``depth`` blocks deep, batch 1; saved as ``job_<config>_<path>_<depth>.json``."""
    import json

    from .harness import atomic_write, git_commit
    from fractal_models import config_kwargs
    t0, c0 = time.perf_counter(), time.process_time()
    kw = config_kwargs(config)
    n_gen = len(kw["img_size_list"]) - 1
    model = narrow_clone(config, num_blocks_list=(depth,) * n_gen + tuple(kw["num_blocks_list"][n_gen:]))
    fast = path == "fast"
    with torch.no_grad():
        r = count_generate(model, [1], fast=fast, backend="triton" if fast else "torch", cfg=SAMPLING["cfg"],
                           temperature=SAMPLING["temperature"], warmup=fast)[1]
    r.update(cpu_s=time.process_time() - c0, job_wall_s=time.perf_counter() - t0, commit=git_commit())
    out = job_file(raw_dir, config, path, depth)
    atomic_write(out, (json.dumps(r, indent=1, default=str) + "\n").encode())
    return out


def published_jobs(configs: Sequence[str]) -> List[Tuple[str, str]]:
    """(config, path) pieces of the published run, the longest first (a worker runs both depths of one)."""
    order = {"fractalmar_huge_in256": 0, "fractalmar_large_in256": 1, "fractalmar_base_in256": 2,
             "fractalmar_in64": 3, "fractalar_in64": 4}
    jobs = [(c, p) for c in configs for p in ("ref", "fast")]
    return sorted(jobs, key=lambda j: (order.get(j[0], -1), j[1] != "ref"))


def run_jobs(jobs: Sequence[Tuple[str, str]], raw_dir: str, workers: int) -> Dict[str, Any]:
    """Count the pieces: in this process one after another (``workers`` <= 1), or in ``workers`` child processes
    (``python -m benchmarks.launches --job CONFIG:PATH:1,CONFIG:PATH:2``), the longest pieces first."""
    import subprocess
    import sys
    t0 = time.perf_counter()
    if workers <= 1:
        for c, p in jobs:
            for d in (1, 2):
                print("wrote " + run_job(c, p, d, raw_dir), flush=True)
        return {"workers": 1, "wall_s": time.perf_counter() - t0}
    pending = list(jobs)
    running: List[Tuple[Any, Tuple[str, str]]] = []
    failed = []
    while pending or running:
        while pending and len(running) < workers:
            c, p = pending.pop(0)
            spec = f"{c}:{p}:1,{c}:{p}:2"
            cmd = [sys.executable, "-m", "benchmarks.launches", "--job", spec, "--out-dir", os.path.dirname(raw_dir),
                   "--stem", os.path.basename(raw_dir)[len("raw_"):]]
            running.append((subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            (c, p)))
        time.sleep(0.5)
        still = []
        for proc, job in running:
            rc = proc.poll()
            if rc is None:
                still.append((proc, job))
            elif rc != 0:
                failed.append(job)
        running = still
    if failed:
        raise RuntimeError(f"launches: job pieces failed: {failed}")
    return {"workers": workers, "wall_s": time.perf_counter() - t0}


def assemble_jobs(config: str, raw_dir: str, batches: Sequence[int], extra_ref_batches: Sequence[int] = ()):
    """The published-config result from the job pieces (depths 1 and 2, both paths), or None if one is missing."""
    import json
    pieces = {}
    for path in ("ref", "fast"):
        for d in (1, 2):
            f = job_file(raw_dir, config, path, d)
            if not os.path.exists(f):
                return None
            with open(f) as fh:
                pieces[path, d] = json.load(fh)
    depths = level_depths(config)
    out: Dict[str, Any] = {"config": config, "narrow_clone": True, "depth_extrapolated": True,
                           "batch_extrapolated": True, "wall_s": {}, "cpu_s": 0.0,
                           "commits": sorted({str(v.get("commit")) for v in pieces.values()})}
    for path in ("ref", "fast"):
        one = combine_depths(pieces[path, 1], pieces[path, 2], depths)
        one["path"] = path
        bs = list(batches) + (list(extra_ref_batches) if path == "ref" else [])
        out[path] = {b: (one if b == 1 else at_batch(one, b)) for b in bs}
        out["wall_s"][path] = sum(pieces[path, d].get("job_wall_s", pieces[path, d]["wall_s"]) for d in (1, 2))
        out["cpu_s"] += pieces[path, 1]["cpu_s"] + pieces[path, 2]["cpu_s"]
    out["wall_s"]["total"] = out["wall_s"]["ref"] + out["wall_s"]["fast"]
    return out


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}".replace(",", " ")
    if abs(x) >= 1:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _si(x: float, unit: str) -> str:
    for f, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def build_document(results: List[Dict[str, Any]], batches: Sequence[int]) -> Dict[str, Any]:
    from .harness import machine_info
    doc: Dict[str, Any] = {"schema": "fractal-bench/launches/1", "machine": machine_info(torch.device("cpu")),
                           "sampling": SAMPLING, "batches": list(batches),
                           "assumptions": {"launch_cost_s": LAUNCH_COST_S, "sync_cost_s": SYNC_COST_S,
                                           "bytes_per_element": BYTES, "hardware": HARDWARE},
                           "configs": [], "calibration": []}
    for r in results:
        entry = {"config": r["config"], "narrow_clone": r["narrow_clone"], "wall_s": r["wall_s"], "batches": {},
                 "counted_at": r.get("commits")}
        for b in sorted(r["ref"]):
            ref, fast = r["ref"][b], r["fast"].get(b)
            model = roofline(r["config"], b, ref["num_iter_list"])
            row: Dict[str, Any] = {"ref": ref, "fast": fast, "model": model}
            if fast is not None:
                row["launch_ratio"] = ref["launches"] / max(1, fast["launches"])
                row["floors"] = {hw: {p: floors(model, p, hw) for p in ("ref", "fast")} for hw in ("H100", "A100")}
                row["predicted"] = {hw: {"ref": predict_s_per_image(model, "ref", hw, ref["launches_per_image"],
                                                                    ref["syncs_per_image"]),
                                         "fast": predict_s_per_image(model, "fast", hw, fast["launches_per_image"],
                                                                     fast["syncs_per_image"])}
                                    for hw in ("H100", "A100")}
            entry["batches"][str(b)] = row
        doc["configs"].append(entry)
    for cal in CALIBRATION:
        for entry in doc["configs"]:
            row = entry["batches"].get(str(cal["batch"]))
            if entry["config"] == cal["config"] and row is not None:
                ref = row["ref"]
                pred = predict_s_per_image(row["model"], "ref", cal["hardware"], ref["launches_per_image"],
                                           ref["syncs_per_image"])
                device_s = pred["floor_s"]
                host_per_launch = (cal["measured_s_per_image"] - device_s) / max(1.0, ref["launches_per_image"])
                doc["calibration"].append({**cal, "predicted": pred,
                                           "ratio_measured_over_predicted": cal["measured_s_per_image"] /
                                           pred["predicted_s"],
                                           "implied_host_s_per_launch": host_per_launch})
    return doc


def markdown(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    counted = sorted({c for e in doc["configs"] for c in (e.get("counted_at") or [])})
    where = f"commit `{m['commit']}`"
    if counted and counted != [m["commit"]]:
        where = f"counted at commit {', '.join(f'`{c}`' for c in counted)}, tables built at commit `{m['commit']}`"
    L = ["# Kernel launches, syncs, bytes and FLOPs per image (counted on a CPU; floors are a MODEL)", "",
         f"Counted on {m['device']} · torch {m['torch']} · triton {m['triton']} · {where} · "
         f"{m['date']}. Sampling: cfg {doc['sampling']['cfg']} (linear schedule), temperature "
         f"{doc['sampling']['temperature']}, the reference's iterations; random weights. `ref` = the reference loop "
         "(`generate(fast=False)`), `fast` = the fast engine on the kernel backend (`backend=\"triton\"`, Triton "
         "launches counted as a GPU makes them). Launches include host<->device copies; per image = per batch / "
         "batch. Counts are exact for the classification in `benchmarks/launches.py`, through reductions each "
         "tested exactly in `tests/test_launches.py`: narrow clones, memoised sub-level calls, count-only kernels, "
         "every generator level counted at depths 1 and 2 and extrapolated to its depth (affine), and for the "
         "published configs batch 1 counted, larger batches derived (counts per batch do not depend on the "
         "batch).", "",
         "## Per image", "",
         "| config | batch | launches ref | launches fast | ref / fast | syncs ref | syncs fast | copies ref | "
         "copies fast | FLOPs | weight bytes ref | weight bytes fast | act. bytes ref (unfused, fp32 scores incl.) | "
         "act. bytes fast (fused) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["configs"]:
        for b, row in e["batches"].items():
            if row.get("fast") is None:
                continue
            ref, fast, t = row["ref"], row["fast"], row["model"]["totals"]
            lb = "≥ " if fast.get("lower_bound") else ""
            L.append(f"| {e['config']} | {b} | {_fmt(ref['launches_per_image'])} | {lb}{_fmt(fast['launches_per_image'])} | "
                     f"**{'≤ ' if lb else ''}{row['launch_ratio']:.1f}×** | {_fmt(ref['syncs_per_image'])} | {_fmt(fast['syncs_per_image'])} | "
                     f"{_fmt(ref['copies_per_image'])} | {_fmt(fast['copies_per_image'])} | {_si(t['ref_flops'], 'FLOP')} "
                     f"(fast {_si(t['fast_flops'], 'FLOP')}) | {_si(t['ref_weight_bytes'], 'B')} | "
                     f"{_si(t['fast_weight_bytes'], 'B')} | {_si(t['ref_act_bytes'], 'B')} | {_si(t['fast_act_bytes'], 'B')} |")
    L += ["", "## MODEL: time per image on an H100 / A100 (floor + launch term)", "",
          f"Floor = per level max(FLOPs / peak, bytes / bandwidth), summed over levels (bf16, "
          f"{BYTES} bytes per element; H100 989 TFLOP/s, 3.0 TB/s; A100 312 TFLOP/s, 2.0 TB/s). Launch term = "
          f"launches × {LAUNCH_COST_S * 1e6:.0f} µs + syncs × {SYNC_COST_S * 1e6:.0f} µs (ASSUMED host costs of an "
          "eager launch / a round trip). The reference's floor counts unfused activations (the fp32 attention scores in memory included), the fast engine's the "
          "fused floor (block inputs/outputs once).", "",
          "| config | batch | H100 floor ref | H100 floor fast | H100 launch term ref | H100 launch term fast | "
          "H100 MODEL ref | H100 MODEL fast | A100 MODEL ref | A100 MODEL fast |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["configs"]:
        for b, row in e["batches"].items():
            if row.get("fast") is None:
                continue
            h, a = row["predicted"]["H100"], row["predicted"]["A100"]
            L.append(f"| {e['config']} | {b} | {h['ref']['floor_s'] * 1e3:.3g} ms | {h['fast']['floor_s'] * 1e3:.3g} ms | "
                     f"{(h['ref']['launch_s'] + h['ref']['sync_s']) * 1e3:.3g} ms | "
                     f"{(h['fast']['launch_s'] + h['fast']['sync_s']) * 1e3:.3g} ms | "
                     f"{h['ref']['predicted_s']:.3g} s | {h['fast']['predicted_s']:.3g} s | "
                     f"{a['ref']['predicted_s']:.3g} s | {a['fast']['predicted_s']:.3g} s |")
    if doc["calibration"]:
        L += ["", "## Calibration of the MODEL against the upstream figures (reference loop)", "",
              "| figure | config | batch | hardware | measured s/image | MODEL s/image (floor + launches + syncs) | "
              "measured / MODEL | implied host time per launch |", "|---|---|---|---|---|---|---|---|"]
        for c in doc["calibration"]:
            p = c["predicted"]
            L.append(f"| {c['name']} ({c['note']}) | {c['config']} | {c['batch']} | {HARDWARE[c['hardware']]['note']} | "
                     f"{c['measured_s_per_image']} | {p['predicted_s']:.3g} (floor {p['floor_s']:.3g} + launches "
                     f"{p['launch_s']:.3g} + syncs {p['sync_s']:.3g}) | **{c['ratio_measured_over_predicted']:.2f}** | "
                     f"{c['implied_host_s_per_launch'] * 1e6:.2f} µs |")
    L += ["", "## Where the launches go (per image, per level)", ""]
    for e in doc["configs"]:
        for b, row in e["batches"].items():
            if row.get("fast") is None:
                continue
            L += [f"### {e['config']}, batch {b}", "",
                  "| level | calls / batch | launches ref | launches fast | syncs ref | syncs fast | fast: top op kinds (launches per image) |",
                  "|---|---|---|---|---|---|---|"]
            ref_l, fast_l = row["ref"]["levels"], row["fast"]["levels"]
            bb = int(b)
            for lbl in sorted(set(ref_l) | set(fast_l), key=_level_order):
                rl, fl = ref_l.get(lbl, {}), fast_l.get(lbl, {})
                kinds = ", ".join(f"{k} {_fmt(n / bb)}" for k, n in list(fl.get("kinds", {}).items())[:6])
                L.append(f"| {lbl} | {rl.get('calls', fl.get('calls', 0))} | {_fmt(rl.get('launches', 0) / bb)} | "
                         f"{_fmt(fl.get('launches', 0) / bb)} | {_fmt(rl.get('syncs', 0) / bb)} | "
                         f"{_fmt(fl.get('syncs', 0) / bb)} | {kinds} |")
            L.append("")
    return "\n".join(L) + "\n"


def _level_order(lbl: str) -> Tuple[int, str]:
    if lbl == "generate":
        return (-1, lbl)
    if lbl.startswith("L"):
        return (int(lbl[1:].split()[0]), lbl)
    return (99, lbl)


def plot(doc: Dict[str, Any], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    entries = [(e["config"], b, row) for e in doc["configs"] for b, row in e["batches"].items() if row.get("fast")]
    if not entries:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    names = [f"{c}\nB={b}" for c, b, _ in entries]
    x = range(len(entries))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], [r["ref"]["launches_per_image"] for _, _, r in entries], 0.4, label="reference loop")
    ax.bar([i + 0.2 for i in x], [r["fast"]["launches_per_image"] for _, _, r in entries], 0.4,
           label="fast engine (triton)")
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("kernel launches per image (log)")
    ax.set_title("launches per image (counted)")
    ax.legend()
    ax = axes[1]
    labels = sorted({lbl for _, _, r in entries for lbl in r["fast"]["levels"]}, key=_level_order)
    bottom = [0.0] * len(entries)
    for lbl in labels:
        vals = [100.0 * r["fast"]["levels"].get(lbl, {}).get("launches", 0) / max(1, r["fast"]["launches"])
                for _, _, r in entries]
        ax.bar(list(x), vals, 0.6, bottom=bottom, label=lbl)
        bottom = [a + v for a, v in zip(bottom, vals)]
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of the fast engine's launches (%)")
    ax.set_title("fast engine: where the launches go, by level")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m benchmarks.launches``: launches/syncs per image of the five published configs (narrow clones,
    batch 1 and 256, reference loop and fast engine) and the roofline MODEL, written to
    ``benchmarks/results/launches/launches.{json,md,png}``; ``--tiny``: the tiny configs (CI)."""
    import argparse
    import json

    from .harness import atomic_write
    p = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the three tiny configs at full width (CI)")
    p.add_argument("--configs", default=None, help="comma-separated config names")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--iters", type=int, default=None,
                   help="iterations per level for every config (default: the reference's; a quick check)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--stem", default=None)
    p.add_argument("--exact-depth", action="store_true",
                   help="count every level at its real depth (default: depths 1 and 2, extrapolated exactly)")
    p.add_argument("--exact-batch", action="store_true",
                   help="count every batch (default for the published configs: batch 1, per batch = any batch)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="published run: count its pieces in this many child processes (default: 2, or 1 on a "
                        "one-core machine; 1 = in this process)")
    p.add_argument("--job", default=None,
                   help="CONFIG:ref|fast:DEPTH[,...] -- pieces of the published run (batch 1), saved for assembly")
    p.add_argument("--resume", action="store_true", help="published run: keep the pieces already saved")
    p.add_argument("--build-only", action="store_true", help="only rebuild the tables from the saved pieces")
    args = p.parse_args(argv)
    configs = args.configs.split(",") if args.configs else list(TINY if args.tiny else PUBLISHED)
    batches = [int(b) for b in args.batches.split(",")]
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "launches")
    stem = args.stem or ("launches_tiny" if args.tiny else "launches")
    raw_dir = os.path.join(out_dir, "raw_" + stem)
    os.makedirs(raw_dir, exist_ok=True)
    if args.job:
        for spec in args.job.split(","):
            c, path, depth = spec.split(":")
            print("wrote " + run_job(c, path, int(depth), raw_dir), flush=True)
        return 0
    results = []
    t0, c0 = time.perf_counter(), time.process_time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    run_info: Dict[str, Any] = {}
    if not args.tiny:
        if not args.build_only:
            jobs = [(c, p_) for c, p_ in published_jobs(configs)
                    if not (args.resume and all(os.path.exists(job_file(raw_dir, c, p_, d)) for d in (1, 2)))]
            run_info = run_jobs(jobs, raw_dir, args.workers)
        for c in configs:
            extra = [cal["batch"] for cal in CALIBRATION if cal["config"] == c and cal["batch"] not in batches]
            r = assemble_jobs(c, raw_dir, batches, extra)
            if r is None:
                print(f"{c}: pieces missing in {raw_dir}, left out", flush=True)
                continue
            results.append(r)
    else:
        for c in configs:
            tc0 = time.process_time()
            from fractal_models import config_kwargs
            iters = [args.iters] * (len(config_kwargs(c)["img_size_list"]) - 1) if args.iters else None
            r = run_config(c, batches, narrow=False, num_iter_list=iters, depth_extrapolation=not args.exact_depth,
                           batch_extrapolation=False)
            r["cpu_s"] = time.process_time() - tc0
            results.append(r)
    for r in results:
        print(f"{r['config']}: " + ", ".join(f"B={b} ref {r['ref'][b]['launches_per_image']:.0f} / fast "
                                             f"{r['fast'][b]['launches_per_image']:.0f} launches per image"
                                             for b in batches) + f" ({r['wall_s']['total']:.0f} s wall, "
                                                                 f"{r['cpu_s']:.0f} s CPU)", flush=True)
    doc = build_document(results, batches)
    doc["cpu_s"] = sum(r.get("cpu_s", 0.0) for r in results)
    doc["wall_s"] = sum(r["wall_s"]["total"] for r in results)
    previous = os.path.join(out_dir, stem + ".json")
    if args.build_only and os.path.exists(previous):  # the tables are rebuilt: the counting run stays described
        with open(previous) as f:
            doc["run"] = {**json.load(f).get("run", {}), "tables_rebuilt": True}
    else:
        doc["run"] = {**run_info, "total_wall_s": time.perf_counter() - t0, "main_cpu_s": time.process_time() - c0,
                      "loadavg_before": load_before,
                      "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
                      "build_only": bool(args.build_only), "resumed": bool(args.resume)}
    files = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    png = plot(doc, os.path.join(out_dir, stem + ".png"))
    if png:
        files["png"] = png
    doc["files"] = files
    md = markdown(doc) + "\n".join(lever_analysis(doc)) + timing_note(doc)
    atomic_write(files["md"], md.encode())
    atomic_write(files["json"], (json.dumps(doc, indent=1, default=str) + "\n").encode())
    print("wrote " + ", ".join(files.values()))
    return 0



# Launches per transformer block in one fast-engine step, read off the code (fractal_models/engine/mar.py _block_fast on a
# kernel backend: norm1, qkv, packed attention, proj, add, norm2, fc1, gelu, fc2, add; engine/ar.py sample: rms_norm,
# wqkv, cache copy, decode kernel, wo, add, rms_norm, w1, silu, w3, mul, w2, add). Used only by the lever analysis.
BLOCK_LAUNCHES = {"MAR": 10, "AR": 13}


def timing_note(doc: Dict[str, Any]) -> str:
    run = doc.get("run", {})
    la = lambda v: "n/a" if not v else ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    head = ""
    if run.get("wall_s") is not None and not run.get("build_only"):
        head = (f"Full run: {run['wall_s']:.0f} s wall counting ({run.get('workers', 1)} worker process(es), one "
                f"intra-op thread each), {run['total_wall_s']:.0f} s end to end including the tables; load average "
                f"(1, 5, 15 min) {la(run.get('loadavg_before'))} before, {la(run.get('loadavg_after'))} after "
                "(the machine is shared). ")
    return (f"\n{head}Sum over the counted pieces: {doc['wall_s']:.0f} s wall, {doc['cpu_s']:.0f} s CPU.\n")


def lever_analysis(doc: Dict[str, Any], batch: str = "1") -> List[str]:
    """Item 4 of the issue, as analysis: what each lever would leave, from the counted per-level tables. The
    launches of one block in one step are counted too: a depth-extrapolated level's depth-2 minus depth-1 count
    over its steps (``BLOCK_LAUNCHES``, read off the code, where a level was counted at one depth only)."""
    from fractal_models import config_kwargs
    lines = ["## Which levers cut the fast engine's launches most (analysis of the counted tables, batch "
             f"{batch})", "",
             "Per level: launches per step of one call = launches / (calls × steps); launches per block and step "
             "= (count at depth 2 - count at depth 1) / (calls × steps), counted (the code has "
             f"{BLOCK_LAUNCHES['MAR']} per MAR block: norm1, qkv, attention, proj, add, norm2, fc1, gelu, fc2, add; "
             f"{BLOCK_LAUNCHES['AR']} per AR block step: rms_norm, wqkv, cache copy, decode attention, wo, add, "
             "rms_norm, w1, silu, w3, mul, w2, add); a level whose blocks already run as one fused block-stack "
             "launch per step (fused_stack=True, or policy.BLOCK_STACK_MAX_WIDTH) counts 0 per block: its stack launch is in "
             "the glue; the rest is per-step glue (embedding, mask/where, gathers, scatter, the final norm). "
             "Scenarios, from today's engine: **A** the wide levels' blocks one fused launch per block too; **B** "
             "one launch per level step (all blocks and the glue of a step in one persistent kernel); **C** = B "
             "plus the pixel heads' value lookup folded into the pixel-head kernel (done: today's pixel heads are "
             "one launch per call, so C = B).", "",
             "| config | level | calls × steps / batch | launches per step | blocks | glue per step | today | A | B | C |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for e in doc["configs"]:
        row = e["batches"].get(batch)
        if not row or not row.get("fast"):
            continue
        kw = config_kwargs(e["config"])
        iters = row["fast"]["num_iter_list"]
        b = int(batch)
        tot = {"today": 0.0, "A": 0.0, "B": 0.0, "C": 0.0}
        for lbl, v in sorted(row["fast"]["levels"].items(), key=lambda kv: _level_order(kv[0])):
            n = v["launches"]
            if lbl.startswith("L") and ("MAR" in lbl or "AR" in lbl) and "guiding" not in lbl:
                lvl = int(lbl[1:].split()[0])
                kind = "MAR" if "MAR" in lbl else "AR"
                side = kw["img_size_list"][lvl] // kw["img_size_list"][lvl + 1]
                steps = min(side * side, iters[lvl]) if kind == "MAR" else side * side
                depth = kw["num_blocks_list"][lvl]
                cs = v["calls"] * steps
                per_step = n / cs
                per_block = BLOCK_LAUNCHES[kind]
                if "at_depth_1" in v:
                    per_block = (v["at_depth_2"] - v["at_depth_1"]) / cs
                glue = per_step - depth * per_block
                # a fused stack (one launch per step for every block: per_block 0) is past A already
                a = n - cs * depth * (per_block - 1) if per_block >= 1 else n
                bb = min(n, cs * 1.0)
                cc = bb
                lines.append(f"| {e['config']} | {lbl} | {_fmt(cs / b)} | {per_step:.1f} | {depth} × "
                             f"{per_block:.4g} | {glue:.1f} | {_fmt(n / b)} | {_fmt(a / b)} | {_fmt(bb / b)} | "
                             f"{_fmt(cc / b)} |")
            else:
                a = bb = n
                cc = min(n, v["calls"]) if "pixel" in lbl else n  # kernel (+ value lookup) -> kernel
                lines.append(f"| {e['config']} | {lbl} | {_fmt(v['calls'] / b)} calls | | | | {_fmt(n / b)} | "
                             f"{_fmt(a / b)} | {_fmt(bb / b)} | {_fmt(cc / b)} |")
            tot["today"] += n
            tot["A"] += a
            tot["B"] += bb
            tot["C"] += cc
        ref = row["ref"]["launches"]
        summary.append(f"| {e['config']} | " + " | ".join(f"{_fmt(tot[k] / b)} ({ref / tot[k]:.1f}×)"
                                                            for k in ("today", "A", "B", "C"))
                       + f" | {_fmt(ref / 20 / b)} | {tot['today'] / (ref / 20):.2f}× |")
    lines += ["", f"Launches per image and ratio reference / fast at batch {batch} (target: ≥ 20× for "
              "fractalar_in64 and fractalmar_large_in256):", "",
              "| config | today | A: + wide blocks fused | B: one launch per step | C: B + fused lookup | 20× allows | "
              "today / allowed |", "|---|---|---|---|---|---|---|"]
    return lines + summary + [""]


if __name__ == "__main__":
    raise SystemExit(main())
