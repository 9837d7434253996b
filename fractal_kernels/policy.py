"""Dispatch policy data: which CUDA ops ``auto`` may use, and where SDPA beats the Triton attention kernel.

Two files, each looked up in two places:

* the **package data** ``fractal_kernels/data/<file>``, shipped in the wheel (and the same file in a checkout,
  so an installed copy and an editable checkout decide alike from the same data);
* the **overlay** ``$FRACTAL_HOME/<file>`` (default ``$XDG_CACHE_HOME/fractal_kernels``, i.e.
  ``~/.cache/fractal_kernels``), where a GPU run on this machine records what it verified and measured
  (``python -m benchmarks.verify_cuda``, ``fractal-bench --full``). It is user-writable; site-packages need
  not be.

Files:

* ``cuda_verified.json`` ``{"ops": [...], "runs": {op: {"passed": bool, ...}}}``. An op the overlay mentions
  (in ``ops`` or ``runs``) is decided by the overlay: verified iff it is in the overlay's ``ops``, so a failed
  run on this machine withdraws a packaged claim. Other ops: the package's ``ops``.
* ``attention_crossover.json`` ``{device name: {dtype: {head dim: length}}}``: an overlay entry for a device
  replaces the package's entry for that device.

Both are read once per process (:func:`load`, cached) -- the dispatch is on the hot path; writers and tests
call :func:`reload` (``fractal_kernels.dispatch.reload`` does it too). An unreadable file is reported once as
a ``RuntimeWarning`` and counts as absent. :func:`describe` says which file decided what
(``fractalgen info`` prints it).
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from fractal_kernels._io import atomic_write

VERIFIED = "cuda_verified.json"
CROSSOVER = "attention_crossover.json"
FILES = (VERIFIED, CROSSOVER)
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

_LOCK = threading.Lock()
_CACHE: Dict[str, "Policy"] = {}


def home() -> str:
    """The overlay folder: ``$FRACTAL_HOME``, else ``$XDG_CACHE_HOME/fractal_kernels``, else
    ``~/.cache/fractal_kernels``."""
    explicit = os.environ.get("FRACTAL_HOME")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fractal_kernels")


def package_path(name: str) -> str:
    """``fractal_kernels/data/<name>`` (inside site-packages for an installed copy)."""
    return os.path.join(PACKAGE_DIR, name)


def overlay_path(name: str) -> str:
    """``$FRACTAL_HOME/<name>``."""
    return os.path.join(home(), name)


def read_document(path: str) -> Tuple[Optional[dict], str]:
    """``(document, status)``: status is ``"read"``, ``"absent"`` or ``"unreadable: ..."`` (document None)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None, "absent"
    except (OSError, ValueError) as e:
        return None, f"unreadable: {type(e).__name__}: {str(e)[:200]}"
    if not isinstance(doc, dict):
        return None, f"unreadable: expected a JSON object, got {type(doc).__name__}"
    return doc, "read"


def write_document(path: str, doc: Mapping[str, Any]) -> str:
    """Write ``doc`` as JSON to a temp file beside ``path`` and rename it over ``path`` (never half a file)."""
    return atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _verified_ops(doc: Optional[dict]) -> Tuple[FrozenSet[str], FrozenSet[str]]:
    """(listed ops, ops the document decides: listed or with a recorded run)."""
    if not doc:
        return frozenset(), frozenset()
    ops = doc.get("ops", [])
    runs = doc.get("runs", {})
    listed = frozenset(str(o) for o in ops) if isinstance(ops, list) else frozenset()
    decided = listed | (frozenset(str(o) for o in runs) if isinstance(runs, dict) else frozenset())
    return listed, decided


def merge_verified(base: Optional[dict], top: Optional[dict]) -> dict:
    """``top`` over ``base`` as the loader applies an overlay: ops ``top`` decides follow ``top``."""
    base_ops, _ = _verified_ops(base)
    top_ops, top_decided = _verified_ops(top)
    runs = dict((base or {}).get("runs") or {})
    runs.update((top or {}).get("runs") or {})
    return {"ops": sorted((base_ops - top_decided) | top_ops), "runs": runs}


