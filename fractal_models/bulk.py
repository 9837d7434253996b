"""Bulk generation for evaluation (FID/IS): ``fractalgen sample --num-images N --output-dir DIR``.

Images are numbered 0..N-1; image i has class ``i % num_classes`` (class-balanced, as the reference's evaluation
run) and belongs to chunk ``i // batch_size``, generated in one ``generate`` call with seed ``seed + chunk``.
Chunks are dealt round-robin to the ranks of a ``torchrun`` job (``WORLD_SIZE``/``RANK``), so the images do
not depend on the number of processes. Every PNG is written atomically (``DIR/images/00000.png``...); a rerun
skips the chunks whose PNGs all exist, so an interrupted run resumes where it stopped. When every PNG is
there, ``DIR/samples.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``, the layout FID tools read) is written, atomically,
by rank 0 after a barrier (or by whichever process finds the set complete when there is no process group).
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import torch

from fractal_kernels._io import atomic_file
from fractal_models.fractalgen import FractalGen
from fractal_models.imageio import write_png


def _png(out_dir: str, i: int) -> str:
    return os.path.join(out_dir, "images", f"{i:05d}.png")


def _read_png(path: str) -> np.ndarray:
    """Decode one of our own PNGs (8-bit RGB, filter 0 on every row, one IDAT) back to ``[H, W, 3]``."""
    import struct
    import zlib
    data = open(path, "rb").read()
    w, h = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        if tag == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    if raw[:, 0].any():
        raise ValueError(f"{path}: not a PNG written by fractalgen (row filters)")
    return raw[:, 1:].reshape(h, w, 3)


def _write_npz(path: str, images: np.ndarray) -> None:
    with atomic_file(path, suffix=".npz") as f:
        np.savez(f, images)


def generate_many(model: FractalGen, num_images: int, out_dir: str, *, batch_size: int = 64, seed: int = 0,
                  rank: int = 0, world: int = 1, progress: bool = True, **generate_kwargs) -> Dict[str, object]:
    """Generate images ``0..num_images-1`` of this rank's chunks into ``out_dir`` (see module docstring);
    returns ``{"generated", "skipped", "npz"}`` (chunks made and skipped by this rank, the npz path or None)."""
    from fractal_models.sampling import generate
    if num_images < 1:
        raise ValueError(f"--num-images: expected a positive count, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive size, got {batch_size}")
    device = next(model.parameters()).device
    chunks = range((num_images + batch_size - 1) // batch_size)
    mine = [c for c in chunks if c % world == rank]
    todo = [c for c in mine
            if not all(os.path.exists(_png(out_dir, i)) for i in range(c * batch_size, min(num_images, (c + 1) * batch_size)))]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="fractalgen sample", unit="batch")
    for c in todo:
        ids = torch.arange(c * batch_size, min(num_images, (c + 1) * batch_size))
        labels = (ids % model.num_classes).to(device)
        images = generate(model, labels, seed=seed + c, **generate_kwargs).cpu()
        for i, img in zip(ids.tolist(), images):
            write_png(_png(out_dir, i), img.permute(1, 2, 0).numpy())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist_on:
        torch.distributed.barrier()
    npz = None
    if (rank == 0 or not dist_on) and all(os.path.exists(_png(out_dir, i)) for i in range(num_images)):
        npz = os.path.join(out_dir, "samples.npz")
        _write_npz(npz, np.stack([_read_png(_png(out_dir, i)) for i in range(num_images)]))
    return {"generated": len(todo), "skipped": len(mine) - len(todo), "npz": npz}


def rank_and_world() -> List[int]:
    """(rank, world) from ``torchrun``'s environment; initialises the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return [rank, world]
