"""The data sets: Fashion-MNIST (idx files), its cluttered scenes, CIFAR-10/100 (python pickles) and image folders.

Every data set yields ``(uint8 C x H x W tensor, int label)``; conversion to float, normalisation
and the batch-level augmentation happen later, on the training device (see ``loader.py``). The
small data sets are decoded once into one in-memory uint8 tensor, which both the batched
``__getitems__`` fast path and the data-loader workers share; ``fashion-mnist-scenes``
(``scenes.py``) composes its scenes from that tensor batch by batch.
"""

from __future__ import annotations

import gzip
import io
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

from ..errors import CorruptImageError, DataError, check_int

__all__ = ["DATASET_STATS", "DATA_KINDS", "FASHION_MNIST_DIR", "SCENES_CANVAS", "ImageData", "InMemoryImages",
           "SafeImageFolder", "check_limit", "detect_kind", "load_cifar", "load_fashion_mnist", "load_image_folder",
           "read_idx", "read_rgb", "resolve_source"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# voc: a VOC-style segmentation folder (openaff.segmentation.data), for segmentation models only
DATA_KINDS = ("fashion-mnist", "fashion-mnist-scenes", "cifar10", "cifar100", "imagefolder", "voc")
SCENES_CANVAS = 64  # default canvas side of fashion-mnist-scenes
# Per-channel mean/std of the training images, in [0, 1] units.
DATASET_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    # All 60,000 training scenes, seed 0, 64 x 64: float64 sums of pixel / 255 and its square over
    # FashionMNISTScenes(split="train").batch(range(lo, lo + 500)) for every lo (tests/test_scenes.py
    # checks a sample against these).
    "fashion-mnist-scenes": ((0.1558,), (0.1663,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
    "voc": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, as encoders trained on it expect
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
    test: Dataset | None = None  # the official test split when ``val`` is held out of the training split
    holdout: int = 0  # training images held out as ``val`` (0: ``val`` is the official test split)


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

    def subset(self, n: int | None, what: str = "limit") -> InMemoryImages:
        """The first ``n`` images (all with None).

        Args:
            n: how many images to keep.
            what: the setting ``n`` came from, for the error message.
        """
        n = check_limit(n, what)
        return self if n is None else InMemoryImages(self.images[:n], self.labels[:n], self.transform)


def check_limit(n: int | None, what: str = "limit") -> int | None:
    """``n`` if it is None or a positive image count; otherwise one :class:`ConfigError`.

    A negative ``n`` would otherwise act as a Python slice (all but the last images).

    Args:
        n: the number of images to keep.
        what: the setting it came from (``limit``, ``limit_val``, ...).
    """
    if n is None:
        return None
    return check_int(n, f"{what} must be a positive number of images")


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
        try:
            with tarfile.open(tar_path) as tar:
                for n in names:
                    try:
                        member = tar.extractfile(f"{folder}/{n}")
                    except KeyError:
                        member = None
                    if member is None:
                        raise DataError(f"{tar_path} has no {folder}/{n} (is it the {kind} python archive?)")
                    batches.append(_unpickle(member.read(), f"{tar_path}:{folder}/{n}"))
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"cannot read {kind} archive {tar_path}: {err}") from None
    data, targets = [], []
    for (where, batch) in batches:
        images, labels = _check_batch(batch, key, where)
        data.append(images)
        targets.append(labels)
    return InMemoryImages(torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32)),
                          torch.from_numpy(np.concatenate(targets)))


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); no other codec is let through.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    # The only globals of the official pickles rebuild numpy arrays: _reconstruct(ndarray, shape, dtype).
    # numpy 2 names its module numpy._core; batches re-saved by Python 3 may hold protocol-5 arrays
    # (_frombuffer) or protocol-2 bytes (_codecs.encode). The functions come from numpy's own
    # reductions, so that both spellings map to those of the installed numpy.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_bytes}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, numbers and numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, a class) is refused before it is
    imported or called, so a crafted batch file cannot run code.
    """

    allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return found


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _unpickle(blob: bytes, where: object) -> tuple[object, object]:
    try:
        return where, _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except _RefusedGlobal as err:
        raise DataError(f"CIFAR batch {where} refused: it references the Python object {err}, which the CIFAR "
                        "format does not contain (only arrays, lists and strings are loaded)") from None
    except Exception as err:  # noqa: BLE001  (any unpickling failure means a damaged file)
        raise DataError(f"cannot read CIFAR batch {where}: {type(err).__name__}: {err}") from None


def _check_batch(batch: object, key: bytes, where: object) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray) or key not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where} is not a CIFAR batch: expected a dict with b'data' (an array) and "
                        f"{key!r}, found {keys}")
    images = batch[b"data"]
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR batch {where}: data must be N x 3072 uint8 (3 x 32 x 32 images), "
                        f"found {images.shape} {images.dtype}")
    try:
        labels = np.asarray(batch[key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(f"CIFAR batch {where}: {key!r} is not a list of class numbers: {err}") from None
    if labels.shape != (len(images),):
        raise DataError(f"CIFAR batch {where}: {len(images)} images but {labels.size} labels in {key!r}")
    return images, labels


def read_rgb(path: str | Path, skip_corrupt: bool = False) -> Image.Image | None:
    """The image at ``path`` as RGB; an unreadable file is a :class:`CorruptImageError` naming it, or, with
    ``skip_corrupt``, a warning and None (the loader's collate drops it and counts it)."""
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        if skip_corrupt:
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
            return None
        raise CorruptImageError(f"cannot read image {path}: {err} (use --skip-corrupt to skip such files)") from None


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
        img = read_rgb(path, self.skip_corrupt)
        if img is None:
            return None
        t = self.seeded_transform
        img = t(img, index) if isinstance(t, SeededTransform) else t(img)
        return img, target

    def subset(self, n: int | None, what: str = "limit") -> SafeImageFolder:
        """A seeded random subset of ``n`` images (all with None), in file order.

        Args:
            n: how many images to keep.
            what: the setting ``n`` came from, for the error message.
        """
        n = check_limit(n, what)
        if n is not None:
            # A seeded random subset: the first N files of an image folder are all of class 0.
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(0))[:n].sort().values
            self.samples = [self.samples[i] for i in order.tolist()]
            self.targets = [s[1] for s in self.samples]
        return self