def _crossover_entries(doc: Optional[dict]) -> Dict[str, Dict[str, Dict[str, int]]]:
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    for device, table in (doc or {}).items():
        if not isinstance(table, dict):
            continue
        clean: Dict[str, Dict[str, int]] = {}
        for dtype, by_d in table.items():
            if isinstance(by_d, dict):
                try:
                    clean[str(dtype)] = {str(d): int(length) for d, length in by_d.items()}
                except (TypeError, ValueError):
                    continue
        out[str(device)] = clean
    return out


def merge_crossover(base: Optional[dict], top: Optional[dict]) -> dict:
    """``top`` over ``base``: a device entry of ``top`` replaces ``base``'s."""
    merged = _crossover_entries(base)
    merged.update(_crossover_entries(top))
    return merged


@dataclass(frozen=True)
class Policy:
    """The effective policy of this process and where each part came from."""
    verified: FrozenSet[str]
    verified_source: Mapping[str, str]      # op -> the file that decided it (listed or withdrawn)
    crossover: Mapping[str, Mapping[str, Mapping[str, int]]]  # device -> dtype -> head dim -> length
    crossover_source: Mapping[str, str]     # device -> file
    files: Tuple[Tuple[str, str], ...]      # (path, "read" | "absent" | "unreadable: ...") in read order

    def crossover_length(self, device_name: str, dtype_name: str, head_dim: int) -> Optional[int]:
        try:
            return int(self.crossover[device_name][dtype_name][str(head_dim)])
        except (KeyError, TypeError, ValueError):
            return None


def _load() -> Policy:
    files: List[Tuple[str, str]] = []
    docs: Dict[Tuple[str, str], Optional[dict]] = {}
    for name in FILES:
        for where, path in (("package", package_path(name)), ("overlay", overlay_path(name))):
            doc, status = read_document(path)
            files.append((path, status))
            docs[(name, where)] = doc
            if status.startswith("unreadable"):
                warnings.warn(f"fractal_kernels: dispatch policy file {path} is {status}; ignoring it",
                              RuntimeWarning, stacklevel=3)
    pkg_ops, pkg_decided = _verified_ops(docs[(VERIFIED, "package")])
    top_ops, top_decided = _verified_ops(docs[(VERIFIED, "overlay")])
    source = {op: package_path(VERIFIED) for op in pkg_decided}
    source.update({op: overlay_path(VERIFIED) for op in top_decided})
    pkg_cross = _crossover_entries(docs[(CROSSOVER, "package")])
    top_cross = _crossover_entries(docs[(CROSSOVER, "overlay")])
    cross_source = {dev: package_path(CROSSOVER) for dev in pkg_cross}
    cross_source.update({dev: overlay_path(CROSSOVER) for dev in top_cross})
    return Policy(verified=(pkg_ops - top_decided) | top_ops, verified_source=source,
                  crossover=merge_crossover(docs[(CROSSOVER, "package")], docs[(CROSSOVER, "overlay")]),
                  crossover_source=cross_source, files=tuple(files))


def load() -> Policy:
    """The policy of this process: read on first use, then cached (no file access per call)."""
    policy = _CACHE.get("policy")
    if policy is None:
        with _LOCK:
            policy = _CACHE.get("policy")
            if policy is None:
                policy = _CACHE["policy"] = _load()
    return policy


def clear() -> None:
    """Forget the cached policy; the next :func:`load` reads the files again."""
    with _LOCK:
        _CACHE.pop("policy", None)
        _CACHE.pop("block_stack", None)
        _CACHE.pop("attention_model", None)


def reload() -> Policy:
    """Read the files again now (after writing one, or in tests)."""
    clear()
    return load()


