"""Data sets, samplers and the batch pipeline of openaff.training (no downloads, tiny data)."""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from _cifar_utils import Reduce, official_cifar10
from _train_utils import write_cifar, write_fashion_mnist, write_image_folder
from PIL import Image

from openaff.data.datasets import FASHION_MNIST_DIR, load_cifar, load_fashion_mnist, read_idx
from openaff.data.loader import BatchPipeline, EvalSampler, TrainSampler, lighting_shift, seed_key
from openaff.data.splits import load_data
from openaff.errors import ConfigError, CorruptImageError, DataError
from openaff.training import make_config
from openaff.training.data import build_data
from openaff.training.distributed import DistInfo


def test_idx_reader_roundtrip(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=20, n_test=10)
    images = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    ds = load_fashion_mnist(tmp_path, "test")
    assert ds.images.shape == (10, 1, 28, 28) and ds.labels.dtype == torch.int64
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package() -> None:
    data = load_data("fashion-mnist", None, train=False)
    assert (len(data.val), data.num_classes, data.in_chans, data.img_size) == (10_000, 10, 1, 28)
    assert data.val.images.shape == (10_000, 1, 28, 28)
    assert sorted(torch.bincount(data.val.labels).tolist()) == [1000] * 10


@pytest.mark.parametrize("archive", [False, True])
def test_cifar_pickles(tmp_path: Path, archive: bool) -> None:
    src = write_cifar(tmp_path / "cifar-100-python", "cifar100")
    root = tmp_path
    if archive:
        with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(src, arcname="cifar-100-python")
        for p in src.iterdir():
            p.unlink()
        src.rmdir()
    fine = load_data(str(root), None, cifar100_labels="fine")
    coarse = load_data("cifar100", str(root), cifar100_labels="coarse")
    assert (fine.kind, fine.num_classes, coarse.num_classes) == ("cifar100", 100, 20)
    assert fine.train.images.shape == (64, 3, 32, 32) and len(fine.val) == 32
    assert torch.equal(coarse.train.labels, fine.train.labels // 5)  # as written by the helper
    c10 = load_cifar(write_cifar(tmp_path / "c10", "cifar10"), "cifar10", "train")
    assert c10.images.shape[0] == 60  # 5 batches of 12


def test_image_folder_and_corrupt_image(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=2)
    bad = root / "val" / "class_1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = make_config(data=str(root), batch_size=4, workers=0, img_size=32, aug="imagenet", color_jitter=0.4)
    bundle = build_data(cfg, DistInfo())
    assert (bundle.kind, bundle.num_classes, bundle.in_chans, bundle.train_size) == ("imagefolder", 3, 3, 6)
    x, y, skipped = next(iter(bundle.train_loader(0)))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and skipped == 0
    with pytest.raises(CorruptImageError, match="broken.png"):
        list(bundle.val_loader)
    skipping = build_data(make_config(asdict(cfg), skip_corrupt=True), DistInfo())
    with pytest.warns(UserWarning, match="broken.png"):
        batches = list(skipping.val_loader)
    assert sum(b[2] for b in batches) == 1 and sum(len(b[1]) for b in batches) == 6


def test_missing_and_empty_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "nope"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_data(str(tmp_path / "empty"), None)
    for split in ("train", "val"):
        (tmp_path / "noimg" / split / "class_0").mkdir(parents=True)
    with pytest.raises(DataError, match="noimg"):
        load_data(str(tmp_path / "noimg"), None)


def test_train_sampler_shards_and_resumes() -> None:
    single = TrainSampler(100, 8, seed=3)
    ranks = [TrainSampler(100, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(1)
    full = list(single)
    assert len(full) == 12 and len({i for b in full for i in b}) == 96
    # Two ranks with half the batch see together exactly the single process's batches.
    for k, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert sorted(a + b) == sorted(full[k])
    single.set_epoch(1, start=5)
    assert list(single) == full[5:]
    single.set_epoch(2)
    assert list(single) != full  # a new order every epoch
    shards = [list(EvalSampler(10, 3, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(10))


def test_batch_pipeline_is_seeded_by_key() -> None:
    images = torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8)
    pipe = BatchPipeline(torch.device("cpu"), (0.5,), (0.25,), crop_padding=2, hflip=0.5, seed=1)
    a, b, c = pipe(images, key=(0, 3, 0)), pipe(images, key=(0, 3, 0)), pipe(images, key=(0, 4, 0))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.float32
    plain = pipe(images)
    assert torch.allclose(plain, (images.float() / 255 - 0.5) / 0.25, atol=1e-5)
    # A crop of a padded image: every output row/column is a shifted input row/column or padding.
    assert not torch.equal(a, plain)


def test_pca_lighting_shifts_each_image_by_one_rgb_offset() -> None:
    images = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)
    pipe = BatchPipeline(torch.device("cpu"), (0.0, 0.0, 0.0), (1 / 255,) * 3, lighting=0.1, seed=1)
    shift = pipe(images, key=(0, 2, 0)) - 128  # mean 0, std 1/255: the output is on the pixel scale
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-4)  # one offset per image, channel
    g = torch.Generator().manual_seed(seed_key(1, 0, 2, 0))
    expected = lighting_shift(4, 0.1, g, torch.device("cpu"))
    assert torch.allclose(shift[:, :, :1, :1], expected, atol=1e-3) and expected.abs().max() > 0.5
    grey = BatchPipeline(torch.device("cpu"), (0.0,), (1 / 255,), lighting=0.1, seed=1)
    assert torch.allclose(grey(images[:, :1], key=(0, 2, 0)), torch.full((4, 1, 8, 8), 128.0))  # RGB only


def test_auto_augment_is_reproducible(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=64, n_test=16)
    cfg = make_config(data="fashion-mnist", data_dir=str(tmp_path), batch_size=16, auto_augment="rand-m9-mstd0.5")
    bundle = build_data(cfg, DistInfo())
    first = [b[0] for b in bundle.train_loader(0)]
    again = [b[0] for b in bundle.train_loader(0, start=2)]
    assert torch.equal(first[2], again[0]) and first[0].shape == (16, 1, 28, 28)
    assert not torch.equal(first[0], bundle.data.train.images[:16])



# --- issue 10: one-class folders, class-name mismatch, negative limits, the CIFAR unpickler ------------------


def test_image_folder_with_one_class_is_refused(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "one", classes=1, per_class=3)
    with pytest.raises(DataError, match=r"only one class folder \(class_0\)") as err:
        load_data(str(root), None)
    assert "\n" not in str(err.value) and str(root) in str(err.value)
    with pytest.raises(DataError, match="only one class"):  # evaluation on it would be as meaningless
        load_data("imagefolder", str(root / "val"), train=False)


def test_class_folder_mismatch_names_the_classes(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for split, names in (("train", ("cat", "dog")), ("val", ("cat", "cow"))):
        for name in names:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "a.png")
    with pytest.raises(DataError) as err:
        load_data(str(root), None)
    msg = str(err.value)
    assert "dog" in msg and "cow" in msg and "2 vs 2" not in msg, msg


def test_negative_limits_are_refused(tmp_path: Path) -> None:
    ds = load_fashion_mnist(write_fashion_mnist(tmp_path / "fm", n_train=8, n_test=8), "test")
    assert len(ds.subset(3)) == 3 and len(ds.subset(None)) == 8
    folder = load_data(str(write_image_folder(tmp_path / "imgs", classes=2, per_class=2)), None).val
    for subset in (ds.subset, folder.subset):
        for bad in (-1, 0):
            with pytest.raises(ConfigError, match=f"got {bad}"):
                subset(bad)
    assert len(folder.subset(3)) == 3


def test_cifar_official_layout_loads(tmp_path: Path) -> None:
    # Python 2 protocol-2 pickles (BINSTRING keys, numpy.core / numpy._core array globals), read as bytes.
    for legacy in (True, False):
        root = official_cifar10(tmp_path / str(legacy), n_test=5, n_train=3, legacy_names=legacy)
        data = load_data(str(root), None)
        assert (data.kind, len(data.train), len(data.val)) == ("cifar10", 15, 5)
        raw = pickle.loads((root / "cifar-10-batches-py" / "test_batch").read_bytes(), encoding="bytes")  # noqa: S301
        assert torch.equal(data.val.images, torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32)))
        assert data.val.labels.tolist() == raw[b"labels"]


