"""``fractalgen``: sample image grids, compute NLL, describe configs and backends.

    fractalgen info [--config NAME]
    fractalgen download fractalmar_in64 | all          (published weights into $FRACTAL_HOME, resumable, checked)
    fractalgen sample --config fractalmar_in64 [--checkpoint ckpt.pth] --labels 1,2,3 --cfg 4 --output grid.png
    torchrun --nproc-per-node 8 -m fractal_models.cli sample --config ... --num-images 50000 --output-dir out/fid
    fractalgen nll --config fractalmar_in64 --checkpoint ckpt.pth --images val.npz
    fractalgen train --demo --max-steps 300 --output-dir out/demo      (see fractalgen train --help)
    fractalgen eval --config tiny_mar --checkpoint out/demo/checkpoint-best.pth --demo

A published config without ``--checkpoint`` uses its published weights (downloaded once into the cache;
``--random-init`` for untrained weights). ``--checkpoint`` takes a file, a published name, a URL or
``hf://owner/repo[/file]``. Errors (missing/mismatched checkpoint, a failed download, bad arguments) print one
line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

from fractal_models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from fractal_models.configs import CONFIG_NAMES, build_model
from fractal_models.fractalgen import FractalGen
from fractal_models.hub import PRETRAINED, DownloadError, download_weights, resolve_source


def _build(config: str, device: str, **overrides) -> FractalGen:
    if config.endswith(".json"):
        if not os.path.isfile(config):
            raise ValueError(f"--config {config!r}: file not found")
        spec = json.load(open(config))
        model = FractalGen(**{**spec.get("constructor", spec), **overrides})
    else:
        model = build_model(config, **overrides)
    return model.to(device)


def _checkpoint_path(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint file to load: ``--checkpoint`` (a file, or a published name / URL / hf:// id, downloaded
    into the cache), else the published weights of ``--config`` when it is a published name (unless
    ``--random-init``), else None (random initialisation)."""
    spec = args.checkpoint
    if not spec:
        if args.config in PRETRAINED and not getattr(args, "random_init", False):
            spec = args.config
        else:
            return None
    if spec in PRETRAINED or spec.startswith("hf://") or "://" in spec:
        return download_weights(resolve_source(spec), progress=not getattr(args, "quiet", False))
    return spec


def _model_from_args(args: argparse.Namespace):
    """Build ``--config`` (with the checkpoint's class count, if it records one) and load its checkpoint."""
    path = _checkpoint_path(args)
    args.checkpoint_used = path
    if not path:
        return _build(args.config, args.device), None
    ckpt = read_checkpoint(path)
    saved = ckpt.get("args")
    overrides = {"class_num": saved.class_num} if getattr(saved, "class_num", None) else {}
    model = _build(args.config, "cpu", **overrides)
    load_checkpoint(path, model, ckpt=ckpt)
    return model.to(args.device), ckpt


def _count(module: torch.nn.Module, exclude: Optional[torch.nn.Module] = None) -> int:
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def level_parameter_counts(model: FractalGen) -> List[dict]:
    """Parameters per level: each FractalGen node without its ``next_fractal``, then the pixel head."""
    rows, node, level = [], model, 0
    while isinstance(node, FractalGen):
        kind = type(node.generator).__name__
        rows.append(dict(level=level, kind=kind, params=_count(node, exclude=node.next_fractal)))
        node, level = node.next_fractal, level + 1
    rows.append(dict(level=level, kind="PixelLoss", params=_count(node)))
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    from fractal_kernels.dispatch import backend_report
    from fractal_models.engine.paths import describe as describe_paths, level_paths
    names = [args.config] if args.config else list(CONFIG_NAMES)
    for name in names:
        with torch.device("meta"):
            model = _build(name, "meta")
        total = _count(model)
        print(f"{name}: {total / 1e6:.1f}M parameters")
        for row in level_parameter_counts(model):
            print(f"  level {row['level']} {row['kind']:<9} {row['params'] / 1e6:9.3f}M")
        print("  fast-engine path per level on a GPU (kernel backends; dispatch policy):")
        for line in describe_paths(level_paths(model.eval(), torch.device("cuda"), "triton", policy_only=True)):
            print(f"    {line}")
    print("kernel backends:")
    for backend, (ok, why) in backend_report().items():
        print(f"  {backend:<7} {'available' if ok else 'unavailable'}: {why}")
    from fractal_kernels import dispatch, policy
    print("dispatch policy (which file each auto decision comes from):")
    here = dispatch.device_name() if torch.cuda.is_available() else None
    for line in policy.describe(here, tuple(dispatch.CUDA_SYMBOLS)):
        print(f"  {line}")
    return 0


def _labels(text: str) -> torch.Tensor:
    try:
        return torch.tensor([int(x) for x in text.split(",") if x.strip() != ""], dtype=torch.long)
    except ValueError:
        raise ValueError(f"--labels: expected comma-separated integers, got {text!r}") from None


