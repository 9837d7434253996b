"""The roofline MODEL: FLOPs, weight and activation bytes per level and image from the full-size model's
modules, hardware floors, and the launch and sync terms (assumed host costs); the upstream figures it is
calibrated against."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

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
