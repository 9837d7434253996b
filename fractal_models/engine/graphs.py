"""Per-position CUDA graphs for the AR fast engine's op-by-op step (issue #28, item 4): opt-in, GPU only.

An AR level at batch 1 is launch-bound: each decode step is ~110 tiny launches (MODEL, ``shared/PERFORMANCE.md``:
~5 µs an eager launch, ~2 µs a CUDA-graph node). With ``m.step_graphs = True`` (or ``sample(step_graphs=True)``)
the blocks and ``m.norm`` of one step (``engine.ar._blocks_step``, kernel path or torch path) are captured once
per position and replayed: the step reads one static input ``h_in [rows, 1, E]`` and each position's graph
writes its own static output (kept, so later captures cannot take its memory; it may sit where an earlier
position's temporaries were, so it is valid until the level's next replay: the caller consumes it in the step).

Why per position: the step takes the position as a Python int (cache slot views, ``kv_lens``, the RoPE row),
which a graph freezes; one graph per position keeps the step function unchanged.

Caches: the graphs bake in the KV cache's addresses, so the level state here owns its KV caches (made once by
``m.setup_caches``, re-attached to the blocks at every ``sample()`` call, never reallocated while its graphs
live; ``m.clear_caches`` at the end of ``sample()`` only detaches them). A step reads cache slots ``<= pos``,
all written in the same call, so the reused caches need no zeroing.
Other tensors a graph reads must outlive it too: the weights and the RoPE table (held by the module; their
addresses are in the key) and the decode kernel's ``kv_lens`` tensors, which ``tiny_attention_decode`` keeps in
an LRU cache of 1024 entries (``_uniform_lens``): evicting a live graph's entry would leave it reading freed
memory (not guarded here; a level uses ``seq_len`` entries per row count).

Cost and lifetime: a capture costs a warm-up step, a device sync and an allocator flush; one capture per position
per ``sample()`` call would cost more than it saves at batch 1 (the level is called once per step of the level
above, 16 steps a call for ``fractalar_in64``'s level 1). So the graphs stay on the module across ``sample()``
calls, keyed by (rows, device, autocast dtype, backends, parameters, RoPE table, step function) and per
(input dtype, position): a new key frees the old graphs and captures again; :func:`release` (``AR.
release_step_graphs()``) frees them. One memory pool is shared by a level's graphs (replayed in order, one at
a time). Under autocast, the Linear weights are cast once per key and swapped in while capturing: autocast's
own cast cache is freed when the outermost autocast context exits, which would leave the graphs reading freed
memory in the next ``generate`` call.

Status: the CUDA capture has never run (no GPU here); CPU tests drive the same plumbing with :class:`_Recorder`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from fractal_models.layers import autocast_on

_ATTR = "_step_graphs"  # the level's state (not in the state dict)
StepFn = Callable[[nn.Module, torch.Tensor, int, torch.Tensor], torch.Tensor]


class _CudaGraph:
    """One ``torch.cuda.CUDAGraph``: a warm-up run on a side stream (first launches, Triton compiles and
    autotuning, cuBLAS workspaces happen outside the capture), then the capture into the level's shared pool."""

    def __init__(self, device: torch.device, pool: Tuple[Any, "torch.cuda.Stream"]) -> None:
        self.pool, self.stream = pool
        self.device = device
        self.graph = torch.cuda.CUDAGraph()

    @staticmethod
    def new_pool(device: torch.device) -> Tuple[Any, "torch.cuda.Stream"]:
        with torch.cuda.device(device):  # the pool and the side stream on the level's device (not the current)
            return torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)  # h_in was written on the current stream
        with torch.cuda.stream(self.stream):
            fn()
        cur.wait_stream(self.stream)
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
            out = fn()  # recorded, not run: replay() computes it
        return out

    def replay(self) -> None:
        self.graph.replay()


class _Recorder:
    """CPU stand-in for a graph (tests, the dry run): ``capture`` runs the step once and keeps the function and its
    output; ``replay`` runs it again and copies into that output, so the output keeps its storage as a graph's
    does and the plumbing (static buffers, keys, re-capture, release) runs as on a GPU."""

    def __init__(self, device: torch.device, pool: Any) -> None:
        self.fn: Optional[Callable[[], torch.Tensor]] = None
        self.out: Optional[torch.Tensor] = None

    @staticmethod
    def new_pool(device: torch.device) -> None:
        return None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())


