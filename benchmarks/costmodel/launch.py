"""The per-launch time formula of the cost MODEL (``shared/PERFORMANCE.md``, "Three questions per launch").

A :class:`Launch` says what one kernel launch does: its grid (CTAs), how many CTAs fit an SM, the bytes and FLOPs
of each CTA's work item, the bytes it keeps in flight, how many items a persistent CTA runs one after another,
and the launch cost kind. :func:`launch_time` returns the modeled time and which term bound it:

    device = max(HBM bytes / HBM bandwidth,
                 L2 bytes / L2 bandwidth,
                 per-CTA streaming time (Little's law: bytes x latency / bytes in flight) x rounds,
                 per-CTA compute time (CTAs sharing an SM share its peak) x rounds)
    time   = device + launch cost (eager PyTorch op, bare Triton launch, CUDA-graph node, or a grid barrier
             between the phases of one persistent launch)

rounds = waves (``ceil(grid / (SMs x CTAs per SM))``) x items per CTA. HBM bytes: the distinct bytes of the
launch when its working set fits the L2 (``l2_plan_bytes``), else every byte every CTA reads (re-reads miss).
The streaming latency is the L2 one when the working set fits the L2 and the launch reads its
bytes at least twice over (most reads are then re-reads), else the HBM one (first touch: weights and
activations are assumed not to survive in the L2 from the previous launch). All of it is a
MODEL: nothing here has run on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from .constants import BARRIER_L2_TRIPS, HARDWARE, Hardware

LAUNCH_KINDS = ("eager", "triton", "graph", "barrier")
UNITS = ("HGMMA", "HMMA", "FMA", "none")


@dataclass
class Launch:
    """One kernel launch (a MODEL input). Bytes and FLOPs are per CTA *item* (one tile / sequence / row block)."""
    kernel: str
    grid_ctas: int
    ctas_per_sm: int
    bytes_per_cta: float            # bytes one item reads + writes (weights, activations, scratch)
    in_flight_bytes: float          # bytes one CTA keeps in flight (tiles ahead: max(1, num_stages - 1))
    unique_bytes: float             # distinct bytes the whole launch touches (the HBM floor when they fit L2)
    weight_bytes: float = 0.0       # distinct weight bytes of the launch (for the tables and the 8 MB target)
    flops_per_cta: float = 0.0      # per item
    unit: str = "none"
    items_per_cta: int = 1          # persistent grids: items a CTA runs one after another
    launch_kind: str = "eager"
    working_set_bytes: Optional[float] = None  # what must stay in L2 for re-reads to hit (default unique_bytes)
    note: str = ""
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launch_kind not in LAUNCH_KINDS:
            raise ValueError(f"launch_kind: expected one of {LAUNCH_KINDS}, got {self.launch_kind!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit: expected one of {UNITS}, got {self.unit!r}")
        if self.grid_ctas < 1 or self.ctas_per_sm < 1 or self.items_per_cta < 1:
            raise ValueError(f"{self.kernel}: grid, CTAs per SM and items per CTA must be >= 1")

    @property
    def flops(self) -> float:
        return self.flops_per_cta * self.grid_ctas * self.items_per_cta

    @property
    def total_bytes(self) -> float:
        return self.bytes_per_cta * self.grid_ctas * self.items_per_cta


def phase_launch(kernel: str, items: int, cap: int, per_item: float, per_trip: float, weights: float, unique: float,
                 flops: float, launch_kind: str, ctas: int) -> Launch:
    """One phase of a phased kernel (the pixel head's, the AR step's): ``items`` work items over at most ``cap``
    programs (persistent: each runs its share one after another), one loop trip's loads in flight, FMA."""
    grid = max(1, min(items, cap))
    return Launch(kernel=kernel, grid_ctas=grid, ctas_per_sm=ctas, bytes_per_cta=per_item,
                  in_flight_bytes=max(1.0, min(per_trip, per_item)), unique_bytes=unique, weight_bytes=weights,
                  flops_per_cta=flops, unit="FMA", items_per_cta=math.ceil(items / grid), launch_kind=launch_kind)


