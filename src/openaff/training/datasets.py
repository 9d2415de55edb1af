"""The data sets: Fashion-MNIST (idx files), CIFAR-10/100 (python pickles) and image folders.

Every data set yields ``(uint8 C x H x W tensor, int label)``; conversion to float, normalisation
and the batch-level augmentation happen later, on the training device (see ``loader.py``). The
small data sets are decoded once into one in-memory uint8 tensor, which both the batched
``__getitems__`` fast path and the data-loader workers share.
"""

from __future__ import annotations

import gzip
import pickle
import random
import tarfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from .errors import CorruptImageError, DataError

__all__ = ["DATASET_STATS", "DATA_KINDS", "FASHION_MNIST_DIR", "ImageData", "InMemoryImages", "SafeImageFolder",
           "detect_kind", "load_cifar", "load_data", "load_fashion_mnist", "read_idx"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATA_KINDS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
# Per-channel mean/std of the training images, in [0, 1] units.
DATASET_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
}


@dataclass
class ImageData:
    """A data set's splits and the facts the model and the batch pipeline need."""

    kind: str
    train: Dataset | None
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool
    classes: list[str] = field(default_factory=list)


class SeededTransform:
    """Apply a random per-image transform with RNGs seeded from ``(seed, epoch, index)``.

    The augmentation of an image then depends neither on the worker that loads it nor on what
    was loaded before, so a resumed epoch sees exactly the images of the interrupted one. The
    global RNG states of the calling process are restored afterwards.
    """

    def __init__(self, transform: Callable, seed: int) -> None:
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __call__(self, img, index: int):
        key = (self.seed * 1_000_003 + self.epoch) * 100_000_007 + index
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            np.random.seed(key % 2**32)
            random.seed(key)
            try:
                return self.transform(img)
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


class InMemoryImages(Dataset):
    """Decoded images in one ``N x C x H x W`` uint8 tensor.

    Args:
        images: the images.
        labels: int64 labels, one per image.
        transform: optional per-image transform of a PIL image (e.g. AutoAugment) returning a
            uint8 tensor; without one, batches are sliced straight from the tensor.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: SeededTransform | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.transform is not None:
            mode = "L" if img.shape[0] == 1 else "RGB"
            img = self.transform(Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy(), mode), i)
        return img, int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]):
        # Batched indexing: one gather instead of len(indices) Python calls (see loader.collate).
        if self.transform is not None:
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx]

    def subset(self, n: int | None) -> InMemoryImages:
        return self if n is None else InMemoryImages(self.images[:n], self.labels[:n], self.transform)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format, optionally gzipped) into an array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in dtypes:
        raise DataError(f"{path} is not an idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root} "
                    "(install the Debian package dataset-fashion-mnist or pass --data-dir)")


def load_fashion_mnist(root: str | Path, split: str) -> InMemoryImages:
    """The ``train`` (60k) or ``test`` (10k) split from the four idx files in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels) or images.ndim != 3:
        raise DataError(f"Fashion-MNIST {split} files in {root} disagree: {images.shape} images, {len(labels)} labels")
    return InMemoryImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


_CIFAR = {  # kind -> (folder in the archive, train files, test files, archive name)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "cifar-100-python.tar.gz"),
}


def load_cifar(root: str | Path, kind: str, split: str, labels: str = "fine") -> InMemoryImages:
    """CIFAR-10/100 from the python pickles: extracted in ``root`` (or its archive folder) or the .tar.gz.

    Args:
        root: directory with the batches, their ``cifar-*-py*`` folder, or the archive.
        kind: ``cifar10`` or ``cifar100``.
        split: ``train`` or ``test``.
        labels: CIFAR-100 ``fine`` (100 classes) or ``coarse`` (20 superclasses, the paper's setting).
    """
    folder, train_files, test_files, archive = _CIFAR[kind]
    names = train_files if split == "train" else test_files
    root = Path(root)
    key = b"labels" if kind == "cifar10" else (b"fine_labels" if labels == "fine" else b"coarse_labels")
    batches = []
    for base in (root, root / folder):
        if all((base / n).is_file() for n in names):
            batches = [_unpickle((base / n).read_bytes(), base / n) for n in names]
            break
    else:
        tar_path = root / archive if root.is_dir() else root
        if not tar_path.is_file():
            raise DataError(f"no {kind} python batches ({', '.join(names)}) or {archive} in {root}")
        with tarfile.open(tar_path) as tar:
            for n in names:
                member = tar.extractfile(f"{folder}/{n}")
                batches.append(_unpickle(member.read(), f"{tar_path}:{n}"))
    data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    targets = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
    return InMemoryImages(torch.from_numpy(data), torch.from_numpy(targets))