def describe(device_name: Optional[str] = None, ops: Tuple[str, ...] = ()) -> List[str]:
    """Lines saying which file each dispatch decision comes from (for ``fractalgen info``): the CUDA
    verification of ``ops`` (and of every op a file mentions) and the crossover of each recorded device."""
    p = load()
    lines = [f"package data: {PACKAGE_DIR}", f"overlay: {home()} "
             f"({'$FRACTAL_HOME' if os.environ.get('FRACTAL_HOME') else 'set FRACTAL_HOME to move it'})"]
    lines += [f"  {status:<8} {path}" for path, status in p.files]
    for op in sorted(set(ops) | set(p.verified_source)):
        if op in p.verified_source:
            state = "verified: auto may use the CUDA extension" if op in p.verified else "not verified"
            lines.append(f"cuda {op}: {state} (from {p.verified_source[op]})")
        else:
            lines.append(f"cuda {op}: not verified (no entry in either file)")
    if p.crossover:
        for dev in sorted(p.crossover):
            table = ", ".join(f"{dt} D={d}: L>={n}" for dt, by_d in sorted(p.crossover[dev].items())
                              for d, n in sorted(by_d.items(), key=lambda kv: int(kv[0])))
            here = " [this device]" if device_name is not None and dev == device_name else ""
            lines.append(f"attention crossover on {dev!r}{here}: {table or 'none'} (from {p.crossover_source[dev]})")
    model = attention_model_table()
    fallback = "the MODEL's length for the GPU's arch (below)" if model else "the kernel up to its maximum length"
    if device_name is not None and device_name not in p.crossover:
        lines.append(f"attention crossover on {device_name!r}: none measured: auto follows {fallback}")
    elif device_name is None and not p.crossover:
        lines.append(f"attention crossover: none measured: auto follows {fallback}")
    if model:
        lines.append(f"attention, SDPA from L (MODEL, {package_path(BLOCK_STACK)}): " + ", ".join(
            f"{dt} {arch} D={d}: {'never' if n is None else n}" for (dt, arch, d), n in sorted(model.items())))
    table = block_stack_table()
    for src in sorted({path for _, path in table.values()}):
        keys = sorted(k for k, (_, path) in table.items() if path == src)
        fused = [f"{op} {dt} {arch} D={w}: N in {list(map(list, table[(op, dt, arch, w)][0]))}"
                 for op, dt, arch, w in keys if table[(op, dt, arch, w)][0]]
        lines.append(f"fused block stacks ({len(keys)} entries, from {src}): "
                     + ("; ".join(fused) if fused else "op by op wins at every N of every entry: never fused by "
                        "default (fused_stack=True forces it)"))
    if not table:
        lines.append("fused block stacks: no crossover data: never fused by default (fused_stack=True forces it)")
    return lines


# ------------------------------------------------------------------------------ fused block stacks: crossovers
BLOCK_STACK = "block_stack_model.json"


def _block_stack_entries(doc: Optional[dict]) -> Dict[Tuple[str, str, str, str], Tuple[Tuple[int, int], ...]]:
    """``{(op, dtype, arch, width): ((lo, hi), ...)}`` of a block-stack crossover document (malformed entries
    skipped)."""
    out: Dict[Tuple[str, str, str, str], Tuple[Tuple[int, int], ...]] = {}
    entries = (doc or {}).get("entries")
    if not isinstance(entries, dict):
        return out
    for op, by_dtype in entries.items():
        for dtype, by_arch in (by_dtype.items() if isinstance(by_dtype, dict) else ()):
            for arch, by_width in (by_arch.items() if isinstance(by_arch, dict) else ()):
                for width, entry in (by_width.items() if isinstance(by_width, dict) else ()):
                    try:
                        runs = tuple((int(lo), int(hi)) for lo, hi in entry["fused_n"])
                    except (KeyError, TypeError, ValueError):
                        continue
                    out[(str(op), str(dtype), str(arch), str(width))] = runs
    return out