def _check_classes(folder: SafeImageFolder, root: Path) -> SafeImageFolder:
    # One class makes every prediction right: "100 %" that means nothing.
    if len(folder.classes) < 2:
        raise DataError(f"image folder {root} has only one class folder ({folder.classes[0]}): a classifier needs "
                        "at least two (one sub-folder of images per class)")
    return folder


def _class_diff(train: SafeImageFolder, val: SafeImageFolder, show: int = 5) -> str:
    def names(items: list[str]) -> str:
        return ", ".join(items[:show]) + (f" and {len(items) - show} more" if len(items) > show else "")

    only_train = [c for c in train.classes if c not in set(val.classes)]
    only_val = [c for c in val.classes if c not in set(train.classes)]
    parts = [f"only in train/: {names(only_train)}" if only_train else "",
             f"only in val/: {names(only_val)}" if only_val else ""]
    return "; ".join(p for p in parts if p) or "the same names in a different order"


def detect_kind(path: Path) -> str:
    """Guess the kind of a data directory (or CIFAR archive) from the files in it."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else {path.name}
    if {"JPEGImages", "SegmentationClass"} <= names or "VOC2012" in names or "VOCdevkit" in names:
        return "voc"
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
            if data not in ("fashion-mnist", "fashion-mnist-scenes"):
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


def load_image_folder(root: Path, train: bool, train_transform: Callable | None, eval_transform: Callable | None,
                      skip_corrupt: bool) -> tuple[SafeImageFolder | None, SafeImageFolder]:
    """``(train, val)`` of an image folder: ``train/`` and ``val/`` of class folders (``val`` alone may be the
    folder itself), with the same classes; ``train`` None unless asked for."""
    val_root = root / "val" if (root / "val").is_dir() else root
    if train and not (root / "train").is_dir():
        raise DataError(f"image folder {root} has no train/ folder (expected train/ and val/ of class folders)")
    val = _check_classes(SafeImageFolder(val_root, eval_transform, skip_corrupt), val_root)
    tr = _check_classes(SafeImageFolder(root / "train", train_transform, skip_corrupt), root / "train") \
        if train else None
    if tr is not None and tr.classes != val.classes:
        raise DataError(f"train/ and val/ in {root} have different class folders: {_class_diff(tr, val)}")
    return tr, val