def cmd_sample(args: argparse.Namespace) -> int:
    from fractal_models.imageio import make_grid, write_png
    from fractal_models.sampling import generate
    torch.manual_seed(args.seed)  # random-init weights (no --checkpoint) are then the same on every rank and run
    num_iter = [int(x) for x in args.num_iter_list.split(",")] if args.num_iter_list else None
    settings = dict(num_iter_list=num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                    filter_threshold=args.filter_threshold, top_p=args.top_p, fast=not args.faithful,
                    backend=args.backend, compile=args.compile, cuda_graphs=args.cuda_graphs,
                    precision=args.precision)
    if args.num_images is not None:
        from fractal_models.bulk import generate_many, rank_and_world
        if not args.output_dir:
            raise ValueError("--num-images needs --output-dir (PNGs and samples.npz go there)")
        rank, world = rank_and_world()
        if world > 1 and args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        model, _ = _model_from_args(args)
        t0 = time.perf_counter()
        res = generate_many(model, args.num_images, args.output_dir, batch_size=args.batch_size, seed=args.seed,
                            rank=rank, world=world, progress=not args.quiet, **settings)
        print(f"rank {rank}/{world}: generated {res['generated']} batches, {res['skipped']} already done, "
              f"{time.perf_counter() - t0:.1f} s" + (f"; wrote {res['npz']}" if res["npz"] else ""))
        return 0
    model, _ = _model_from_args(args)
    labels = _labels(args.labels)
    t0 = time.perf_counter()
    images = generate(model, labels, seed=args.seed, progress=not args.quiet, **settings)
    dt = time.perf_counter() - t0
    write_png(args.output, make_grid(images, nrow=args.nrow), scale=args.scale)
    source = args.checkpoint_used or "randomly initialised weights (no --checkpoint)"
    print(f"wrote {args.output}: {images.shape[0]} images of {images.shape[-1]}x{images.shape[-1]} in {dt:.1f} s "
          f"from {source}")
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    from fractal_models.imageio import load_images
    from fractal_models.likelihood import nll_bits_per_dim
    images = load_images(args.images)
    model, _ = _model_from_args(args)
    bpd = nll_bits_per_dim(model, images, num_orders=args.num_orders, batch_size=args.batch_size, seed=args.seed)
    source = args.checkpoint_used or "randomly initialised weights (no --checkpoint)"
    print(f"NLL: {bpd:.5f} bits/dim over {images.shape[0]} images ({args.num_orders} pass(es) each), {source}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch published weights (or any URL / hf:// id) into the cache; prints one line per file."""
    names = list(PRETRAINED) if args.names == ["all"] else args.names
    for name in names:
        path = download_weights(name, cache=args.cache_dir, progress=not args.quiet, force=args.force)
        size = os.path.getsize(path)
        print(f"{name}: {path} ({size / 2 ** 20:.1f} MiB, checked)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """NLL of a checkpoint on a held-out set; FID/IS only with torch-fidelity and local Inception weights."""
    from fractal_models.data import ImageFolder, ShippedPhotos
    from fractal_models.likelihood import nll_bits_per_dim
    if args.fid and not args.inception_weights:
        raise ValueError("--fid needs --inception-weights FILE (the FID Inception weights; nothing is downloaded)")
    if args.fid:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ValueError("--fid needs torch-fidelity: pip install torch-fidelity (with a torchvision for your torch)") from None
        if not os.path.isfile(args.inception_weights):
            raise ValueError(f"--inception-weights {args.inception_weights!r}: file not found")
    model, ckpt = _model_from_args(args)
    if args.demo:
        data = ShippedPhotos("val", model.img_size, per_class=max(1, args.num_images // ShippedPhotos.num_classes))
    elif args.data_path:
        data = ImageFolder(args.data_path, model.img_size)
    else:
        raise ValueError("give --data-path (ImageFolder) or --demo (the shipped photos' held-out split)")
    n = min(len(data), args.num_images)
    imgs = torch.stack([data[i][0] for i in range(n)])
    bpd = nll_bits_per_dim(model, imgs, num_orders=args.num_orders, batch_size=args.batch_size, seed=args.seed)
    step = ((ckpt or {}).get("train_state") or {}).get("step")
    print(f"NLL: {bpd:.5f} bits/dim over {n} images" + (f" (checkpoint step {step})" if step is not None else ""))
    if args.fid:
        from fractal_models.sampling import generate
        from fractal_models.imageio import write_png
        out = os.path.join(args.output_dir, "fid_samples")
        labels = torch.arange(args.fid_images) % model.num_classes
        for start in range(0, args.fid_images, args.batch_size):
            batch = generate(model, labels[start:start + args.batch_size].to(args.device), cfg=args.cfg,
                             temperature=args.temperature, seed=args.seed + start)
            for j, img in enumerate(batch.cpu()):
                write_png(os.path.join(out, f"{start + j:05d}.png"), img.permute(1, 2, 0).numpy())
        metrics = torch_fidelity.calculate_metrics(input1=out, input2=None, fid_statistics_file=args.fid_stats,
                                                   feature_extractor_weights_path=args.inception_weights,
                                                   cuda=torch.cuda.is_available(), isc=True, fid=True, verbose=False)
        print(", ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalgen", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, need_config=True):
        sp.add_argument("--config", required=need_config,
                        help=f"published config ({', '.join(CONFIG_NAMES)}) or a JSON file of constructor arguments")
        sp.add_argument("--checkpoint", default=None,
                        help="checkpoint-*.pth (reference layout), a published name, a URL or hf://owner/repo[/file]; "
                             "default: the published weights of a published --config, else random init")
        sp.add_argument("--random-init", action="store_true",
                        help="untrained weights even for a published --config (nothing is downloaded)")
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--seed", type=int, default=0)

    sub.add_parser("train", help="train a model (see: fractalgen train --help)", add_help=False)
    info = sub.add_parser("info", help="configs, parameters per level, available kernel backends")
    info.add_argument("--config", default=None)
    info.set_defaults(fn=cmd_info)

    d = sub.add_parser("download", help="download published weights into the cache ($FRACTAL_HOME)")
    d.add_argument("names", nargs="+", metavar="NAME",
                   help=f"'all', a published name ({', '.join(PRETRAINED)}), a URL or hf://owner/repo[/file]")
    d.add_argument("--cache-dir", default=None, help="default: $FRACTAL_HOME, else ~/.cache/fractal_models")
    d.add_argument("--force", action="store_true", help="download again even if a checked copy is cached")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(fn=cmd_download)

    s = sub.add_parser("sample", help="generate a PNG grid of class-conditional samples")
    common(s)
    s.add_argument("--labels", default="0,1,2,3", help="comma-separated class ids")
    s.add_argument("--cfg", type=float, default=1.0)
    s.add_argument("--cfg-schedule", default="linear", choices=["linear", "constant"])
    s.add_argument("--temperature", type=float, default=1.0, help="multiplies the logits (reference convention)")
    s.add_argument("--filter-threshold", type=float, default=1e-4)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--num-iter-list", default=None, help="e.g. 64,16 (default: 64 at the top, every patch below)")
    s.add_argument("--output", default="samples.png")
    s.add_argument("--nrow", type=int, default=8)
    s.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of the PNG")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--faithful", action="store_true",
                   help="run the reference's sampling loop literally (default: the fast engine, reference-exact with "
                        "--backend torch in fp32)")
    s.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)  # the default since the fast engine landed
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="kernels: auto = fused kernels on a GPU, reference math + the compiled C++ pixel head on a "
                        "CPU; torch = reference math (bit-exact)")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fp16 autocast on a CUDA device (the public code's sampling), fp32 elsewhere; "
                        "scores and pixel logits stay fp32")
    s.add_argument("--compile", action="store_true", help="torch.compile the tiny levels' transformer stacks")
    s.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs for those stacks (CUDA only; implies --compile)")
    s.add_argument("--num-images", type=int, default=None,
                   help="bulk mode: images 0..N-1 (class i %% num_classes) as PNGs + samples.npz in --output-dir; "
                        "shards over torchrun ranks, resumable")
    s.add_argument("--output-dir", default=None)
    s.add_argument("--batch-size", type=int, default=64, help="bulk mode: images per generate call")
    s.set_defaults(fn=cmd_sample)

    n = sub.add_parser("nll", help="unconditional NLL in bits/dim of a set of images")
    common(n)
    n.add_argument("--images", required=True, help=".npz/.npy/.pt file of uint8 images [N, 3, H, W] or [N, H, W, 3]")
    n.add_argument("--num-orders", type=int, default=1, help="passes per image averaged (reference: --nll_forward_number)")
    n.add_argument("--batch-size", type=int, default=64)
    n.set_defaults(fn=cmd_nll)

    e = sub.add_parser("eval", help="held-out NLL (bits/dim) of a checkpoint; FID/IS with local Inception weights")
    common(e)
    e.add_argument("--data-path", default=None, help="held-out ImageFolder")
    e.add_argument("--demo", action="store_true", help="the shipped photos' held-out split")
    e.add_argument("--num-images", type=int, default=1000)
    e.add_argument("--num-orders", type=int, default=1)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--fid", action="store_true", help="also FID/IS (needs torch-fidelity and --inception-weights)")
    e.add_argument("--inception-weights", default=None)
    e.add_argument("--fid-stats", default=None, help="reference statistics .npz (e.g. the reference's fid_stats/)")
    e.add_argument("--fid-images", type=int, default=50000)
    e.add_argument("--cfg", type=float, default=1.0)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--output-dir", default="./output_dir")
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer owns its flags (also: python -m fractal_models.train)
        from fractal_models.train import main as train_main
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, DownloadError, ValueError, TypeError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"fractalgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