@pytest.mark.parametrize("archive", [False, True])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "subprocess.call"])
def test_cifar_malicious_pickle_is_refused(tmp_path: Path, archive: bool, payload: str) -> None:
    import builtins
    import os
    import subprocess

    marker = tmp_path / "pwned"
    shell = f"touch {marker}"
    evil = {"os.system": Reduce(os.system, shell), "subprocess.call": Reduce(subprocess.call, ["touch", str(marker)]),
            "builtins.exec": Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()")}[payload]
    root = official_cifar10(tmp_path / "c", n_test=2, n_train=1)
    test_batch = root / "cifar-10-batches-py" / "test_batch"
    test_batch.write_bytes(pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2))
    if archive:
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        root = tmp_path / "cifar-10-python.tar.gz"
    with pytest.raises(DataError) as err:
        load_cifar(root, "cifar10", "test")
    msg = str(err.value)
    assert "\n" not in msg and "test_batch" in msg and "refused" in msg, msg
    assert payload.split(".")[-1] in msg, msg  # names what the file tried to call
    assert not marker.exists()


def test_cifar_damaged_batches(tmp_path: Path) -> None:
    root = official_cifar10(tmp_path, n_test=2, n_train=1)
    test_batch = root / "cifar-10-batches-py" / "test_batch"
    for blob, what in ((b"\x80\x02garbage", "cannot read"), (pickle.dumps([1, 2]), "not a CIFAR batch"),
                       (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "3072"),
                       (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "labels")):
        test_batch.write_bytes(blob)
        with pytest.raises(DataError, match=what):
            load_cifar(root, "cifar10", "test")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:  # an archive without the test batch
        tar.add(root / "cifar-10-batches-py" / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar(tmp_path / "cifar-10-python.tar.gz", "cifar10", "test")


# --- fashion-mnist-scenes in the batch pipeline (the data set itself: test_scenes.py) --------------------------

def test_augment_masks_moves_masks_with_their_images() -> None:
    """Crop and flip of a batch move its masks the same way; boxes follow; padding is background."""
    from openaff.data.scenes import boxes_from_masks

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(32, 20, 20, dtype=torch.uint8)
    for k in range(32):
        y, x, h, w = torch.randint(0, 14, (4,), generator=g).tolist()
        masks[k, y: y + h // 2 + 1, x: x + w // 2 + 1] = 1 + k % 10
    images = (masks * 20).unsqueeze(1)
    # mean 0 and std 1/255: the normalised output is the augmented image itself
    pipe = BatchPipeline(torch.device("cpu"), (0.0,), (1 / 255,), crop_padding=3, hflip=0.5, seed=4)
    moved, boxes = pipe.augment_masks(masks, key=(1, 2, 0))
    shown = pipe(images, key=(1, 2, 0))[:, 0]
    assert torch.allclose(shown, moved.float() * 20, atol=1e-3) and moved.dtype == torch.uint8
    assert not torch.equal(moved, masks) and torch.equal(boxes, boxes_from_masks(moved))
    assert set(torch.unique(moved).tolist()) <= set(torch.unique(masks).tolist())  # moved, never resampled
    flipped = BatchPipeline(torch.device("cpu"), (0.0,), (1.0,), hflip=1.0).augment_masks(masks, key=(0,))[0]
    assert torch.equal(flipped, masks.flip(2))
    plain, plain_boxes = BatchPipeline(torch.device("cpu"), (0.0,), (1.0,)).augment_masks(masks, key=(0,))
    assert torch.equal(plain, masks) and torch.equal(plain_boxes, boxes_from_masks(masks))


def test_scenes_kind_defaults_to_the_debian_package(tmp_path: Path) -> None:
    from openaff.data.datasets import DATA_KINDS, resolve_source

    assert "fashion-mnist-scenes" in DATA_KINDS
    if Path(FASHION_MNIST_DIR).is_dir():  # no --data-dir needed, as for fashion-mnist
        assert resolve_source("fashion-mnist-scenes", None) == ("fashion-mnist-scenes", Path(FASHION_MNIST_DIR))
    write_fashion_mnist(tmp_path, n_train=64, n_test=32)  # the scenes of any Fashion-MNIST-format folder
    data = load_data("fashion-mnist-scenes", str(tmp_path), img_size=32)
    assert (len(data.train), len(data.val), data.img_size) == (64, 32, 32)
    assert data.train.__getitems__([0, 1])[0].shape == (2, 1, 32, 32)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("not Fashion-MNIST")
    with pytest.raises(DataError, match="Fashion-MNIST file t10k-images-idx3-ubyte.*not found in"):
        load_data("fashion-mnist-scenes", str(tmp_path / "other"))
