"""``fractalgen train``: the reference training recipe on one process or many (``torchrun``).

    fractalgen train --demo --max-steps 300 --output-dir out/demo          # tiny model, shipped photos, CPU ok
    torchrun --nproc-per-node 8 -m fractal_models.train --config fractalmar_in64 --data-path /imagenet/train \
        --img-size 64 --batch-size 2048 --epochs 800 --output-dir out/in64

Recipe (paper / reference defaults): AdamW β = (0.9, 0.95), weight decay 0.05 (not on biases and 1-D
parameters), lr = blr × global batch / 256 with linear warm-up then cosine, gradient clipping 3.0, label
dropout 0.1 for CFG, attention/projection dropout 0.1, optional gradient checkpointing, bf16 autocast on
GPU, optional EMA of the weights (off by default: the reference does not use one).

Determinism: every micro-batch reseeds torch's and numpy's global RNGs (numpy draws the MAR mask counts and
ratios, as in the reference) from (seed, step, virtual rank) where the virtual rank is
``rank × grad_accum + k``; the data order is a seeded permutation per epoch sliced by virtual rank. So a
run is a function of (seed, world size × grad accumulation): ``torchrun --nproc-per-node 2`` equals one
process with ``--grad-accum 2``, and ``--resume`` continues exactly where the last checkpoint was taken.
Checkpoints (reference layout + our state) are written atomically: ``checkpoint-last.pth`` every
``--save-every`` steps and at the end, ``checkpoint-best.pth`` whenever the held-out NLL improves.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from fractal_models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from fractal_models.configs import config_kwargs
from fractal_models.data import DataError, ImageFolder, ShippedPhotos
from fractal_models.fractalgen import FractalGen
from fractal_models.rng import manual_seed, numpy_state, set_numpy_state
from fractal_models.sampling import normalize_uint8

BACKENDS = ("torch", "auto", "triton", "cuda")


class TrainError(ValueError):
    """A bad training configuration, reported as one line."""


# ---------------------------------------------------------------------------------------------- setup
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalgen train", description="Train a FractalGen model.")
    p.add_argument("--config", default="fractalmar_in64", help="published or tiny config name")
    p.add_argument("--demo", action="store_true",
                   help="tiny_mar at 16x16 on the photos shipped in the scikit-image wheel (no download)")
    p.add_argument("--data-path", default=None, help="ImageFolder root (root/<class>/<image>)")
    p.add_argument("--val-path", default=None, help="held-out ImageFolder (default: --val-fraction of the data)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--img-size", type=int, default=None, help="must equal the config's image size")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all processes, all accumulation steps)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--blr", type=float, default=5e-5)
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default blr * batch / 256)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-epochs", type=float, default=40)
    p.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=3.0)
    p.add_argument("--label-drop-prob", type=float, default=0.1)
    p.add_argument("--attn-dropout", type=float, default=0.1)
    p.add_argument("--proj-dropout", type=float, default=0.1)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernel backend of the fused ops (auto: CUDA -> Triton on GPU, PyTorch on CPU; torch = reference)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="./output_dir")
    p.add_argument("--resume", default=None, help="checkpoint to resume, or 'auto' for OUTPUT_DIR/checkpoint-last.pth")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoint-last.pth writes")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between NLL + sample-grid evaluations")
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--sample-cfg", type=float, default=2.0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--demo-per-class", type=int, default=256, help="crops per photo in the demo train split")
    p.add_argument("--no-progress", action="store_true")
    return p


def setup_distributed(device_arg: Optional[str]) -> Tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def resolve(args: argparse.Namespace, world: int) -> argparse.Namespace:
    """Fill derived settings and fail fast on bad ones (one line each)."""
    if args.demo:
        args.config = "tiny_mar" if args.config == "fractalmar_in64" else args.config
        args.img_size = args.img_size or 16
        if args.data_path:
            raise TrainError("--demo uses the shipped photos; drop --data-path (or drop --demo)")
        # a tiny model on ~2.5k crops learns with a much larger step than the ImageNet recipe
        if args.lr is None:
            args.lr = 1e-3
        if args.warmup_steps is None:
            args.warmup_steps = 50
    try:
        kwargs = config_kwargs(args.config)
    except ValueError as e:
        raise TrainError(str(e)) from None
    size = kwargs["img_size_list"][0]
    if args.img_size is None:
        args.img_size = size
    if args.img_size != size:
        raise TrainError(f"--img-size {args.img_size} does not match config {args.config!r}, which models {size}x{size} images")
    if not args.demo and not args.data_path:
        raise TrainError("--data-path is required (an ImageFolder root), or use --demo")
    if args.data_path and not os.path.isdir(args.data_path):
        raise TrainError(f"--data-path {args.data_path!r}: directory not found")
    if args.grad_accum < 1:
        raise TrainError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    if args.batch_size % (world * args.grad_accum) != 0:
        raise TrainError(f"--batch-size {args.batch_size} is not divisible by world size {world} x grad accum "
                         f"{args.grad_accum}")
    if args.backend in ("triton", "cuda"):
        from fractal_kernels.dispatch import backend_report
        ok, why = backend_report()[args.backend]
        if not ok:
            raise TrainError(f"--backend {args.backend}: unavailable here ({why}); use --backend torch or auto")
    args.micro_batch = args.batch_size // (world * args.grad_accum)
    args.world_size = world
    if args.lr is None:
        args.lr = args.blr * args.batch_size / 256
    return args


# ------------------------------------------------------------------------------------------- helpers
def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on biases and 1-D parameters (the reference's timm-style grouping)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, args: argparse.Namespace, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return args.lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int, virtual_rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + virtual_rank * 7919) % (2 ** 63 - 1)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7 + epoch + 1))


def load_batch(dataset, indices: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def amp_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    prec = args.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]


class CsvLog:
    """Append-only CSV with a header; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: str, fields: List[str], keep_until_step: Optional[int]) -> None:
        self.path, self.fields = path, fields
        rows = []
        if keep_until_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        if int(row["step"]) <= keep_until_step and all(row.get(k) not in (None, "") for k in fields):
                            rows.append(row)
                    except (KeyError, ValueError):
                        break  # a torn last line from a killed run
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)
            f.flush()