#: the graph class off CUDA devices: None = eager there; tests and the CPU dry run set :class:`_Recorder`
_OFF_CUDA: Optional[type] = None


def _graph_class(device: torch.device) -> Optional[type]:
    return _CudaGraph if device.type == "cuda" else _OFF_CUDA


def explain_step_graphs(m: nn.Module, device: torch.device, enabled: Optional[bool] = None,
                        visualize: Any = False) -> Tuple[bool, str]:
    """(whether the op-by-op step of ``m`` runs from per-position graphs on ``device``, why). ``enabled``: the
    sample call's ``step_graphs`` (None = the level's ``step_graphs`` attribute, default False). The fused block
    stack, where chosen, comes first (one launch per step already; the sample loop asks only when not fused)."""
    device = torch.device(device)
    if not (m.__dict__.get("step_graphs", False) if enabled is None else enabled):
        return False, "step_graphs off (the default): eager launches"
    if m.training:
        return False, "train mode: eager"
    if visualize:
        return False, "visualize: eager (a host callback every step)"
    if len(m.blocks) == 0:
        return False, "no blocks"
    cls = _graph_class(device)
    if cls is None:
        return False, ("CPU" if device.type == "cpu" else device.type) + ": CUDA graphs need a CUDA device"
    state = m.__dict__.get(_ATTR)
    if state is not None and state.failed:
        return False, f"capture failed ({state.failed}): eager until release_step_graphs()"
    what = "CUDA graph" if cls is _CudaGraph else "recorded step (CPU stand-in)"
    return True, f"step_graphs=True: one {what} per position, captured on first use and replayed"


class _State:
    """A level's graphs for one key: its KV caches, static inputs (per dtype), per-position graphs and their
    outputs, the shared pool, and (under autocast) the cast Linear weights the graphs read."""

    def __init__(self, m: nn.Module, key: tuple, rows: int, device: torch.device, freqs: torch.Tensor,
                 cls: type, amp: Optional[torch.dtype]) -> None:
        self.key, self.device, self.cls, self.amp = key, device, cls, amp
        m.setup_caches(rows, m.seq_len, device=device, freqs_cis=freqs)  # the module's own caches, kept here
        self.caches = [b.attention.kv_cache for b in m.blocks]
        self.pool = cls.new_pool(device)
        self.inputs: Dict[torch.dtype, torch.Tensor] = {}
        self.graphs: Dict[Tuple[torch.dtype, int], Tuple[Any, torch.Tensor]] = {}
        self.captures = self.replays = 0
        self.failed: Optional[str] = None
        # autocast casts fp32 weights for the Linear layers only (the norms run in fp32); the same .to() here
        self.casts: List[Tuple[nn.Module, str, torch.Tensor]] = [] if amp is None else [
            (mod, name, p.detach().to(amp)) for mod in m.blocks.modules() if isinstance(mod, nn.Linear)
            for name, p in mod.named_parameters(recurse=False) if p.dtype == torch.float32]

    def attach(self, m: nn.Module) -> None:
        for b, c in zip(m.blocks, self.caches):
            b.attention.kv_cache = c

    def __reduce__(self):  # deepcopy / pickle of the module: graphs and caches are not copied
        return _none, ()


def _none() -> None:
    return None


