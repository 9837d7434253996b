"""What the phased launchers (``schedule="phases"``: a launch per phase; ``"persistent"``: one launch, grid-wide
barriers between phases) share on the host: the barrier counters and the launch plan. The barrier itself:
:mod:`._grid_kernels`."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from fractal_kernels.dispatch import triton_interpreting

_BARRIERS: Dict[Tuple[str, int, int], torch.Tensor] = {}


def barrier(device: torch.device) -> torch.Tensor:
    """Two int32 counters (arrivals, exits) for this device and stream, zero between launches (a persistent
    kernel's last program out resets them); one pair per stream, so two streams' launches never share one."""
    real = device.type == "cuda" and torch.cuda.is_available()  # (the AOT capture's GPU views are CPU tensors)
    key = (device.type, device.index or 0, torch.cuda.current_stream(device).stream_id if real else 0)
    bar = _BARRIERS.get(key)
    if bar is None:
        bar = _BARRIERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return bar


def check_schedule(schedule: str) -> None:
    """A phased launcher takes "phases" or "persistent" (its op's "tiles" is another kernel)."""
    if schedule not in ("phases", "persistent"):
        raise ValueError(f"schedule: expected 'phases' or 'persistent', got {schedule!r}")


def launch_plan(schedule: str, device: torch.device, n_phases: int, items: Callable[[int], int],
                cap: int) -> List[Tuple[int, int, int]]:
    """``(first phase, end phase, programs)`` of each launch: one launch per phase, each with at most ``cap``
    programs and no more than the phase has items (``items(phase)``); or, persistent, one launch of every phase
    with the programs of its largest phase (CUDA only: the interpreter runs programs one after another, so a
    grid barrier there would wait forever)."""
    if schedule == "persistent":
        if device.type != "cuda" or triton_interpreting():
            raise ValueError("schedule: 'persistent' (grid barriers) runs on CUDA devices only; use 'phases'")
        return [(0, n_phases, min(cap, max(items(p) for p in range(n_phases))))]
    return [(p, p + 1, min(cap, items(p))) for p in range(n_phases)]
