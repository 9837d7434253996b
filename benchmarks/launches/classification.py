"""The launch classification: which ATen ops launch how many kernels, copies and syncs on CUDA
(:func:`classify`), which tensors are host tensors in the simulated GPU run, and the :class:`Counts` they add up
to (rules: the package docstring)."""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

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