def occupancy(regs: int, warps: int, smem: int = 0, hw: Hardware = HARDWARE["H100"]) -> int:
    """CTAs resident per SM from registers per thread, warps per CTA and shared memory per CTA (spec limits;
    register allocation granularity ignored)."""
    limits = [hw.max_ctas_per_sm, hw.max_warps_per_sm // max(1, warps)]
    if regs:
        limits.append(hw.regs_per_sm // (regs * 32 * warps))
    if smem:
        limits.append(hw.smem_per_sm // smem)
    return max(1, min(limits))


def unit_peak(unit: str, hw: Hardware) -> float:
    if unit == "HGMMA":
        return hw.hgmma_flops or hw.hmma_flops
    if unit == "HMMA":
        return hw.hmma_flops
    return hw.fma_flops


def launch_cost(kind: str, hw: Hardware) -> float:
    if kind == "barrier":  # a grid-wide barrier inside a persistent launch: see constants.BARRIER_L2_TRIPS
        return BARRIER_L2_TRIPS * hw.l2_latency_s
    return {"eager": hw.launch_eager_s, "triton": hw.launch_triton_s, "graph": hw.launch_graph_s}[kind]


def launch_time(launch: Launch, hw: Hardware = HARDWARE["H100"]) -> Dict[str, object]:
    """``{"seconds", "us", "bound", "terms": {term: seconds}, "waves", "rounds"}`` of one launch (a MODEL)."""
    slots = hw.sms * launch.ctas_per_sm
    waves = math.ceil(launch.grid_ctas / slots)
    rounds = waves * launch.items_per_cta
    working = launch.unique_bytes if launch.working_set_bytes is None else launch.working_set_bytes
    fits_l2 = working <= hw.l2_plan_bytes
    hbm_bytes = launch.unique_bytes if fits_l2 else max(launch.unique_bytes, launch.total_bytes)
    reuse = launch.total_bytes / max(1.0, launch.unique_bytes)
    latency = hw.l2_latency_s if fits_l2 and reuse >= 2 else hw.hbm_latency_s
    stream = launch.bytes_per_cta * latency / max(1.0, launch.in_flight_bytes) * rounds
    sharing = min(launch.ctas_per_sm, math.ceil(launch.grid_ctas / hw.sms))  # CTAs sharing one SM's peak
    peak = unit_peak(launch.unit, hw)
    compute = (launch.flops_per_cta * sharing / (peak / hw.sms) * rounds) if launch.flops_per_cta else 0.0
    terms = {"HBM": hbm_bytes / hw.hbm_bytes_per_s, "L2": launch.total_bytes / hw.l2_bytes_per_s,
             "latency": stream, "compute": compute}
    device = max(terms.values())
    bound = max(terms, key=terms.get)
    if bound == "compute":
        bound = f"compute ({launch.unit})"
    cost = launch_cost(launch.launch_kind, hw)
    terms["launch"] = cost
    if cost > device:
        bound = "launch"
    total = device + cost
    return {"seconds": total, "us": total * 1e6, "device_us": device * 1e6, "bound": bound, "terms": terms,
            "waves": waves, "rounds": rounds, "fits_l2": fits_l2}


def record(launch: Launch, hw: Hardware = HARDWARE["H100"]) -> Dict[str, object]:
    """The launch and its modeled time as one flat dict (the JSON record's per-launch part)."""
    t = launch_time(launch, hw)
    d = asdict(launch)
    d.pop("meta")
    d.update(flops_per_launch=launch.flops, modeled_us=t["us"], bound=t["bound"], waves=t["waves"],
             rounds=t["rounds"], **{f"term_{k}_us": v * 1e6 for k, v in t["terms"].items()})
    return d
