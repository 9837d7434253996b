"""Friendly sampling API on top of the reference-compatible ``FractalGen.sample``.

``generate`` returns uint8 images, takes a seed (same seed + same device + same backend = same images),
validates its arguments, shows a progress bar on request, and supports conditional pixel-by-pixel
prediction (inpainting / outpainting / uncropping / class-conditional editing, the paper's Fig. 5) via
``known`` + ``known_mask``: every known sub-pixel is kept exactly and only the unknown ones are sampled,
at every level (fully known patches count as generated, partly known ones recurse, the pixel head keeps
known channels and uses them as context for the later ones).

Temperature convention: like the reference, ``temperature`` *multiplies* the logits (so larger values
sharpen); see ``fractal_kernels.reference.pixel_sampling``.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Union

import torch

from fractal_kernels.reference.pixel_sampling import inverse_cdf_draw
from fractal_models.mar import MAR
from fractal_models.pixelloss import PIX_MEAN, PIX_STD, PixelDraw
from fractal_models.rng import fork_rng

if TYPE_CHECKING:  # annotations only: fractalgen imports this module (FractalGen.generate), not the reverse
    from fractal_models.fractalgen import FractalGen


def uniform_draw(uniforms: Callable[[int, int], torch.Tensor]) -> PixelDraw:
    """A pixel draw by inverse CDF from explicit uniforms: ``uniforms(num_rows, channel) -> [num_rows]``.

    Used to make sampling exactly reproducible against the reference (the fixtures do this). The fused
    sampler reads ``draw.uniforms`` and consumes the same uniforms, so both backends draw alike."""
    def draw(probs: torch.Tensor, channel: int) -> torch.Tensor:
        return inverse_cdf_draw(probs, uniforms(probs.shape[0], channel))
    draw.uniforms = uniforms
    return draw


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> the models' normalised fp32 inputs (ImageNet mean/std)."""
    mean = torch.tensor(PIX_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIX_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> uint8, as the reference's evaluation does (``round(clip(x * 255, 0, 255))``)."""
    mean = torch.tensor(PIX_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIX_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() * std + mean) * 255
    return torch.round(x.clamp(0, 255)).to(torch.uint8)


def default_num_iter_list(model: FractalGen) -> List[int]:
    """The reference's iteration counts: 64 steps at the top (or fewer patches), every patch below."""
    out = []
    for level, gen in enumerate(model.levels()[:-1]):
        out.append(min(64, gen.seq_len) if level == 0 else gen.seq_len)
    return out


def check_top_level(model: FractalGen) -> None:
    """TypeError unless ``model`` is a top-level FractalGen. Duck-typed on what the entry points use (the level
    index, the class embedding and the level tree): this module sits below ``fractalgen`` and does not import it."""
    if not (isinstance(model, torch.nn.Module) and getattr(model, "fractal_level", None) == 0
            and hasattr(model, "class_emb") and callable(getattr(model, "levels", None))):
        raise TypeError(f"model: expected a top-level FractalGen, got {type(model).__name__}")


def _seeded(seed: Optional[int], device: torch.device):
    # torch's and numpy's global RNGs seeded as the reference's scripts seed them, the caller's states restored
    return fork_rng(seed, device)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sampling_autocast_dtype(device: torch.device, precision: str = "auto",
                            autocast_dtype: Optional[torch.dtype] = None) -> Optional[torch.dtype]:
    """The autocast dtype :func:`generate` samples under on ``device`` (None: no autocast, fp32).

    ``precision``: ``"auto"`` (default) is the public code's choice, ``torch.cuda.amp.autocast()`` = fp16 on a
    CUDA device, and fp32 (no autocast) on any other device; ``"fp32"``, ``"bf16"``, ``"fp16"`` force one.
    ``autocast_dtype`` (the older argument) is the same as the matching precision; giving both is an error
    unless they agree. Attention scores and pixel logits stay fp32 under every choice (as in the reference).
    """
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision: expected 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if autocast_dtype is not None:
        if autocast_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"autocast_dtype: expected torch.float16, torch.bfloat16 or None, got {autocast_dtype!r}")
        given = None if autocast_dtype == torch.float32 else autocast_dtype
        if precision != "auto" and PRECISIONS[precision] != given:
            raise ValueError(f"precision={precision!r} and autocast_dtype={autocast_dtype} disagree; give one of them")
        return given
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    return PRECISIONS[precision]