def block_stack_table() -> Dict[Tuple[str, str, str, str], Tuple[Tuple[Tuple[int, int], ...], str]]:
    """``{(op, dtype, "sm_XX", width): (fused N ranges, file)}``: the package's modeled crossovers
    (``benchmarks.costmodel``, a MODEL) with the overlay's entries (a measured GPU run) over them, per entry.
    Read once per process; :func:`clear` forgets it."""
    table = _CACHE.get("block_stack")
    if table is None:
        with _LOCK:
            table = _CACHE.get("block_stack")
            if table is None:
                table = {}
                for path in (package_path(BLOCK_STACK), overlay_path(BLOCK_STACK)):
                    doc, status = read_document(path)
                    if status.startswith("unreadable"):
                        warnings.warn(f"fractal_kernels: dispatch policy file {path} is {status}; ignoring it",
                                      RuntimeWarning, stacklevel=3)
                    table.update({k: (v, path) for k, v in _block_stack_entries(doc).items()})
                _CACHE["block_stack"] = table
    return table


def block_stack_ranges(op: str, dtype: str, arch: int, width: int) -> Optional[Tuple[Tuple[int, int], ...]]:
    """The N ranges (inclusive) where the fused block stack ``op`` wins for this dtype (``"bfloat16"``...), GPU
    arch (90, 80) and level width, or None where no file has an entry (then dispatch does not fuse by itself)."""
    hit = block_stack_table().get((op, dtype, f"sm_{arch}", str(width)))
    return None if hit is None else hit[0]


#: Widest level whose blocks fuse by default (``fused_stack`` None): 0, none -- issue #28's safe default. A fused step
#: streams the level's weights through one CTA per sequence / 16 rows (MODEL: slower than op by op on a GPU at every
#: published shape, ``python -m benchmarks.costmodel``); ``fused_stack=True`` forces it. Tests change it.
BLOCK_STACK_MAX_WIDTH = 0

_BLOCK_STACK_DEFAULT_WHY = ("default: op by op (MODEL: a fused step streams the whole level's weights through one CTA "
                            "per sequence / 16 rows, slower than op by op on a GPU; fused_stack=True forces it)")


def block_stack_rule(width: int, fuse: Optional[bool] = None, *, op: Optional[str] = None, n: Optional[int] = None,
                     dtype: Optional[str] = None, arch: Optional[int] = None) -> Tuple[bool, str]:
    """Whether a level of ``width`` fuses its blocks by policy (before backend availability), and why.
    ``fuse`` is the level's ``fused_stack``: True / False force, None = the default rule: where the call says its
    ``op``, ``n`` (sequences / rows), weight ``dtype`` (``"bfloat16"``...) and GPU ``arch`` and a crossover file
    has an entry for them (:func:`block_stack_table`: the package's MODEL, a measured overlay over it), that entry
    decides per N; otherwise the width rule (``BLOCK_STACK_MAX_WIDTH``)."""
    if fuse is False:
        return False, "fused_stack=False on the level"
    if fuse:
        return True, "fused_stack=True on the level"
    if op is not None and n is not None and dtype is not None and arch is not None:
        hit = block_stack_table().get((op, dtype, f"sm_{arch}", str(width)))
        if hit is not None:
            runs, src = hit
            kind = "measured" if src == overlay_path(BLOCK_STACK) else "MODEL"
            if any(lo <= n <= hi for lo, hi in runs):
                return True, f"N={n}: the fused stack wins here ({kind} crossover data, {src})"
            return False, (f"op by op: at N={n} the fused stack loses ({kind} crossover data, {src}: fused only at N "
                           f"in {[list(r) for r in runs] or 'no range'})")
    if width > BLOCK_STACK_MAX_WIDTH:
        return False, _BLOCK_STACK_DEFAULT_WHY
    return True, f"width {width} <= BLOCK_STACK_MAX_WIDTH={BLOCK_STACK_MAX_WIDTH}"


