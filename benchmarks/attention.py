"""Attention benchmarks: ``tiny_attention`` against every PyTorch SDPA backend, FlexAttention, flash-attn and
the reference's explicit fp32 attention, forward and forward+backward, at the WORKLOADS shapes.

Shapes (``SHAPES``): the FractalGen attention calls, ``[N, H, L, D]`` with N independent sequences --
MAR 64² level 1 (L=21, H=8, D=64), MAR 256² level 2 (L=22, H=4, D=64), the pixel head (L=4, H=4, D=32,
causal), AR 64² level 1 (L=17, H=8, D=64, causal), MAR level 0 (L=261, H=16, D=64) and MAR-H 256² level 2
(L=22, H=4, D=80). N per mode: smoke 8 (2 at L=261); quick 512 on CPU (8 at L=261), 2^10 and 2^13 on a
GPU; full 2^10, 2^13, 2^16 on a GPU (N·H = 2^19 at L=21, H=8; groups whose tensors cannot fit are skipped
with the estimate). Inputs are bf16 on a GPU, fp32 on a CPU.

Rows (one per backend, case ``attn_fwd`` or ``attn_fwd_bwd``): ``reference`` (``attention_reference``,
fp32 scores: the model's math; the baseline), ``tiny_attention[torch|triton|cuda]``,
``tiny_attention_packed[auto]`` (reads the qkv projection ``[N, L, 3·H·D]``; dispatcher's choice),
``sdpa[flash|efficient|cudnn|math]`` (``torch.nn.attention.sdpa_kernel`` with that single backend),
``flex_attention (compiled)`` and ``torch.compile(reference)`` (GPU only), ``flash-attn`` (packed qkv, when
importable). A backend that refuses the shape or is not available here is a skipped row with the reason
and the analytic figures below.

Bytes and bandwidth. With ``T = N·H·L·D`` elements per tensor and ``e`` bytes per element:

* forward: ``bytes = 4·T·e`` (read Q, K, V; write O);
* forward+backward: ``bytes = 8·T·e`` (the forward's Q, K, V, O plus the backward's read of dO and writes
  of dQ, dK, dV, each tensor counted once; the backward's re-reads of Q, K, V, O and the O(N·H·L) softmax
  statistics are not counted, so this is the least traffic and the GB/s an *effective* figure).

``GB_per_s = bytes / median time``; ``pct_copy_bw`` is that over the device-to-device copy bandwidth
measured in the same run (``benchmarks.kernels.copy_bandwidth``). ``speedup_vs_best_sdpa`` divides the
fastest measured SDPA backend's median (same group: case, shape, N) by the row's; ``speedup_vs_reference``
the reference row's. Skipped rows carry ``bytes_min_bf16`` and ``target_s_at_85pct_of_3.0TBps`` (the bf16
bytes moved at 85 % of a 3.0 TB/s copy), so the targets stay visible without a GPU.

Targets of the issue (H100, bf16, L=21, D=64, N·H >= 2^19): forward >= 85 % of copy bandwidth and >= 3x
the best SDPA backend; forward+backward >= 2x the best SDPA backend. Measured rows at that shape carry
``meets_target``; on a machine without a GPU, ``target_rows`` lists that shape as skipped rows.

Checks: every measured row's output (and, for fwd+bwd, dQ, dK, dV for a fixed random dO) is compared with
the reference computed in the same run in fp64 (CPU) or fp32 (GPU) from the same inputs, in chunks of
sequences. ``max_err`` is ``max |got - ref| / max(1, max |ref|)`` over the tensors; a row over the
per-dtype tolerance (``TOL``) gets an upper-case check, which makes ``fractal-bench`` exit non-zero.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .harness import Dispatched, Row, dispatch_failure, summarize, time_fn
from .kernels import copy_bandwidth, matmul_peak
from fractal_kernels.dispatch import BackendUnavailable, backend_report, triton_interpreting
from fractal_kernels.ops.tiny_attention import tiny_attention, tiny_attention_packed
from fractal_kernels.reference.attention import attention_reference

SUITE = "attention"
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
TARGET_BW = 3.0e12  # measured device-to-device copy on the lent H100 (WORKLOADS.md)
TARGET_FRACTION = 0.85


@dataclass(frozen=True)
class AttnShape:
    tag: str
    L: int
    H: int
    D: int
    causal: bool


SHAPES = (
    AttnShape("mar64_l1", 21, 8, 64, False),
    AttnShape("mar256_l2", 22, 4, 64, False),
    AttnShape("pixel_head", 4, 4, 32, True),
    AttnShape("ar64_l1", 17, 8, 64, True),
    AttnShape("mar_l0", 261, 16, 64, False),
    AttnShape("mar256h_l2", 22, 4, 80, False),
)
TARGET_SHAPE, TARGET_N = SHAPES[0], 2 ** 16  # N·H = 2^19
SDPA_BACKENDS = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                 ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH"))
OUR_ROWS = ("tiny_attention[torch]", "tiny_attention[triton]", "tiny_attention[cuda]", "tiny_attention_packed[auto]")


def sizes(mode_name: str, shape: AttnShape, cuda: bool) -> List[int]:
    """Sequence counts N measured for ``shape`` in a mode (see module docstring)."""
    if mode_name == "smoke":
        return [8] if shape.L <= 64 else [2]
    if cuda:
        return [2 ** 10, 2 ** 13] if mode_name == "quick" else [2 ** 10, 2 ** 13, 2 ** 16]
    small = shape.L <= 64
    if mode_name == "quick":  # one size per shape keeps a CPU quick run within its 3 minutes
        return [512] if small else [8]
    return [64, 512, 4096] if small else [4, 16, 64]


def flops(n: int, shape: AttnShape, bwd: bool) -> float:
    """Useful matmul FLOPs: forward QK^T and PV, 2·L²·D each per (sequence, head), halved when causal; the
    backward adds 5 GEMMs of that size (recomputed S, dV, dP, dQ, dK), so fwd+bwd = 3.5x the forward."""
    f = 4.0 * n * shape.H * shape.L * shape.L * shape.D * (0.5 if shape.causal else 1.0)
    return f * (3.5 if bwd else 1.0)


def bytes_moved(n: int, shape: AttnShape, elem: int, bwd: bool) -> int:
    return (8 if bwd else 4) * n * shape.H * shape.L * shape.D * elem


def analytic(n: int, shape: AttnShape, bwd: bool) -> Dict[str, float]:
    b = bytes_moved(n, shape, 2, bwd)
    return {"bytes_min_bf16": b, "target_s_at_85pct_of_3.0TBps": b / (TARGET_FRACTION * TARGET_BW)}


def _shape_dict(shape: AttnShape, n: int, dtype: torch.dtype) -> dict:
    return dict(tag=shape.tag, N=n, L=shape.L, H=shape.H, D=shape.D, causal=shape.causal, NH=n * shape.H,
                dtype=str(dtype).replace("torch.", ""))


def _case(bwd: bool) -> str:
    return "attn_fwd_bwd" if bwd else "attn_fwd"


def target_rows() -> List[Row]:
    """The issue's target shape as skipped rows with the analytic figures (for machines without a GPU)."""
    rows = []
    for bwd in (False, True):
        shape = _shape_dict(TARGET_SHAPE, TARGET_N, torch.bfloat16)
        metrics = dict(analytic(TARGET_N, TARGET_SHAPE, bwd))
        metrics["target_speedup_vs_best_sdpa"] = 2.0 if bwd else 3.0
        if not bwd:
            metrics["target_pct_copy_bw"] = 100 * TARGET_FRACTION
        for b in ("tiny_attention[triton]", "tiny_attention[cuda]"):
            rows.append(Row(SUITE, _case(bwd), b, shape, metrics=dict(metrics),
                            skipped="issue target on an H100 (bf16, N·H = 2^19); needs a GPU"))
    return rows