def read_loss_log(output_dir: str) -> List[Tuple[int, float]]:
    """(step, loss) rows of a run's ``log.csv`` (for tests and plots)."""
    with open(os.path.join(output_dir, "log.csv"), newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------ training
def train(args: argparse.Namespace) -> Dict[str, Any]:
    rank, world, device = setup_distributed(args.device)
    args = resolve(args, world)
    is_main = rank == 0
    os.makedirs(args.output_dir, exist_ok=True)

    if args.demo:
        train_set = ShippedPhotos("train", args.img_size, per_class=args.demo_per_class, seed=args.seed)
        val_set = ShippedPhotos("val", args.img_size, per_class=max(1, args.eval_images // ShippedPhotos.num_classes),
                                seed=args.seed)
        num_classes = ShippedPhotos.num_classes
    else:
        full = ImageFolder(args.data_path, args.img_size)
        num_classes = full.num_classes
        if args.val_path:
            train_set, val_set = full, ImageFolder(args.val_path, args.img_size)
        else:
            order = epoch_order(args.seed, -1, len(full)).tolist()
            n_val = max(1, int(len(full) * args.val_fraction))
            train_set = ImageFolder(args.data_path, args.img_size, indices=sorted(order[n_val:]))
            val_set = ImageFolder(args.data_path, args.img_size, indices=sorted(order[:n_val]))
    args.class_num = num_classes
    if len(train_set) < args.batch_size:
        raise TrainError(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images")

    manual_seed(args.seed)
    model = FractalGen(**config_kwargs(args.config, class_num=num_classes, label_drop_prob=args.label_drop_prob,
                                       attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout,
                                       grad_checkpointing=args.grad_checkpointing)).to(device)
    model.set_backend(args.backend)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    dtype = amp_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = [p.detach().clone() for p in model.parameters()] if args.ema_decay > 0 else None

    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps) if args.epochs else args.max_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(0, total_steps - 1))

    start_step, best = 0, float("inf")
    resume = args.resume
    if resume == "auto":
        resume = os.path.join(args.output_dir, "checkpoint-last.pth")
        resume = resume if os.path.exists(resume) else None
    if resume:
        ckpt = load_checkpoint(resume, model)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt.get("train_state") or {}
        if "step" not in state:
            raise CheckpointError(f"checkpoint {resume!r} has no training state to resume (weights only?)")
        start_step, best = state["step"], state.get("best_nll", float("inf"))
        if state.get("virtual_ranks") != world * args.grad_accum:
            print(f"fractalgen train: note: resuming with {world * args.grad_accum} virtual ranks instead of "
                  f"{state.get('virtual_ranks')}; the run is no longer bit-identical to an uninterrupted one", file=sys.stderr)
        if ema is not None and state.get("ema") is not None:
            for e, v in zip(ema, state["ema"]):
                e.copy_(v)
        rng = state.get("rng") or []
        if rank < len(rng):
            torch.set_rng_state(rng[rank]["cpu"])
            if device.type == "cuda" and rng[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng[rank]["cuda"], device)
            if rng[rank].get("numpy") is not None:  # absent in checkpoints of older versions
                set_numpy_state(rng[rank]["numpy"])

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    log = CsvLog(os.path.join(args.output_dir, "log.csv"),
                 ["step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"],
                 keep_until_step=start_step if resume else -1) if is_main else None
    eval_log = CsvLog(os.path.join(args.output_dir, "eval.csv"), ["step", "nll_bits_per_dim", "samples"],
                      keep_until_step=start_step if resume else -1) if is_main else None

    def save(path: str, step: int) -> None:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
               "numpy": numpy_state()}
        all_rng = [rng]
        if world > 1:
            all_rng = [None] * world
            dist.all_gather_object(all_rng, rng)
        if is_main:
            epoch = step // max(1, steps_per_epoch)
            save_checkpoint(path, model, optimizer=optimizer, epoch=epoch, scaler=scaler,
                            args=argparse.Namespace(**{k: v for k, v in vars(args).items()}),
                            train_state={"step": step, "best_nll": best, "virtual_ranks": world * args.grad_accum,
                                         "ema": ema, "rng": all_rng})

    def evaluate(step: int) -> None:
        nonlocal best
        if not is_main:
            return
        from fractal_models.imageio import make_grid, write_png
        from fractal_models.likelihood import nll_bits_per_dim
        from fractal_models.sampling import generate
        eval_model = model
        backup = None
        if ema is not None:
            backup = [p.detach().clone() for p in model.parameters()]
            for p, e in zip(model.parameters(), ema):
                p.data.copy_(e)
        n = min(len(val_set), args.eval_images)
        imgs = torch.stack([val_set[i][0] for i in range(n)])
        bpd = nll_bits_per_dim(eval_model, imgs, seed=args.seed, batch_size=64)
        labels = torch.arange(min(num_classes, 16), device=device).repeat_interleave(2)[:16]
        samples = generate(eval_model, labels, cfg=args.sample_cfg, seed=args.seed)
        png = os.path.join(args.output_dir, "samples", f"step_{step:07d}.png")
        write_png(png, make_grid(samples.cpu(), nrow=8), scale=max(1, 128 // args.img_size))
        eval_log.write({"step": step, "nll_bits_per_dim": f"{bpd:.5f}", "samples": os.path.relpath(png, args.output_dir)})
        if backup is not None:
            for p, b in zip(model.parameters(), backup):
                p.data.copy_(b)
        if bpd < best:
            best = bpd
            save_checkpoint(os.path.join(args.output_dir, "checkpoint-best.pth"), model, optimizer=optimizer,
                            epoch=step // max(1, steps_per_epoch), scaler=scaler,
                            args=argparse.Namespace(**vars(args)), train_state={"step": step, "best_nll": best,
                                                                                "virtual_ranks": world * args.grad_accum})
        print(f"step {step}: held-out NLL {bpd:.4f} bits/dim, samples -> {png}", file=sys.stderr)

    bar = None
    if is_main and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")
    model.train()
    t_start = time.perf_counter()
    last: Dict[str, Any] = {}
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, pos = divmod(step, steps_per_epoch)
        order = epoch_order(args.seed, epoch, len(train_set))
        global_idx = order[pos * args.batch_size:(pos + 1) * args.batch_size].tolist()
        lr = lr_at(step, args, total_steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for k in range(args.grad_accum):
            v = rank * args.grad_accum + k
            idx = global_idx[v * args.micro_batch:(v + 1) * args.micro_batch]
            # torch's and numpy's RNGs (numpy draws the MAR mask counts/ratios, as in the reference)
            manual_seed(step_seed(args.seed, step, v))
            imgs, labels = load_batch(train_set, idx)
            flip = torch.rand(len(idx)) < 0.5  # random horizontal flip, as the reference's transform
            imgs = torch.where(flip[:, None, None, None], imgs.flip(-1), imgs)
            imgs, labels = normalize_uint8(imgs.to(device)), labels.to(device)
            sync = (k == args.grad_accum - 1) or world == 1
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else _null()
            with ctx:
                with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = ddp_model(imgs, labels)
                scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, model.parameters()):
                    e.mul_(args.ema_decay).add_(p.detach(), alpha=1 - args.ema_decay)
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss_value = float(loss_sum)
        if not math.isfinite(loss_value):
            raise TrainError(f"step {step}: loss is {loss_value}; stopping (lower --blr or use --precision fp32)")
        done = step + 1
        dt = time.perf_counter() - t0
        if is_main:
            log.write({"step": done, "epoch": epoch, "loss": f"{loss_value:.6f}", "lr": f"{lr:.6e}",
                       "grad_norm": f"{float(grad_norm):.4f}", "images_per_s": f"{args.batch_size / dt:.2f}",
                       "elapsed_s": f"{time.perf_counter() - t_start:.2f}"})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{args.batch_size / dt:.1f}")
        last = {"step": done, "loss": loss_value}
        if done % args.save_every == 0 or done == total_steps:
            save(os.path.join(args.output_dir, "checkpoint-last.pth"), done)
        if args.eval_every and (done % args.eval_every == 0 or done == total_steps):
            model.eval()
            evaluate(done)
            model.train()
        if world > 1 and (done % args.save_every == 0 or done % max(1, args.eval_every) == 0):
            dist.barrier()
    if bar is not None:
        bar.close()
    return {"last": last, "best_nll": best, "total_steps": total_steps}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = train(args)
    except (TrainError, DataError, CheckpointError) as e:
        print(f"fractalgen train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result["last"]:
        print(f"done: step {result['last']['step']}, loss {result['last']['loss']:.4f}, "
              f"best held-out NLL {result['best_nll']:.4f} bits/dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
