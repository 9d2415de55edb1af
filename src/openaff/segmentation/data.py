"""Segmentation data: fashion-mnist-scenes masks, VOC-style folders, joint image/mask augmentation, loaders.

Two sources, both yielding ``(uint8 C x H x W image, uint8 H x W mask)``, 255 = ignore:

* ``fashion-mnist-scenes`` (:mod:`openaff.data.scenes`, nothing downloaded): the scene's
  per-pixel mask, 0 = background, ``label + 1`` = the item: 11 classes. Batches are made at once,
  in the training process, and augmented on the device.
* A VOC-style folder: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` and the split lists
  ``ImageSets/Segmentation/{train,val}.txt`` (the folder itself, or its ``VOC2012`` /
  ``VOCdevkit/VOC2012``). Masks are palette PNGs (the palette index is the class, as VOC ships
  them) or single-channel index PNGs; 255 is ignored. The classes are the 21 of PASCAL VOC unless
  the folder has a ``labels.txt`` (one class name per line, background first). Images are decoded
  and augmented per image in loader workers (seeded by seed, epoch and index).

Joint augmentation never interpolates labels: masks are moved by whole pixels or resampled with
nearest-neighbour lookups, so every mask value is one of the input's.

* ``crop-flip``: in-memory scenes: the batch pipeline's pad-crop (``crop_padding``) and flip,
  the same draws for image and mask (padding is background, as the black canvas it shows). VOC:
  a random ``img_size`` crop (padded with 0 / ignore where the image is smaller) and a flip.
* ``scale-crop-flip``: first a random scale in [0.5, 2] (log-uniform), image bilinear, mask
  nearest; then as ``crop-flip`` (scenes: the scaled batch is placed at a random offset in one
  batched ``grid_sample``; outside the canvas is background).
* ``none``: scenes as they are; VOC a centre ``img_size`` crop.

Validation images are used whole; a VOC batch of different sizes is padded to the largest
(image 0, mask ignore) and the padding never counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..data.datasets import DATASET_STATS, SCENES_CANVAS, ImageData, check_limit, read_rgb, resolve_source
from ..data.loader import BatchPipeline, lighting_shift, seed_key
from ..data.splits import load_data
from ..errors import ConfigError, DataError
from ..training.config import TrainConfig
from .metrics import IGNORE_INDEX

__all__ = ["SCALE_RANGE", "SEGMENTATION_KINDS", "VOC_CLASSES", "JointTransform", "SceneMasks", "SegmentationPipeline",
           "VOCSegmentation", "read_mask", "seg_collate", "voc_palette"]

SEGMENTATION_KINDS = ("fashion-mnist-scenes", "voc")
SCALE_RANGE = (0.5, 2.0)  # scale-crop-flip: the usual VOC range (DeepLab, mmsegmentation)
VOC_CROP = 512  # default training crop of VOC folders
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def voc_palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map, ``n x 3`` uint8 (class k's colour from the bits of k; 255 is near white)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[k] = (r, g, b)
    return pal


# --- fashion-mnist-scenes -------------------------------------------------------------------------

class SceneMasks(Dataset):
    """fashion-mnist-scenes as a segmentation set: ``(uint8 1 x H x W scene, uint8 H x W mask)``.

    Args:
        scenes: the scenes (:class:`openaff.data.scenes.FashionMNISTScenes`), which make the masks.
    """

    def __init__(self, scenes: Dataset) -> None:
        self.scenes = scenes

    @property
    def classes(self) -> list[str]:
        return ["background", *self.scenes.classes]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scenes.batch([i])
        return s["image"][0], s["mask"][0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scenes.batch(indices)  # one batched generation (see loader.collate)
        return s["image"], s["mask"]

    def subset(self, n: int | None, what: str = "limit") -> SceneMasks:
        """The first ``n`` scenes (all with None)."""
        return SceneMasks(self.scenes.subset(n, what))

    @property
    def side_range(self) -> tuple[int, int]:
        """Smallest and largest pasted item side of the scenes (pixels)."""
        return self.scenes.side_range

    def item_sides(self) -> torch.Tensor:
        """The pasted item side of every scene (int64)."""
        return self.scenes.item_sides()


# --- VOC folders ------------------------------------------------------------------------------------

def read_mask(path: str | Path, num_classes: int, size: tuple[int, int] | None = None,
              image: str | Path | None = None) -> np.ndarray:
    """A class mask from a palette or single-channel index PNG, checked: ``H x W`` uint8.

    Args:
        path: the mask file.
        num_classes: valid values are ``0 .. num_classes - 1`` and 255 (ignore).
        size: the ``(width, height)`` of its image, when known (they must agree).
        image: the image file, for the message.

    Raises:
        DataError: a missing or unreadable file, an RGB mask, a size that is not the image's, or a
            value that is neither a class nor 255; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file {path} is missing" + (f" (for image {image})" if image else ""))
    try:
        with Image.open(path) as m:
            m.load()
            mode, msize = m.mode, m.size
            arr = np.asarray(m)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read mask {path}: {err}") from None
    if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"):
        raise DataError(f"mask {path} is a {mode} image, not a palette (P) or single-channel index PNG; masks must "
                        f"hold class numbers 0-{num_classes - 1} (255 = ignore), not colours")
    if mode not in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "PA"):
        raise DataError(f"mask {path} has the image mode {mode}; expected a palette (P) or index (L) PNG")
    if mode == "PA":
        arr = arr[..., 0]
    if size is not None and msize != tuple(size):
        raise DataError(f"mask {path} is {msize[0]}x{msize[1]} but its image {image or ''} is {size[0]}x{size[1]}")
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
    if bad.any():
        values = sorted(int(v) for v in np.unique(arr[bad]))
        raise DataError(f"mask {path} has the value {values[0]}" + (f" (and {len(values) - 1} more)" if len(values) > 1
                                                                     else "")
                        + f", which is neither a class (0-{num_classes - 1}) nor 255 (ignore)")
    return arr.astype(np.uint8)


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    raise DataError(f"{root} is not a VOC-style folder: expected JPEGImages/ and SegmentationClass/ (and "
                    "ImageSets/Segmentation/{train,val}.txt)")