def crossover_rule(op: str, width: int, force: Optional[bool], *, n: Optional[int], dtype: Optional[str],
                   arch: Optional[int], attr: str, what: str, default: str) -> Tuple[bool, str]:
    """An opt-in alternative of a level step (the AR skinny-linear step, the MAR fused-linear step) and why: the
    level's ``attr`` (True / False) forces it; otherwise only crossover data turns it on -- the entry of
    :func:`block_stack_table` for (``op``, ``dtype``, ``arch``, ``width``) with ``n`` inside one of its ranges.
    No entry or no GPU arch: off, ``default`` says why; an entry but no ``n`` (a policy view): off, and the why
    says at which N it would run."""
    if force is False:
        return False, f"{attr}=False on the level"
    if force:
        return True, f"{attr}=True on the level"
    hit = None if arch is None or dtype is None else block_stack_table().get((op, dtype, f"sm_{arch}", str(width)))
    if hit is None:
        return False, default
    runs, src = hit
    kind = "measured" if src == overlay_path(BLOCK_STACK) else "MODEL"
    if n is None:  # a policy view without a call (fractalgen info): say where it would run
        return False, (f"per call on sm_{arch}: {what} at N in {[list(r) for r in runs] or 'no range'} ({kind} "
                       f"crossover data, {src}), else aten linears; {attr}=True forces it")
    if any(lo <= n <= hi for lo, hi in runs):
        return True, f"N={n}: {what} wins here ({kind} crossover data, {src})"
    return False, (f"at N={n} {what} loses ({kind} crossover data, {src}: only at N in "
                   f"{[list(r) for r in runs] or 'no range'})")


PIXEL_PHASES_OP = "pixel_head_phases"  # the phased pixel head (a launch per phase) vs the tile kernel
PIXEL_PERSISTENT_OP = "pixel_head_persistent"  # the same phases in one launch with grid barriers
AR_PHASES_OP = "ar_step_phases"  # the phased AR decode step (ar_block_stack_decode) vs op by op
AR_PERSISTENT_OP = "ar_step_persistent"
PIXEL_HEAD_SCHEDULES = ("tiles", "phases", "persistent")
_SCHEDULE_OPS = {"pixel_head": (PIXEL_PHASES_OP, PIXEL_PERSISTENT_OP, "FRACTAL_PIXEL_HEAD_SCHEDULE"),
                 "ar_step": (AR_PHASES_OP, AR_PERSISTENT_OP, "FRACTAL_AR_STEP_SCHEDULE")}


def schedule_rule(op: str, width: int, *, schedule: Optional[str] = None, rows: Optional[int],
                  dtype: Optional[str], arch: Optional[int]) -> Tuple[str, str]:
    """The work split of a phased op (``op``: "pixel_head" or "ar_step") at ``rows`` rows per call and why:
    ``schedule`` (or ``$FRACTAL_PIXEL_HEAD_SCHEDULE`` / ``$FRACTAL_AR_STEP_SCHEDULE``) when given; else "phases"
    inside the crossover data's ranges for its phases op (the MODEL, or a measured overlay), "tiles" outside them
    or without a GPU ``arch``. "persistent" (grid barriers: never run on a GPU yet, and a barrier that is not
    reached hangs the launch) only where a *measured* overlay entry for its persistent op says so; the MODEL alone
    never picks it. "tiles" is the op's one-program-per-tile kernel (the AR step: op by op for the engine)."""
    phases_op, persistent_op, env = _SCHEDULE_OPS[op]
    choice = schedule or os.environ.get(env) or "auto"
    if choice not in PIXEL_HEAD_SCHEDULES + ("auto",):
        raise ValueError(f"schedule: expected one of {PIXEL_HEAD_SCHEDULES} or None/'auto', got {choice!r}")
    if choice != "auto":
        return choice, "forced (schedule=...)" if schedule else f"forced (${env})"
    key = lambda o: (o, dtype or "", f"sm_{arch}", str(width))  # noqa: E731
    table = block_stack_table() if arch is not None and dtype else {}
    hit = table.get(key(persistent_op))
    if hit and hit[1] == overlay_path(BLOCK_STACK) and rows is not None and any(lo <= rows <= hi for lo, hi in hit[0]):
        return "persistent", f"rows={rows}: the persistent schedule wins here (measured crossover data, {hit[1]})"
    hit = table.get(key(phases_op))
    if hit is None:
        return "tiles", (f"no crossover data for W={width} {dtype} on sm_{arch}: tiles" if arch is not None
                         else "no GPU arch: tiles")
    runs, src = hit
    kind = "measured" if src == overlay_path(BLOCK_STACK) else "MODEL"
    if rows is None:
        return "tiles", f"per call on sm_{arch}: phases at rows in {[list(r) for r in runs]} ({kind}, {src})"
    if any(lo <= rows <= hi for lo, hi in runs):
        return "phases", f"rows={rows}: the phases win here ({kind} crossover data, {src})"
    return "tiles", f"rows={rows}: tiles win here ({kind} crossover data, {src}: phases only at rows in " \
                    f"{[list(r) for r in runs] or 'no range'})"