# --------------------------------------------------------------------------------------------- candidates
@dataclass
class _Cand:
    label: str
    packed: bool = False  # takes qkv [N, L, 3*H*D] (else q, k, v [N, H, L, D])
    fn: Optional[Callable] = None
    skip: Optional[str] = None
    ours: bool = False  # an unexpected exception is an error (else the backend "refused")
    backend: Optional[str] = None  # the fractal_kernels backend the row names (checked against the one that ran)


_COMPILED: Dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        import torch._dynamo as dynamo
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 512))
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def _sdpa_fn(backend, causal: bool, scale: float) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return run


def _candidates(shape: AttnShape, n: int, device: torch.device, scale: float) -> List[_Cand]:
    cuda = device.type == "cuda"
    causal = shape.causal
    report = backend_report()
    out = [_Cand("reference", fn=lambda q, k, v: attention_reference(q, k, v, causal=causal, scale=scale,
                                                                     scores_fp32=True))]
    for b in ("torch", "triton", "cuda"):
        label = f"tiny_attention[{b}]"
        if b != "torch" and not cuda:
            why = ("Triton interpreter (TRITON_INTERPRET=1): correct but far too slow to time; tested in tests/"
                   if b == "triton" and triton_interpreting() else f"GPU-only: {report[b][1]}")
            out.append(_Cand(label, skip=why))
        else:
            out.append(_Cand(label, ours=True, backend=b,
                             fn=lambda q, k, v, b=b: tiny_attention(q, k, v, causal=causal, scale=scale, backend=b)))
    out.append(_Cand("tiny_attention_packed[auto]", packed=True, ours=True, backend="auto",
                     fn=lambda qkv: tiny_attention_packed(qkv, shape.H, causal=causal, scale=scale)))
    from torch.nn.attention import SDPBackend
    for short, member in SDPA_BACKENDS:
        if not cuda and short in ("efficient", "cudnn"):  # CPU torch only has the flash and math kernels
            out.append(_Cand(f"sdpa[{short}]", skip="refused: this SDPA backend has no CPU kernel (CUDA-only)"))
        else:
            out.append(_Cand(f"sdpa[{short}]", fn=_sdpa_fn(getattr(SDPBackend, member), causal, scale)))
    if cuda:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = _compiled("flex", flex_attention)
            mask = (create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, shape.L, shape.L, device=device)
                    if causal else None)
            out.append(_Cand("flex_attention (compiled)",
                             fn=lambda q, k, v: flex(q, k, v, block_mask=mask, scale=scale)))
        except Exception as e:  # noqa: BLE001 - a baseline that cannot be built is reported, not fatal
            out.append(_Cand("flex_attention (compiled)", skip=f"refused: {_short(e)}"))
        ref_c = _compiled("reference", attention_reference)
        out.append(_Cand("torch.compile(reference)",
                         fn=lambda q, k, v: ref_c(q, k, v, causal=causal, scale=scale, scores_fp32=True)))
    else:
        out.append(_Cand("flex_attention (compiled)", skip="GPU-only row (compiled FlexAttention)"))
        out.append(_Cand("torch.compile(reference)", skip="GPU-only row"))
    try:
        from flash_attn import flash_attn_qkvpacked_func
        if not cuda:
            raise ImportError("CUDA-only")
        out.append(_Cand("flash-attn", packed=True, fn=lambda qkv: flash_attn_qkvpacked_func(
            qkv.view(n, shape.L, 3, shape.H, shape.D), causal=causal, softmax_scale=scale)))
    except ImportError as e:
        out.append(_Cand("flash-attn", skip=f"flash-attn not importable here ({_short(e)})"))
    return out