def _voc_classes(root: Path) -> list[str]:
    labels = root / "labels.txt"
    if not labels.is_file():
        return list(VOC_CLASSES)
    names = [ln.strip() for ln in labels.read_text().splitlines() if ln.strip()]
    if not 2 <= len(names) <= 255:
        raise DataError(f"{labels} must name 2 to 255 classes (background first), one per line; found {len(names)}")
    return names


class VOCSegmentation(Dataset):
    """A VOC-style segmentation folder's split (see the module docstring).

    Args:
        root: the folder (or its ``VOC2012`` / ``VOCdevkit/VOC2012``).
        split: ``train`` or ``val`` (``ImageSets/Segmentation/<split>.txt``).
        transform: the joint training transform (None: images as they are).
        skip_corrupt: an unreadable image yields None (dropped and counted) instead of an error.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None,
                 skip_corrupt: bool = False) -> None:
        self.root = _voc_root(Path(root))
        self.classes = _voc_classes(self.root)
        lst = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"VOC folder {self.root} has no split list {lst}")
        ids = [ln.split()[0] for ln in lst.read_text().splitlines() if ln.strip()]
        if not ids:
            raise DataError(f"the split list {lst} is empty")
        self.ids = ids
        self.transform, self.skip_corrupt = transform, skip_corrupt
        for what, folder, ext in (("image", "JPEGImages", ".jpg"), ("mask", "SegmentationClass", ".png")):
            missing = [i for i in ids if not (self.root / folder / f"{i}{ext}").is_file()]
            if missing:
                raise DataError(f"{what} file {self.root / folder / (missing[0] + ext)} is missing ({len(missing)} of "
                                f"the {len(ids)} {split} images listed in {lst} have no {what})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, n: int | None, what: str = "limit") -> VOCSegmentation:
        """The first ``n`` images of the list (all with None)."""
        n = check_limit(n, what)
        if n is None or n >= len(self.ids):
            return self
        out = object.__new__(VOCSegmentation)
        out.__dict__.update(self.__dict__)
        out.ids = self.ids[:n]
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        name = self.ids[index]
        path = self.root / "JPEGImages" / f"{name}.jpg"
        img = read_rgb(path, self.skip_corrupt)
        if img is None:
            return None
        mask = read_mask(self.root / "SegmentationClass" / f"{name}.png", self.num_classes, img.size, path)
        image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
        mask_t = torch.from_numpy(mask.copy())
        if self.transform is not None:
            image, mask_t = self.transform(image, mask_t, index)
        return image, mask_t


class JointTransform:
    """Per-image training transform of an image and its mask: [scale,] crop to ``size``, [flip].

    Seeded by ``(seed, epoch, index)`` (``epoch`` is set by the loader of each epoch), so an image's
    augmentation does not depend on the worker that loads it, and a resumed epoch repeats it.

    Args:
        size: side of the square training crop.
        scale: ``(min, max)`` of the random scale (log-uniform), or None for none.
        hflip: horizontal flip probability.
        random_crop: a random crop position (False: the centre).
        seed: the run's seed.
    """

    def __init__(self, size: int, scale: tuple[float, float] | None = None, hflip: float = 0.0,
                 random_crop: bool = True, seed: int = 0) -> None:
        self.size, self.scale, self.hflip, self.random_crop, self.seed = size, scale, hflip, random_crop, seed
        self.epoch = 0

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed_key(self.seed, self.epoch, index))
        h, w = mask.shape
        if self.scale is not None:
            lo, hi = (math.log(s) for s in self.scale)
            s = math.exp(lo + (hi - lo) * torch.rand((), generator=g).item())
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=s < 1).round_().clamp_(0, 255).to(torch.uint8)[0]
            # nearest-exact: a label is looked up, never blended
            mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].to(torch.uint8)
            h, w = nh, nw
        ph, pw = max(self.size - h, 0), max(self.size - w, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0)
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
            h, w = mask.shape
        if self.random_crop:
            y0 = int(torch.randint(0, h - self.size + 1, (), generator=g))
            x0 = int(torch.randint(0, w - self.size + 1, (), generator=g))
        else:
            y0, x0 = (h - self.size) // 2, (w - self.size) // 2
        image = image[:, y0:y0 + self.size, x0:x0 + self.size]
        mask = mask[y0:y0 + self.size, x0:x0 + self.size]
        if self.hflip and torch.rand((), generator=g).item() < self.hflip:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


def seg_collate(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(uint8 images, uint8 masks, skipped)``; images of different sizes are padded to the largest
    (image 0, mask 255 = ignore), unreadable ones (None, ``--skip-corrupt``) dropped and counted."""
    if isinstance(batch, tuple):
        return batch[0], batch[1], 0
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), len(batch)
    h = max(m.shape[0] for _, m in kept)
    w = max(m.shape[1] for _, m in kept)
    images = torch.zeros(len(kept), kept[0][0].shape[0], h, w, dtype=torch.uint8)
    masks = torch.full((len(kept), h, w), IGNORE_INDEX, dtype=torch.uint8)
    for i, (img, m) in enumerate(kept):
        images[i, :, : m.shape[0], : m.shape[1]] = img
        masks[i, : m.shape[0], : m.shape[1]] = m
    return images, masks, len(batch) - len(kept)