def _check_known(known, known_mask, bsz: int, size: int, device) -> tuple:
    if (known is None) != (known_mask is None):
        raise ValueError("known and known_mask must be given together")
    if known is None:
        return None, None
    if not isinstance(known, torch.Tensor) or known.dtype != torch.uint8:
        raise TypeError(f"known: expected a uint8 tensor [B, 3, H, W], got "
                        f"{known.dtype if isinstance(known, torch.Tensor) else type(known).__name__}")
    if tuple(known.shape) != (bsz, 3, size, size):
        raise ValueError(f"known: expected shape {(bsz, 3, size, size)} (labels, RGB, image size), got {tuple(known.shape)}")
    if not isinstance(known_mask, torch.Tensor) or known_mask.dtype != torch.bool:
        raise TypeError("known_mask: expected a bool tensor (True = known pixel)")
    if known_mask.dim() == 3:
        known_mask = known_mask.unsqueeze(1)
    try:
        known_mask = known_mask.expand(bsz, 3, size, size)
    except RuntimeError:
        raise ValueError(f"known_mask: expected shape [B, 3, H, W], [B, 1, H, W] or [B, H, W] matching known "
                         f"{tuple(known.shape)}, got {tuple(known_mask.shape)}") from None
    return known.to(device), known_mask.to(device)