@contextlib.contextmanager
def _swapped(casts: List[Tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """The cast weights in place of the parameters for the duration (what ``functional_call`` does)."""
    saved = [(mod, name, mod._parameters[name]) for mod, name, _ in casts]
    try:
        for mod, name, t in casts:
            mod._parameters[name] = t
        yield
    finally:
        for mod, name, p in saved:
            mod._parameters[name] = p


class _Runner:
    """One ``sample()`` call's view of the level's state: ``step(h, pos)`` replaces ``step_fn(m, h, pos, freqs)``."""

    def __init__(self, state: _State, m: nn.Module, freqs: torch.Tensor, step_fn: StepFn) -> None:
        self.state, self.m, self.freqs, self.step_fn = state, m, freqs, step_fn

    def _run(self, h_in: torch.Tensor, pos: int) -> torch.Tensor:
        st = self.state
        # autocast's cast cache off while capturing: a cast it would cache outside the graph's pool is freed
        # when the caller's autocast exits (the Linear weights are pre-cast, so none is expected)
        amp = (torch.autocast(st.device.type, dtype=st.amp, cache_enabled=False) if st.amp is not None
               else contextlib.nullcontext())
        with torch.no_grad(), amp, _swapped(st.casts):
            return self.step_fn(self.m, h_in, pos, self.freqs)

    def step(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """The step at ``pos`` for ``h`` ``[rows, 1, E]`` -> ``[rows, E]``: the graph's static output, valid
        until the level's next replay (clone it to keep it longer)."""
        st = self.state
        h_in = st.inputs.get(h.dtype)
        if h_in is None:
            h_in = st.inputs[h.dtype] = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        h_in.copy_(h)
        hit = st.graphs.get((h.dtype, pos))
        if hit is None:
            if st.failed:
                return self.step_fn(self.m, h, pos, self.freqs)
            g = st.cls(st.device, st.pool)
            try:
                out = g.capture(lambda: self._run(h_in, pos))
            except Exception as e:  # noqa: BLE001 - eager from here on, and explain_step_graphs says why
                st.failed = f"{type(e).__name__}: {str(e)[:200]}"
                warnings.warn(f"step graphs: capture at position {pos} failed ({st.failed}); running eagerly")
                return self.step_fn(self.m, h, pos, self.freqs)
            hit = st.graphs[(h.dtype, pos)] = (g, out)
            st.captures += 1
        hit[0].replay()
        st.replays += 1
        return hit[1]


def _key(m: nn.Module, rows: int, device: torch.device, freqs: torch.Tensor, step_fn: StepFn,
         amp: Optional[torch.dtype]) -> tuple:
    """What the graphs bake in: a parameter replaced (new address) or changed in place (version; the autocast
    casts copy it) or a new RoPE table, backend, shape or step function means capturing again."""
    params = list(m.blocks.parameters()) + list(m.norm.parameters())
    return (rows, device, amp, tuple(b.attention.backend for b in m.blocks), freqs.data_ptr(), step_fn,
            tuple((p.data_ptr(), p._version) for p in params))


def begin(m: nn.Module, rows: int, device: torch.device, freqs: torch.Tensor, step_fn: StepFn,
          enabled: Optional[bool] = None, visualize: Any = False) -> Optional[_Runner]:
    """At the start of the op-by-op sample loop: a runner with the level's static caches attached to its blocks,
    or None (eager: the caller sets up its own caches; :func:`explain_step_graphs` says why)."""
    device = torch.device(device)
    if not explain_step_graphs(m, device, enabled, visualize)[0]:
        return None
    amp = torch.get_autocast_dtype(device.type) if autocast_on(device.type) else None
    key = _key(m, rows, device, freqs, step_fn, amp)
    state = m.__dict__.get(_ATTR)
    if state is None or state.key != key:
        m.__dict__.pop(_ATTR, None)  # the old graphs and caches go before the new ones are made
        state = m.__dict__[_ATTR] = _State(m, key, rows, device, freqs, _graph_class(device), amp)
    state.attach(m)
    return _Runner(state, m, freqs, step_fn)


def release(m: nn.Module) -> bool:
    """Free the level's step graphs, static caches and buffers (``AR.release_step_graphs()``); True if any."""
    return m.__dict__.pop(_ATTR, None) is not None


def info(m: nn.Module) -> Optional[Dict[str, Any]]:
    """The level's graph state for tests and measurements: rows, positions captured, captures and replays so
    far, the static input and KV-cache addresses, a capture failure; None without graphs."""
    st = m.__dict__.get(_ATTR)
    if st is None:
        return None
    return dict(rows=st.key[0], positions=sorted(p for _, p in st.graphs), captures=st.captures,
                replays=st.replays, input_ptrs={str(d): t.data_ptr() for d, t in st.inputs.items()},
                kv_ptrs=[c.kv.data_ptr() for c in st.caches], failed=st.failed)
