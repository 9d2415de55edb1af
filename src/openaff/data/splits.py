"""The splits of a named data set: training, validation (held out of training, or the data set's own) and test.

:func:`load_data` turns ``--data``/``--data-dir`` into an :class:`~openaff.data.datasets.ImageData`
with the readers of :mod:`.datasets` and the scenes of :mod:`.scenes`; the held-out split
(:func:`resolve_holdout`, :func:`holdout_indices`) is the same on every machine and run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import DataError, check_int
from .datasets import (
    DATASET_STATS,
    SCENES_CANVAS,
    ImageData,
    InMemoryImages,
    load_cifar,
    load_fashion_mnist,
    load_image_folder,
    resolve_source,
)
from .scenes import FASHION_MNIST_CLASSES, FashionMNISTScenes

__all__ = ["HOLDOUT", "HOLDOUT_KINDS", "HOLDOUT_MIN_TRAIN", "HOLDOUT_SEED", "holdout_indices", "load_data",
           "resolve_holdout"]


HOLDOUT = 5000  # training images held out for validation by default: CIFAR 45k/5k, Fashion-MNIST 55k/5k
HOLDOUT_MIN_TRAIN = 20_000  # below this (subsets, test fixtures) the default holds nothing out
HOLDOUT_SEED = 0  # the held-out images are the last ``holdout`` of a permutation drawn with this seed
HOLDOUT_KINDS = ("fashion-mnist", "fashion-mnist-scenes", "cifar10", "cifar100")


def resolve_holdout(holdout: int | None, kind: str, n_train: int) -> int:
    """The number of training images held out for validation (``None``: the default of the data set).

    The default is :data:`HOLDOUT` for the in-memory data sets with at least :data:`HOLDOUT_MIN_TRAIN`
    training images (all four in full), else 0; image folders and VOC keep their own ``val/``.
    """
    if holdout is None:
        return HOLDOUT if kind in HOLDOUT_KINDS and n_train >= HOLDOUT_MIN_TRAIN else 0
    if holdout and kind not in HOLDOUT_KINDS:
        raise DataError(f"--holdout {holdout}: {kind} data keep their own validation folder; holding training "
                        f"images out works for {', '.join(HOLDOUT_KINDS)}")
    if holdout >= n_train:
        raise DataError(f"--holdout {holdout} leaves no training images: the training split holds {n_train}")
    return holdout


def holdout_indices(n: int, holdout: int, seed: int = HOLDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept for training, held out)`` indices of ``n`` training images, each sorted: the held-out ones are the
    last ``holdout`` of a permutation seeded with ``seed``, so the split is the same on every machine and run."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n - holdout].sort().values, order[n - holdout:].sort().values


def _take(items: InMemoryImages, idx: torch.Tensor) -> InMemoryImages:
    return InMemoryImages(items.images[idx], items.labels[idx], items.transform)


def load_data(data: str, data_dir: str | None, *, train: bool = True, cifar100_labels: str = "fine",
              img_size: int | None = None, train_transform: Callable | None = None,
              eval_transform: Callable | None = None, skip_corrupt: bool = False,
              holdout: int | None = None) -> ImageData:
    """Load a data set's splits (the training split only with ``train``).

    With ``train`` and a holdout (:func:`resolve_holdout`), ``val`` is that many training images kept
    out of training (model selection) and ``test`` the official test split (scored once per run);
    otherwise ``val`` is the official test split and ``test`` None.

    Args:
        data: a kind (``fashion-mnist``, ``fashion-mnist-scenes``, ``cifar10``, ``cifar100``, ``imagefolder``)
            or a directory.
        data_dir: the directory, when ``data`` is a kind.
        train: also load the training split.
        cifar100_labels: ``fine`` or ``coarse``.
        img_size: input size for image folders (default 224); the canvas side of ``fashion-mnist-scenes``
            (default 64).
        train_transform: per-image training transform (image folders; optional for the others).
        eval_transform: per-image evaluation transform (image folders).
        skip_corrupt: skip unreadable images of image folders instead of stopping.
        holdout: training images held out for validation (None: the data set's default; 0: none, the
            authors' protocol of choosing the epoch on the test split).
    """
    kind, root = resolve_source(data, data_dir)
    mean, std = DATASET_STATS[kind]
    if kind == "voc":
        raise DataError(f"{root} is a VOC-style segmentation folder (per-pixel masks, no image classes): train a "
                        "segmentation model on it, e.g. --model aff_fpn (openaff.segmentation)")
    if kind == "imagefolder":
        tr, val = load_image_folder(root, train, train_transform, eval_transform, skip_corrupt)
        return ImageData(kind, tr, val, len(val.classes), 3, img_size or 224, mean, std, False, val.classes)
    if kind == "fashion-mnist-scenes":
        canvas = SCENES_CANVAS if img_size is None else img_size
        check_int(canvas, "fashion-mnist-scenes: --img-size (the canvas side) must be at least 28 (an item's side)",
                  lo=28, error=DataError)
        val = FashionMNISTScenes(root, "val", canvas)
        tr = FashionMNISTScenes(root, "train", canvas) if train else None
        test, held = None, resolve_holdout(holdout, kind, len(tr)) if train else 0
        if held:  # scenes of their own: held-out items are never fragments of training scenes, nor the reverse
            keep, out = holdout_indices(len(tr), held)
            test = val
            val = FashionMNISTScenes(root, "holdout", canvas, items=_take(tr.items, out))
            tr = FashionMNISTScenes(root, "train", canvas, items=_take(tr.items, keep))
        if tr is not None and train_transform is not None:
            tr.transform = train_transform
        return ImageData(kind, tr, val, 10, 1, canvas, mean, std, True, list(FASHION_MNIST_CLASSES), test, held)
    if kind == "fashion-mnist":
        val, tr = load_fashion_mnist(root, "test"), load_fashion_mnist(root, "train") if train else None
        num_classes, in_chans, size = 10, 1, 28
    else:
        val = load_cifar(root, kind, "test", cifar100_labels)
        tr = load_cifar(root, kind, "train", cifar100_labels) if train else None
        num_classes = 10 if kind == "cifar10" else (100 if cifar100_labels == "fine" else 20)
        in_chans, size = 3, 32
    test, held = None, resolve_holdout(holdout, kind, len(tr)) if train else 0
    if held:
        keep, out = holdout_indices(len(tr), held)
        test, val, tr = val, _take(tr, out), _take(tr, keep)
    if tr is not None and train_transform is not None:
        tr.transform = train_transform
    if img_size not in (None, size):
        raise DataError(f"{kind} images are {size}x{size}; --img-size {img_size} is not supported for it")
    return ImageData(kind, tr, val, num_classes, in_chans, size, mean, std, True, [], test, held)
