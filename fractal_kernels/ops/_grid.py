"""What the persistent schedules (one launch, grid-wide barriers between phases) share: the barrier counters."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

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