def pixel_head_schedule_rule(width: int, *, schedule: Optional[str] = None, rows: Optional[int],
                             dtype: Optional[str], arch: Optional[int]) -> Tuple[str, str]:
    """:func:`schedule_rule` of the pixel head ("tiles": the tile kernel, a program per 8 pixels)."""
    return schedule_rule("pixel_head", width, schedule=schedule, rows=rows, dtype=dtype, arch=arch)


# ------------------------------------------------------------------- attention: the MODEL's SDPA crossover length
ATTENTION_MODEL_OP = "attention_sdpa"  # benchmarks.costmodel.attention.OP: entries of the package's BLOCK_STACK file


def attention_model_table() -> Dict[Tuple[str, str, str], Optional[int]]:
    """``{(dtype, "sm_XX", head dim): sdpa_from_l}`` of the package's ``block_stack_model.json`` (op
    :data:`ATTENTION_MODEL_OP`, ``python -m benchmarks.costmodel --write-policy``: a MODEL; None = SDPA wins nowhere
    up to the kernels' longest length). Package data only: a measured crossover is ``attention_crossover.json``'s
    (per device name). Read once per process; :func:`clear` forgets it."""
    table = _CACHE.get("attention_model")
    if table is None:
        doc, _ = read_document(package_path(BLOCK_STACK))  # an unreadable file: block_stack_table() warns
        table = {}
        by_dtype = ((doc or {}).get("entries") or {}).get(ATTENTION_MODEL_OP)
        for dtype, by_arch in (by_dtype.items() if isinstance(by_dtype, dict) else ()):
            for arch, by_d in (by_arch.items() if isinstance(by_arch, dict) else ()):
                for d, entry in (by_d.items() if isinstance(by_d, dict) else ()):
                    length = entry.get("sdpa_from_l", False) if isinstance(entry, dict) else False
                    if length is None or (isinstance(length, int) and not isinstance(length, bool)):
                        table[(str(dtype), str(arch), str(d))] = length
        _CACHE["attention_model"] = table
    return table


def attention_sdpa_rule(L: int, D: int, dtype: str, *, device_name: str, arch: Optional[int]) -> Tuple[bool, str]:
    """Whether ``auto`` hands an attention call of length ``L`` (within the kernels' limit) to PyTorch SDPA, and
    why: a measured crossover for ``device_name`` (:attr:`Policy.crossover_length`: the package's or the overlay's
    ``attention_crossover.json``) first; else, with a GPU ``arch``, the MODEL's length for (``dtype``, arch, ``D``)
    (:func:`attention_model_table`); else the kernel."""
    p = load()
    measured = p.crossover_length(device_name, dtype, D)
    if measured is not None:
        return L >= measured, (f"L={L}, measured crossover on {device_name!r}: SDPA from L={measured} "
                               f"({p.crossover_source.get(device_name)})")
    key = (dtype, f"sm_{arch}", str(D))
    if arch is not None and key in attention_model_table():
        length = attention_model_table()[key]
        if length is None:
            return False, (f"L={L}, MODEL ({package_path(BLOCK_STACK)}): on sm_{arch} D={D} tiny_attention wins at "
                           f"every length it takes")
        return L >= length, f"L={L}, MODEL crossover on sm_{arch} D={D}: SDPA from L={length} " \
                            f"({package_path(BLOCK_STACK)})"
    return False, (f"L={L}: no crossover for {device_name or 'this device'!r} {dtype} D={D}: the kernel up to its "
                   f"longest length")