def generate(
    model: FractalGen,
    labels: Union[torch.Tensor, Sequence[int]],
    *,
    num_iter_list: Optional[Sequence[int]] = None,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    filter_threshold: float = 1e-4,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    known: Optional[torch.Tensor] = None,
    known_mask: Optional[torch.Tensor] = None,
    draw: Optional[PixelDraw] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    precision: str = "auto",
    progress: bool = False,
    backend: Optional[str] = "auto",
    fast: bool = True,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """Generate class-conditional images; returns uint8 ``[B, 3, S, S]`` on the model's device.

    ``labels`` int ``[B]`` in ``[0, class_num)``. ``cfg`` guidance scale (1 = off), with the reference's
    ``"linear"`` schedule at the top level or ``"constant"``. ``temperature`` > 0 multiplies the logits
    (reference convention). ``filter_threshold`` is the reference's low-probability filter before CFG;
    ``top_p`` optional nucleus truncation after it. ``seed`` makes the call deterministic without touching
    the caller's RNG state. ``known`` uint8 ``[B, 3, S, S]`` + ``known_mask`` bool (``[B, 3|1, S, S]`` or
    ``[B, S, S]``): keep those pixels exactly and sample the rest. ``draw`` replaces the multinomial draw
    (see :func:`uniform_draw`).

    ``precision`` -- the numerics of the call (:func:`sampling_autocast_dtype`): ``"auto"`` (default) samples
    under fp16 autocast on a CUDA device, as the public code does (``torch.cuda.amp.autocast()``), and in
    fp32 without autocast on a CPU; ``"fp32"``, ``"bf16"`` or ``"fp16"`` force one (``autocast_dtype=`` is the
    older spelling of the same). Attention scores and pixel logits are fp32 in every mode. The bit-exactness
    with the reference (below) is in fp32, so on a GPU it needs ``precision="fp32"``.

    The switchboard (safe defaults; the same seed gives the same images for the same settings and device):

    * ``backend`` -- the kernels for this call: ``"auto"`` (default: the fused Triton/CUDA kernels on a GPU;
      on a CPU the reference math plus the compiled C++ pixel head, one call per pixel batch, fed the
      reference's own random draws: the same pixels unless a draw lands within ~1e-6 of a tie, see
      :mod:`fractal_kernels.cpu`), ``"torch"`` (the faithful reference math everywhere, bit-exact), ``"triton"``,
      ``"cuda"``, or ``None`` to keep the model's own backend.
    * ``fast`` -- the fast generation engine (default): KV caches in the pixel heads and the AR levels, the
      MAR/AR step loops without host syncs (the schedule is computed on the host up front), conditions
      embedded once per call, predicted patches gathered/scattered in one op. With ``backend="torch"`` it
      is reference-exact: the tests check its images equal the reference loop's bit for bit in fp32 for the
      same seed. ``fast=False`` runs the reference's loop literally (the baseline of the benchmarks).
    * ``compile`` -- ``torch.compile`` the MAR levels' transformer stacks (needs ``fast``; the first call
      compiles for a while; fused ops may round differently from eager in the last bits; the random draws
      stay eager, so the RNG is consumed as without it). See :mod:`fractal_models.engine`.
    * ``cuda_graphs`` -- on a CUDA device, capture those stacks as CUDA graphs (``mode="reduce-overhead"``,
      batch rows padded to powers of two so a few graphs serve every step); implies ``compile``. Not yet
      run on a GPU.
    """
    check_top_level(model)
    device = model.class_emb.weight.device
    labels = torch.as_tensor(labels, device=device) if not isinstance(labels, torch.Tensor) else labels.to(device)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels: expected an integer tensor [B], got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels: expected shape [B], got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= model.num_classes):
        raise ValueError(f"labels: values must be in [0, {model.num_classes}), got min {int(labels.min())}, "
                         f"max {int(labels.max())}")
    labels = labels.long()
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0 (it multiplies the logits), got {temperature!r}")
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg)):
        raise ValueError(f"cfg: expected a finite number, got {cfg!r}")
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule: expected 'linear' or 'constant', got {cfg_schedule!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
    if not (0.0 <= filter_threshold <= 1.0):
        raise ValueError(f"filter_threshold: expected a probability in [0, 1], got {filter_threshold!r}")
    gens = model.levels()[:-1]
    if num_iter_list is None:
        num_iter_list = default_num_iter_list(model)
    num_iter_list = [int(n) for n in num_iter_list]
    if len(num_iter_list) != len(gens) or any(n < 1 for n in num_iter_list):
        raise ValueError(f"num_iter_list: expected {len(gens)} positive integers (one per level), got {num_iter_list}")
    if backend is not None and backend not in ("torch", "auto", "triton", "cuda"):
        raise ValueError(f"backend: expected 'auto', 'torch', 'triton', 'cuda' or None (keep the model's), got {backend!r}")
    amp_dtype = sampling_autocast_dtype(device, precision, autocast_dtype)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs: needs the model on a CUDA device, it is on {device.type}")
    compile = bool(compile or cuda_graphs)
    if compile and not fast:
        raise ValueError("compile/cuda_graphs: only the fast engine is compiled; pass fast=True (the default)")
    bsz, size = labels.shape[0], model.img_size
    known, known_mask = _check_known(known, known_mask, bsz, size, device)
    if bsz == 0:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)

    num_conds = gens[0].num_conds if isinstance(gens[0], MAR) else 1
    extra = dict(top_p=float(top_p))
    if draw is not None:
        extra["draw"] = draw
    if known is not None:
        extra.update(known=normalize_uint8(known), known_mask=known_mask)
    if fast:
        extra["fast"] = True

    bar = None
    visualize = False
    if progress:
        from tqdm.auto import tqdm
        steps = gens[0].seq_len if not isinstance(gens[0], MAR) else min(gens[0].seq_len, num_iter_list[0])
        bar = tqdm(total=steps, desc="generate", unit="step")
        visualize = lambda _patches: bar.update(1)  # noqa: E731  called once per top-level step

    was_training = model.training
    previous_backend = model.backend
    if backend is not None:
        model.set_backend(backend)
    model.eval()
    amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    compiled = contextlib.nullcontext()
    if compile:
        from fractal_models.engine import compiled_levels
        compiled = compiled_levels(model, cuda_graphs=cuda_graphs)
    try:
        with _seeded(seed, device), torch.no_grad(), amp, compiled:
            class_embedding = model.class_emb(labels)
            if cfg != 1.0:
                class_embedding = torch.cat([class_embedding, model.fake_latent.repeat(bsz, 1)], dim=0)
            images = model.sample(cond_list=[class_embedding for _ in range(num_conds)], num_iter_list=num_iter_list,
                                  cfg=float(cfg), cfg_schedule=cfg_schedule, temperature=float(temperature),
                                  filter_threshold=float(filter_threshold), fractal_level=0, visualize=visualize,
                                  **extra)
    finally:
        model.train(was_training)
        model.set_backend(previous_backend)
        if bar is not None:
            bar.close()
    # Known pixels come back exactly: their normalised value round-trips through to_uint8 unchanged.
    return to_uint8(images)
