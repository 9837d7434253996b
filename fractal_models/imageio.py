"""Minimal image I/O without extra dependencies: PNG writing (zlib) and image-grid layout."""
from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import torch

from fractal_kernels._io import atomic_write


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """uint8 ``[B, 3, H, W]`` -> one uint8 ``[H', W', 3]`` grid, ``nrow`` images per row."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    ncol = max(1, min(nrow, b))
    nrows = max(1, math.ceil(b / ncol))
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png(path: str, rgb: np.ndarray, scale: int = 1) -> None:
    """Write an 8-bit RGB ``[H, W, 3]`` array as PNG, atomically (temp file + rename)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
    atomic_write(path, data, suffix=".png")


def load_images(path: str) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` from ``.npz`` (first array, NHWC or NCHW), ``.pt``/``.pth`` (a tensor) or ``.npy``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"images {path!r}: file not found")
    if path.endswith(".npz"):
        with np.load(path) as z:
            arr = z[z.files[0]]
    elif path.endswith(".npy"):
        arr = np.load(path)
    elif path.endswith((".pt", ".pth")):
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"images {path!r}: expected a tensor, got {type(t).__name__}")
        arr = t.numpy()
    else:
        raise ValueError(f"images {path!r}: expected a .npz, .npy or .pt file of uint8 images")
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"images {path!r}: expected uint8 [N, 3, H, W] or [N, H, W, 3], got {arr.dtype} {arr.shape}")
    if arr.shape[-1] == 3 and arr.shape[1] != 3:
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))