def _short(e: BaseException, limit: int = 160) -> str:
    s = " ".join(str(e).split())
    return (s[:limit] + "...") if len(s) > limit else s


# ------------------------------------------------------------------------------------------------- checks
def _chunk(shape: AttnShape, acc: torch.dtype) -> int:
    """Sequences per chunk of the checking reference (~256 MB of scores)."""
    per_seq = shape.H * shape.L * shape.L * torch.empty((), dtype=acc).element_size()
    return max(1, (256 << 20) // per_seq)


def _expected(q, k, v, do, shape: AttnShape, scale: float, bwd: bool, acc: torch.dtype) -> List[torch.Tensor]:
    """Reference output (and dQ, dK, dV for ``do``) in ``acc`` precision, computed in chunks of sequences."""
    n = q.shape[0]
    outs: List[List[torch.Tensor]] = []
    step = _chunk(shape, acc)
    for s in range(0, n, step):
        qc, kc, vc = (t[s:s + step].detach().to(acc).requires_grad_(bwd) for t in (q, k, v))
        with torch.set_grad_enabled(bwd):
            o = attention_reference(qc, kc, vc, causal=shape.causal, scale=scale, scores_fp32=True)
            parts = [o.detach()]
            if bwd:
                parts += list(torch.autograd.grad(o, (qc, kc, vc), do[s:s + step].to(acc)))
        outs.append(parts)
    return [torch.cat([p[i] for p in outs]) for i in range(len(outs[0]))]


def _max_err(got: List[torch.Tensor], exp: List[torch.Tensor], step: int) -> float:
    """``max |got - ref| / max(1, max |ref|)`` over the tensors, chunked; NaN if any difference is NaN."""
    worst = 0.0
    for g, e in zip(got, exp):
        err = 0.0
        for s in range(0, e.shape[0], step):
            d = (g[s:s + step].to(e.dtype) - e[s:s + step]).abs().max().item()
            if math.isnan(d):
                return math.nan
            err = max(err, d)
        worst = max(worst, err / max(1.0, e.abs().max().item()))
    return worst


# -------------------------------------------------------------------------------------------------- rows
def _fits(n: int, shape: AttnShape, elem: int, device: torch.device) -> Optional[str]:
    """None if a group's tensors fit on the device, else why not (CUDA only)."""
    if device.type != "cuda":
        return None
    t = n * shape.H * shape.L * shape.D
    need = 14 * t * elem + 4 * t * 4  # qkv, q/k/v, dO (x2), outputs + grads of a row; fp32 expected o/dq/dk/dv
    total = torch.cuda.get_device_properties(device).total_memory
    if need > 0.7 * total:
        return f"needs ~{need / 1e9:.0f} GB of tensors at N={n}, over 70% of the device's {total / 1e9:.0f} GB"
    return None


def attention_rows(shape: AttnShape, n: int, bwd: bool, device: torch.device, repeats: int,
                   warmup: int) -> List[Row]:
    """One group: every backend at one (case, shape, N); speedups are within the group."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    acc = torch.float32 if cuda else torch.float64
    elem = torch.empty((), dtype=dtype).element_size()
    case, sd = _case(bwd), _shape_dict(shape, n, dtype)
    nbytes = bytes_moved(n, shape, elem, bwd)
    scale = shape.D ** -0.5
    L, H, D = shape.L, shape.H, shape.D
    too_big = _fits(n, shape, elem, device)
    if too_big:
        return [Row(SUITE, case, c.label, sd, metrics=analytic(n, shape, bwd), skipped=too_big)
                for c in _candidates(shape, n, device, scale)]
    if cuda:
        repeats = max(repeats, 10)
    bw = copy_bandwidth(device)
    peak = matmul_peak(device)

    g = torch.Generator(device=device).manual_seed(1000 * shape.L + n)
    qkv = torch.randn(n, L, 3, H, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    qkv_packed = qkv.view(n, L, 3 * H * D).requires_grad_(bwd)
    q, k, v = (t.contiguous().requires_grad_(bwd) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    do = torch.randn(n, H, L, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    do_nlhd = do.transpose(1, 2).contiguous()  # [N, L, H, D], the packed entry points' output layout
    exp = _expected(q, k, v, do, shape, scale, bwd, acc)
    step = _chunk(shape, acc)
    tol = TOL[dtype]

    def runner(c: _Cand) -> Callable[[], List[torch.Tensor]]:
        if c.packed:
            def run():
                with torch.set_grad_enabled(bwd):
                    o = c.fn(qkv_packed)
                    if not bwd:
                        return [o]
                    (dqkv,) = torch.autograd.grad(o, (qkv_packed,), do_nlhd.view(o.shape))
                    return [o, dqkv]
        else:
            def run():
                with torch.set_grad_enabled(bwd):
                    o = c.fn(q, k, v)
                    return [o] + (list(torch.autograd.grad(o, (q, k, v), do)) if bwd else [])
        return run

    def to_bhld(c: _Cand, outs: List[torch.Tensor]) -> List[torch.Tensor]:
        if not c.packed:
            return outs
        got = [outs[0].reshape(n, L, H, D).transpose(1, 2)]
        if bwd:
            got += list(outs[1].view(n, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0))
        return got

    rows: List[Row] = []
    for c in _candidates(shape, n, device, scale):
        if c.skip:
            rows.append(Row(SUITE, case, c.label, sd, metrics=analytic(n, shape, bwd), skipped=c.skip))
            continue
        run = runner(c)
        d = Dispatched(("tiny_attention",))
        try:
            with warnings.catch_warnings(record=True) as caught, d:
                warnings.simplefilter("always")
                outs = run()
        except (BackendUnavailable, NotImplementedError) as e:
            rows.append(Row(SUITE, case, c.label, sd, metrics=analytic(n, shape, bwd), skipped=_short(e)))
            continue
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(Row(SUITE, case, c.label, sd, metrics=analytic(n, shape, bwd),
                            skipped=f"out of memory at N={n}"))
            continue
        except Exception as e:  # noqa: BLE001
            if c.ours:
                rows.append(Row(SUITE, case, c.label, sd, metrics=analytic(n, shape, bwd),
                                skipped=f"error: {_short(e, 300)}"))
            else:
                seen = [str(w.message) for w in caught] + d.warnings  # d (inner) records the block's warnings
                why = "; ".join(_short(m, 120) for m in seen if "not used because" in m or "Flash attention" in m
                                or "cuDNN" in m or "Memory efficient" in m)
                rows.append(Row(SUITE, case, c.label, sd, metrics=analytic(n, shape, bwd),
                                skipped=f"refused: {why or _short(e)}"))
            continue
        err = _max_err(to_bhld(c, outs), exp, step)
        del outs
        timed = Dispatched(("tiny_attention",))
        with timed:
            # the checked call above was the first warm-up
            timing = summarize(time_fn(run, device, warmup=max(0, warmup - 1), repeats=repeats, flush_l2=cuda))
        fl = flops(n, shape, bwd)
        metrics = {"GB_per_s": nbytes / timing["median_s"] / 1e9, "pct_copy_bw": 100 * nbytes / timing["median_s"] / bw,
                   "bytes_min": nbytes, "max_err": err, "TFLOP_per_s": fl / timing["median_s"] / 1e12,
                   "pct_matmul_peak": 100 * fl / timing["median_s"] / peak}
        if c.backend is not None:
            metrics["ran_on"] = dict(d.ran)
            if c.label == "tiny_attention_packed[auto]" and "tiny_attention" in d.ran:
                metrics["dispatched_to"] = d.ran["tiny_attention"]
        ok = err <= tol
        check = (f"max err {err:.1e} <= tol {tol:.0e}" + (" (baseline)" if c.label == "reference" else "")
                 if ok else f"MAX ERR {err:.1E} > TOL {tol:.0E}")
        if c.backend is not None:  # the checked call and the timed calls both ran where the row says
            check = (dispatch_failure(d, c.backend, device, required=("tiny_attention",))
                     or dispatch_failure(timed, c.backend, device, required=("tiny_attention",)) or check)
        rows.append(Row(SUITE, case, c.label, sd, timing, metrics=metrics, check=check))

    measured = {r.backend: r.timing["median_s"] for r in rows if r.timing}
    sdpa = {b: t for b, t in measured.items() if b.startswith("sdpa[")}
    best = min(sdpa, key=sdpa.get) if sdpa else None
    at_target = (shape == TARGET_SHAPE and n * H >= 2 ** 19 and dtype == torch.bfloat16)
    for r in rows:
        if not r.timing:
            continue
        t = r.timing["median_s"]
        if best:
            r.metrics["speedup_vs_best_sdpa"] = sdpa[best] / t
            r.metrics["best_sdpa"] = best
        if "reference" in measured:
            r.metrics["speedup_vs_reference"] = measured["reference"] / t
        if at_target and r.backend in OUR_ROWS and best:
            fast = r.metrics["speedup_vs_best_sdpa"] >= (2.0 if bwd else 3.0)
            r.metrics["meets_target"] = bool(fast and (bwd or r.metrics["pct_copy_bw"] >= 100 * TARGET_FRACTION))
    return rows


CROSSOVER_LENGTHS = (64, 96, 128, 192, 256, 384, 512)


def crossover_rows(device: torch.device, repeats: int, warmup: int, path: Optional[str] = None) -> List[Row]:
    """Where SDPA starts to beat the Triton kernel (forward, bf16, per head dim): one timed row per length and
    the first losing length recorded under this device's name in ``attention_crossover.json`` of the policy
    overlay (``$FRACTAL_HOME``; ``path`` to write elsewhere; ``ATTENTION_MAX_L + 1`` where the kernel won at every
    length), which ``tiny_attention``'s ``auto`` dispatch reads over the packaged one and over the MODEL's length
    (no entry: the MODEL's length for the GPU's arch, else the kernel up to ``MAX_L``; see
    ``fractal_kernels.policy.attention_sdpa_rule``)."""
    from fractal_kernels import dispatch, policy
    if device.type != "cuda" or not backend_report()["triton"][0]:
        return [Row(SUITE, "crossover", "triton vs sdpa", {}, skipped="GPU-only: measures the Triton/SDPA crossover")]
    rows: List[Row] = []
    table: Dict[str, int] = {}
    for d in (64, 80):
        first_loss = None
        for length in CROSSOVER_LENGTHS:
            n = max(1, 2 ** 22 // (8 * length * d))  # ~8 MB per tensor
            q, k, v = (torch.randn(n, 8, length, d, device=device, dtype=torch.bfloat16) for _ in range(3))
            ours = summarize(time_fn(lambda: tiny_attention(q, k, v, backend="triton"), device, warmup=warmup,
                                     repeats=repeats, flush_l2=True))
            sdpa = summarize(time_fn(lambda: F.scaled_dot_product_attention(q, k, v), device, warmup=warmup,
                                     repeats=repeats, flush_l2=True))
            err = float((tiny_attention(q, k, v, backend="triton").float()
                         - F.scaled_dot_product_attention(q, k, v).float()).abs().max())
            ratio = sdpa["median_s"] / ours["median_s"]
            if ratio < 1.0 and first_loss is None:
                first_loss = length
            rows.append(Row(SUITE, "crossover", "triton vs sdpa", dict(L=length, D=d, N=n, H=8, dtype="bfloat16"),
                            ours, metrics={"sdpa_median_s": sdpa["median_s"], "triton_speedup_vs_sdpa": ratio},
                            check=f"max diff {err:.1e}" if err < 4e-2 else f"OUTPUTS DIFFER {err:.1E}"))
        # no loss up to the kernels' limit is a measurement too (past the limit: SDPA anyway): it overrides the MODEL
        table[str(d)] = first_loss if first_loss is not None else dispatch.ATTENTION_MAX_L + 1
    path = path or policy.overlay_path(policy.CROSSOVER)
    doc = policy.read_document(path)[0] or {}
    doc[torch.cuda.get_device_name(device)] = {"bfloat16": table, "float16": table}
    policy.write_document(path, doc)
    dispatch.reload()  # later rows of this run dispatch with the new measurement
    return rows


def plan(mode, device: torch.device) -> Iterator[Callable[[], List[Row]]]:
    cuda = device.type == "cuda"
    for shape in SHAPES:
        for n in sizes(mode.name, shape, cuda):
            for bwd in (False, True):
                yield lambda s=shape, n=n, b=bwd: attention_rows(s, n, b, device, mode.repeats, mode.warmup)
    if not (cuda and mode.name == "full"):
        yield target_rows
    if mode.name == "full" or not cuda:
        yield lambda: crossover_rows(device, mode.repeats, mode.warmup, path=getattr(mode, "crossover_path", None))
