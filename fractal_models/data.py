"""Training data: any ImageFolder directory, and a small real dataset shipped inside a registry wheel.

``ImageFolder``: ``root/<class>/<image>`` (ImageNet layout), center-crop + resize as the reference does
(ADM's ``center_crop_arr``: BOX-halve while the image is at least twice the target, then BICUBIC so the
short side matches, then a centre crop). Decoding needs Pillow.

``ShippedPhotos``: the RGB photographs inside the scikit-image 0.26 wheel (``skimage/data/*``), read as
plain files from the installed package: nothing is downloaded and ``skimage`` itself is never imported.
Each photo is one class; samples are random square crops (48-112 px) resized to the model's image size.
The left 75 % of every photo feeds the ``train`` split and the right 25 % the ``val`` split, so the
held-out crops never overlap training pixels. Crops are drawn once from a seed, so the dataset is fixed.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".JPEG")

SHIPPED_PHOTOS: Tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
    "motorcycle_left.png", "motorcycle_right.png", "ihc.png", "color.png",
)


class DataError(ValueError):
    """A dataset cannot be used (missing folder, no images, missing optional dependency)."""


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'fractal-kernels[train]'") from None
    return Image


def center_crop_arr(pil_image, image_size: int):
    """Short side to ``image_size`` (BOX halving, then BICUBIC) and a centre crop; returns a PIL image."""
    Image = _pil()
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def _to_tensor(pil_image) -> torch.Tensor:
    arr = np.asarray(pil_image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # uint8 [3, H, W]


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` -> (uint8 ``[3, S, S]``, label); classes sorted by folder name."""

    def __init__(self, root: str, image_size: int, indices: Optional[Sequence[int]] = None) -> None:
        if not os.path.isdir(root):
            raise DataError(f"data path {root!r}: directory not found")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise DataError(f"data path {root!r}: no class sub-folders (expected root/<class>/<image>)")
        samples: List[Tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            folder = os.path.join(root, cls)
            for name in sorted(os.listdir(folder)):
                if name.endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(folder, name), label))
        if not samples:
            raise DataError(f"data path {root!r}: no images with extensions {', '.join(IMG_EXTENSIONS[:5])}, ...")
        self.samples = samples if indices is None else [samples[i] for i in indices]
        self.image_size = image_size
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        Image = _pil()
        with Image.open(path) as img:
            return _to_tensor(center_crop_arr(img.convert("RGB"), self.image_size)), label


def shipped_photo_dir() -> str:
    """Folder of the scikit-image wheel's sample photographs (no import of skimage, no download)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the shipped demo data lives in the scikit-image 0.26 wheel: pip install 'fractal-kernels[train]'")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [p for p in SHIPPED_PHOTOS if not os.path.isfile(os.path.join(folder, p))]
    if missing:
        raise DataError(f"scikit-image at {folder} lacks {missing}; install scikit-image==0.26.0")
    return folder


class ShippedPhotos(torch.utils.data.Dataset):
    """The class-conditional demo set (see module docstring): uint8 ``[3, S, S]`` crops, label = photo."""

    classes = tuple(os.path.splitext(p)[0] for p in SHIPPED_PHOTOS)
    num_classes = len(SHIPPED_PHOTOS)

    def __init__(self, split: str, image_size: int, per_class: int = 256, seed: int = 0,
                 min_crop: int = 48, max_crop: int = 112) -> None:
        if split not in ("train", "val"):
            raise DataError(f"split: expected 'train' or 'val', got {split!r}")
        Image = _pil()
        folder = shipped_photo_dir()
        g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
        images, labels = [], []
        for label, name in enumerate(SHIPPED_PHOTOS):
            with Image.open(os.path.join(folder, name)) as img:
                photo = img.convert("RGB")
            w, h = photo.size
            x0, x1 = (0, int(w * 0.75)) if split == "train" else (int(w * 0.75), w)
            top_side = min(max_crop, x1 - x0, h)
            for _ in range(per_class):
                side = int(torch.randint(min(min_crop, top_side), top_side + 1, (1,), generator=g))
                x = x0 + int(torch.randint(0, x1 - x0 - side + 1, (1,), generator=g))
                y = int(torch.randint(0, h - side + 1, (1,), generator=g))
                crop = photo.crop((x, y, x + side, y + side))
                images.append(_to_tensor(center_crop_arr(crop, image_size)))
                labels.append(label)
        self.images = torch.stack(images)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.image_size = image_size

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
