"""Shared helpers of the segmentation tests: a tiny VOC-style folder written on the spot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from openaff.segmentation.data import voc_palette


def write_voc(root: Path, n_train: int = 8, n_val: int = 4, size: tuple[int, int] = (40, 30), classes: int = 3,
              seed: int = 0, val_sizes: list[tuple[int, int]] | None = None,
              train_sizes: list[tuple[int, int]] | None = None) -> Path:
    """A VOC-style folder: JPEG images, masks alternately palette and index (L) PNGs, split lists, labels.txt.

    Class k is a bright rectangle of grey level 60 + 60 k on a dark image; a 1-pixel 255 border around it.
    ``val_sizes``, ``train_sizes``: (width, height) of the validation / training images in turn (default: all
    ``size``).
    """
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("\n".join(["background", *[f"thing{k}" for k in range(1, classes)]]) + "\n")
    names = {"train": [], "val": []}
    palette = voc_palette().reshape(-1).tolist()
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        sizes, j = (train_sizes, i) if split == "train" else (val_sizes, i - n_train)
        w, h = sizes[j % len(sizes)] if sizes else size
        name = f"{split}_{i:03d}"
        names[split].append(name)
        img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        k = 1 + i % (classes - 1)
        y0, x0 = rng.integers(2, h // 2), rng.integers(2, w // 2)
        mask[y0 - 1: y0 + h // 3 + 1, x0 - 1: x0 + w // 3 + 1] = 255
        mask[y0: y0 + h // 3, x0: x0 + w // 3] = k
        img[mask == k] = 60 + 60 * k
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        m = Image.fromarray(mask, "L") if i % 2 else Image.fromarray(mask, "P")
        if m.mode == "P":
            m.putpalette(palette)
        m.save(root / "SegmentationClass" / f"{name}.png")
    for split, ids in names.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
