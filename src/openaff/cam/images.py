"""The images the maps are drawn on: :class:`Sample`, files and folders (:func:`load_images`), scikit-image's
photos (:func:`photo_samples`), ``fashion-mnist-scenes`` with their boxes (:func:`scene_samples`), and the
preprocessing that turns a sample into a model's input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import FASHION_MNIST_DIR
from ..data.scenes import FASHION_MNIST_CLASSES, FashionMNISTScenes
from ..errors import ConfigError, CorruptImageError, DataError
from ..photos import IMAGE_SUFFIXES, PHOTOS, photo
from .models import CamModel

__all__ = ["IMAGE_SUFFIXES", "PHOTOS", "Sample", "load_images", "photo_samples", "scene_samples"]



@dataclass
class Sample:
    """One image for the maps.

    Attributes:
        image: ``H x W x C`` uint8 pixels (C = 1 or 3).
        name: the row title.
        label: the true class (index or name), when known.
        box: the object's ``(x0, y0, x1, y1)`` box in ``image``'s pixels (exclusive ends), when known;
            an image with a box is resized whole to the model's input (no crop), so the box follows.
        side: the side in ``image``'s pixels the object was pasted at (scenes), when known.
    """

    image: np.ndarray
    name: str
    label: int | str | None = None
    box: tuple[int, int, int, int] | None = None
    side: int | None = None


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            grey = img.mode in ("1", "L", "I", "I;16", "F")
            arr = np.asarray(img.convert("L" if grey else "RGB"))
    except UnidentifiedImageError:
        raise CorruptImageError(f"cannot read image {path}: not an image file") from None
    except (OSError, ValueError) as err:
        raise CorruptImageError(f"cannot read image {path}: {' '.join(str(err).split())}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_images(paths: str | Path | Sequence[str | Path], labels: Sequence[int | str | None] | None = None
                ) -> list[Sample]:
    """Image files, and the image files of folders (sorted by name), as :class:`Sample`s.

    Args:
        paths: files or folders.
        labels: the true class of each image (index or name; None: unknown), in order.

    Raises:
        DataError: a path that does not exist, a folder without images, labels that do not match.
        CorruptImageError: a file that is not a readable image.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"image folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image path {p} does not exist")
    if labels is not None and len(labels) != len(files):
        raise DataError(f"{len(labels)} labels for {len(files)} images")
    return [Sample(_read_image(f), f.stem, None if labels is None else labels[i]) for i, f in enumerate(files)]


def photo_samples(names: Sequence[str] = PHOTOS) -> list[Sample]:
    """scikit-image's sample photos (default: astronaut, chelsea, coffee), without labels.

    Args:
        names: ``skimage.data`` image names.
    """
    try:
        return [Sample(photo(name), str(name)) for name in names]
    except ImportError:
        raise ConfigError("--data photos needs scikit-image: pip install open-aff[cam]") from None


def scene_samples(indices: Sequence[int], *, canvas: int = 64, split: str = "val", seed: int = 0,
                  data_dir: str | Path | None = None, clutter: tuple[int, int] | None = None) -> list[Sample]:
    """``fashion-mnist-scenes`` scenes with their class, box and pasted side (see :mod:`openaff.data.scenes`).

    Args:
        indices: scene indices of the split.
        canvas: the canvas side (the study's ``img_size``; 64 by default).
        split: ``val`` (the scenes a training run validates on), ``test`` or ``train``.
        seed: the scene set's seed (training uses 0).
        data_dir: the Fashion-MNIST folder (default: the Debian package's).
        clutter: smallest and largest number of fragments (default: the data set's); ``(0, 0)`` gives the same
            scenes without clutter, the item at the same place.

    Raises:
        DataError: no Fashion-MNIST data, or an index out of range.
        ConfigError: a bad canvas, split or seed.
    """
    extra = {} if clutter is None else dict(clutter=tuple(clutter))
    scenes = FashionMNISTScenes(data_dir if data_dir is not None else FASHION_MNIST_DIR, split, canvas, seed, **extra)
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < len(scenes)]
    if bad:
        raise DataError(f"scene index {bad[0]} is out of range: the {split} split has {len(scenes)} scenes "
                        f"(0-{len(scenes) - 1})")
    out = []
    for start in range(0, len(idx), 512):
        s = scenes.batch(idx[start:start + 512])
        for k, i in enumerate(idx[start:start + 512]):
            label = int(s["label"][k])
            out.append(Sample(s["image"][k].permute(1, 2, 0).numpy().copy(), f"scene {i}", label,
                              tuple(int(v) for v in s["box"][k].tolist()), int(s["side"][k])))
            out[-1].name = f"scene {i} ({FASHION_MNIST_CLASSES[label]})"
    return out


def _as_samples(images: Any) -> list[Sample]:
    if isinstance(images, (str, Path, Sample, np.ndarray)):
        images = [images]
    out: list[Sample] = []
    for i, item in enumerate(images):
        if isinstance(item, Sample):
            out.append(item)
        elif isinstance(item, (str, Path)):
            out += load_images([item])
        elif isinstance(item, np.ndarray) or hasattr(item, "convert"):  # a PIL image
            arr = np.asarray(item.convert("RGB") if hasattr(item, "convert") else item)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if arr.ndim != 3 or arr.shape[2] not in (1, 3):
                raise DataError(f"image {i} has shape {arr.shape}; expected H x W, H x W x 1 or H x W x 3")
            if arr.dtype != np.uint8:
                arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
            out.append(Sample(np.ascontiguousarray(arr), f"image {i}"))
        else:
            raise DataError(f"image {i} is a {type(item).__name__}; expected a path, a Sample, an array or a PIL image")
    if not out:
        raise DataError("no images given")
    return out


def _preprocess(sample: Sample, cm: CamModel) -> tuple[np.ndarray, torch.Tensor, tuple[float, ...] | None]:
    """``(display H x W x C in [0, 1], normalised 1 x C x H x W input, box in input pixels or None)``."""
    from PIL import Image

    c, h, w = cm.input_size
    arr = sample.image
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    img = img.convert("L" if c != 3 else "RGB")
    box = None
    if sample.box is not None:
        # Whole image to the input size: the box's coordinates scale with it.
        src_w, src_h = img.size
        if (src_w, src_h) != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        x0, y0, x1, y1 = sample.box
        box = (x0 * w / src_w, y0 * h / src_h, x1 * w / src_w, y1 * h / src_h)
        t = torch.from_numpy(np.asarray(img).copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    else:
        from timm.data import create_transform

        tf = create_transform(input_size=(3, h, w), crop_pct=cm.crop_pct, interpolation=cm.interpolation,
                              is_training=False, normalize=False)
        t = tf(img)
        t = t[None] if t.ndim == 2 else t
    x = t.float() / 255.0
    if x.shape[0] != c:
        x = x.expand(c, h, w)
    display = x.permute(1, 2, 0).numpy().copy()
    mean = torch.tensor(cm.mean).view(-1, 1, 1)
    std = torch.tensor(cm.std).view(-1, 1, 1)
    return display, ((x - mean) / std)[None].contiguous(), box