# --- the batch pipeline -------------------------------------------------------------------------------

class SegmentationPipeline(BatchPipeline):
    """:class:`BatchPipeline` for image/mask pairs: the same crop, flip (and scale) for both.

    Args:
        scale: ``(min, max)`` of a random batched scale (in-memory data sets), or None.
        **kwargs: as :class:`BatchPipeline` (``crop_padding``, ``hflip``, ``lighting`` act on images
            and masks alike, lighting on images only; random erasing is not supported).
    """

    def __init__(self, *args, scale: tuple[float, float] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.erase is not None:
            raise ConfigError("random erasing would erase image pixels under kept labels; it is not supported "
                              "for segmentation")
        self.scale = scale

    def batch(self, images: torch.Tensor, masks: torch.Tensor, key: tuple[int, ...] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and int64 masks on the device; with a ``key`` (training), augmented together."""
        x = images.to(self.device, non_blocking=True)
        m = masks.to(self.device, non_blocking=True)
        if key is not None and (self.scale or self.crop_padding or self.hflip or self.lighting):
            g = torch.Generator(device=self.device).manual_seed(seed_key(self.seed, *key))
            if self.scale is not None:
                x, m = self._scale(x, m, g)
            elif self.crop_padding or self.hflip:
                draws = self._crop_flip_draws(x.shape[0], g, x.device)
                x = self._crop_flip(x, *draws)
                m = self._crop_flip(m.unsqueeze(1), *draws).squeeze(1)
            if self.lighting and x.shape[1] == 3:
                x = (x.float() + lighting_shift(x.shape[0], self.lighting, g, x.device)).clamp_(0, 255)
        x = (x.float() - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        return x, m.long()

    def _scale(self, x: torch.Tensor, m: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random scale, placement and flip of the whole batch in one grid_sample (mask: nearest)."""
        b, dev = x.shape[0], x.device
        lo, hi = (math.log(s) for s in self.scale)
        a = torch.exp(-(lo + (hi - lo) * torch.rand(b, generator=g, device=dev)))  # input units per output unit
        room = (1 - a).abs()  # keeps a zoomed-in view inside the image, a zoomed-out image inside the view
        tx = (2 * torch.rand(b, generator=g, device=dev) - 1) * room
        ty = (2 * torch.rand(b, generator=g, device=dev) - 1) * room
        sx = torch.where(torch.rand(b, generator=g, device=dev) < self.hflip, -a, a) if self.hflip else a
        zero = torch.zeros_like(a)
        theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, a, ty], 1)], 1)
        grid = F.affine_grid(theta, [b, 1, *x.shape[-2:]], align_corners=False)
        x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        m = F.grid_sample(m.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return x, m.squeeze(1).to(torch.uint8)


# --- loaders for a configuration ------------------------------------------------------------------------

def _check_config(cfg: TrainConfig, kind: str) -> None:
    bad = [(cfg.mixup > 0 or cfg.cutmix > 0, "mixup/cutmix (they blend images but not masks)"),
           (cfg.auto_augment is not None, "auto_augment (its geometric operations would move images, not masks)"),
           (cfg.random_erasing > 0, "random_erasing"), (cfg.aug == "imagenet", "aug imagenet (use scale-crop-flip)"),
           (cfg.color_jitter > 0, "color_jitter")]
    for is_set, what in bad:
        if is_set:
            raise ConfigError(f"{cfg.model} is a segmentation model; {what} is not supported for segmentation")
    if kind not in SEGMENTATION_KINDS:
        raise DataError(f"{cfg.model} is a segmentation model and {kind} has no per-pixel masks; train it on "
                        "fashion-mnist-scenes or a VOC-style folder (--data voc --data-dir DIR)")


def load_segmentation_data(cfg: TrainConfig, train: bool = True) -> ImageData:
    """The training (with ``train``) and validation splits of ``cfg``'s segmentation data set."""
    kind, root = resolve_source(cfg.data, cfg.data_dir)
    _check_config(cfg, kind)
    mean, std = DATASET_STATS[kind]
    geometric = cfg.aug in ("crop-flip", "scale-crop-flip")
    if kind == "fashion-mnist-scenes":
        canvas = cfg.img_size or SCENES_CANVAS
        if canvas < 28:
            raise DataError(f"fashion-mnist-scenes: --img-size (the canvas side) must be at least 28, got {canvas}")
        # The classification scenes' splits, masks as targets: the same held-out validation scenes (--holdout)
        # and the official test scenes scored once per run.
        scenes = load_data(kind, str(root), train=train, img_size=canvas, holdout=cfg.holdout)
        val = SceneMasks(scenes.val)
        tr = SceneMasks(scenes.train) if train else None
        test = SceneMasks(scenes.test) if scenes.test is not None else None
        return ImageData(kind, tr, val, len(val.classes), 1, canvas, mean, std, True, val.classes, test,
                         scenes.holdout)
    if cfg.holdout:
        raise DataError(f"--holdout {cfg.holdout}: VOC folders keep their own validation list "
                        "(ImageSets/Segmentation/val.txt); holding training images out works for fashion-mnist-scenes")
    size = cfg.img_size or VOC_CROP
    transform = JointTransform(size, SCALE_RANGE if cfg.aug == "scale-crop-flip" else None,
                               cfg.hflip if geometric else 0.0, random_crop=geometric, seed=cfg.seed)
    val = VOCSegmentation(root, "val", None, cfg.skip_corrupt)
    tr = VOCSegmentation(root, "train", transform, cfg.skip_corrupt) if train else None
    return ImageData(kind, tr, val, val.num_classes, 3, size, mean, std, False, val.classes)