def _unpickle(blob: bytes, where: object) -> dict:
    try:
        return pickle.loads(blob, encoding="bytes")  # noqa: S301  (the official archive format)
    except Exception as err:  # noqa: BLE001  (any unpickling failure means a damaged file)
        raise DataError(f"cannot read CIFAR batch {where}: {err}") from None


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder whose decoding errors name the file.

    With ``skip_corrupt`` an unreadable image yields None (dropped and counted by the collate
    function) instead of raising :class:`CorruptImageError`.
    """

    def __init__(self, root: str | Path, transform: SeededTransform | Callable, skip_corrupt: bool = False) -> None:
        try:
            super().__init__(str(root))
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"image folder {root}: {err}") from None
        self.seeded_transform = transform
        self.skip_corrupt = skip_corrupt

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
            if self.skip_corrupt:
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=1)
                return None
            raise CorruptImageError(f"cannot read image {path}: {err} (use --skip-corrupt to skip such files)") \
                from None
        t = self.seeded_transform
        img = t(img, index) if isinstance(t, SeededTransform) else t(img)
        return img, target

    def subset(self, n: int | None) -> SafeImageFolder:
        if n is not None:
            # A seeded random subset: the first N files of an image folder are all of class 0.
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(0))[:n].sort().values
            self.samples = [self.samples[i] for i in order.tolist()]
            self.targets = [s[1] for s in self.samples]
        return self


def detect_kind(path: Path) -> str:
    """Guess the kind of a data directory (or CIFAR archive) from the files in it."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else {path.name}
    if names & {"cifar-100-python", "cifar-100-python.tar.gz"} or {"train", "test", "meta"} <= names:
        return "cifar100"
    if names & {"cifar-10-batches-py", "cifar-10-python.tar.gz", "data_batch_1", "test_batch"}:
        return "cifar10"
    if any(n.startswith(("train-images-idx3", "t10k-images-idx3")) for n in names):
        return "fashion-mnist"
    if path.is_dir() and all(p.is_dir() for p in path.iterdir()):  # train/ + val/, or class folders
        return "imagefolder"
    raise DataError(f"cannot tell what data set {path} holds: expected train/ and val/ class folders, "
                    "CIFAR python batches, or Fashion-MNIST idx files")


def resolve_source(data: str, data_dir: str | None) -> tuple[str, Path]:
    """``(kind, directory)`` from ``--data`` (a kind or a directory) and ``--data-dir``."""
    if data in DATA_KINDS:
        if data_dir is None:
            if data != "fashion-mnist":
                raise DataError(f"--data {data} needs --data-dir DIR")
            data_dir = FASHION_MNIST_DIR
        root = Path(data_dir)
        if not root.exists():
            raise DataError(f"data directory {root} does not exist")
        if root.is_dir() and not any(root.iterdir()):
            raise DataError(f"data directory {root} is empty")
        return data, root
    root = Path(data_dir or data)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist (or --data is not one of {', '.join(DATA_KINDS)})")
    if root.is_dir() and not any(root.iterdir()):
        raise DataError(f"data directory {root} is empty")
    return detect_kind(root), root


def load_data(data: str, data_dir: str | None, *, train: bool = True, cifar100_labels: str = "fine",
              img_size: int | None = None, train_transform: Callable | None = None,
              eval_transform: Callable | None = None, skip_corrupt: bool = False) -> ImageData:
    """Load a data set's splits (the training split only with ``train``).

    Args:
        data: a kind (``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder``) or a directory.
        data_dir: the directory, when ``data`` is a kind.
        train: also load the training split.
        cifar100_labels: ``fine`` or ``coarse``.
        img_size: input size for image folders (default 224).
        train_transform: per-image training transform (image folders; optional for the others).
        eval_transform: per-image evaluation transform (image folders).
        skip_corrupt: skip unreadable images of image folders instead of stopping.
    """
    kind, root = resolve_source(data, data_dir)
    mean, std = DATASET_STATS[kind]
    if kind == "imagefolder":
        val_root = root / "val" if (root / "val").is_dir() else root
        if train and not (root / "train").is_dir():
            raise DataError(f"image folder {root} has no train/ folder (expected train/ and val/ of class folders)")
        val = SafeImageFolder(val_root, eval_transform, skip_corrupt)
        tr = SafeImageFolder(root / "train", train_transform, skip_corrupt) if train else None
        if tr is not None and tr.classes != val.classes:
            raise DataError(f"train/ and val/ in {root} have different class folders "
                            f"({len(tr.classes)} vs {len(val.classes)})")
        return ImageData(kind, tr, val, len(val.classes), 3, img_size or 224, mean, std, False, val.classes)
    if kind == "fashion-mnist":
        val, tr = load_fashion_mnist(root, "test"), load_fashion_mnist(root, "train") if train else None
        num_classes, in_chans, size = 10, 1, 28
    else:
        val = load_cifar(root, kind, "test", cifar100_labels)
        tr = load_cifar(root, kind, "train", cifar100_labels) if train else None
        num_classes = 10 if kind == "cifar10" else (100 if cifar100_labels == "fine" else 20)
        in_chans, size = 3, 32
    if tr is not None and train_transform is not None:
        tr.transform = train_transform
    if img_size not in (None, size):
        raise DataError(f"{kind} images are {size}x{size}; --img-size {img_size} is not supported for it")
    return ImageData(kind, tr, val, num_classes, in_chans, size, mean, std, True)
