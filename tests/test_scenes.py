"""fashion-mnist-scenes: determinism, labels, boxes and masks against the pasted item, batching, loaders, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openaff.cli import main
from openaff.data.datasets import DATASET_STATS, FASHION_MNIST_DIR, load_fashion_mnist
from openaff.data.loader import EvalSampler, make_loader
from openaff.data.scenes import FASHION_MNIST_CLASSES, FashionMNISTScenes, boxes_from_masks, save_sample_grid
from openaff.data.splits import load_data
from openaff.errors import ConfigError, DataError

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def items():
    return load_fashion_mnist(FASHION_MNIST_DIR, "test")


@pytest.fixture(scope="module")
def val(items) -> FashionMNISTScenes:
    return FashionMNISTScenes(FASHION_MNIST_DIR, "val", items=items)


@pytest.fixture(scope="module")
def batch(val: FashionMNISTScenes) -> dict:
    return val.batch(range(512))


def _tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_same_seed_and_index_give_the_same_scene(val: FashionMNISTScenes, items) -> None:
    again = FashionMNISTScenes(FASHION_MNIST_DIR, "val")  # a fresh instance, reading the files itself
    other = FashionMNISTScenes(FASHION_MNIST_DIR, "val", seed=1, items=items)
    for i in (0, 7, 9999):
        a, b, c = val.sample(i), again.sample(i), other.sample(i)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["box"], b["box"]) and a["label"] == b["label"]
        assert not torch.equal(a["image"], c["image"]) and a["label"] == c["label"]  # the same item, elsewhere
    different = sum(not torch.equal(val.sample(i)["box"], other.sample(i)["box"]) for i in range(20))
    assert different >= 18


def test_label_is_the_fashion_mnist_label(batch: dict, items) -> None:
    assert torch.equal(batch["label"], items.labels[:512])
    assert batch["label"].dtype == torch.int64


def test_canvas_shape_and_dtype(val: FashionMNISTScenes, items) -> None:
    s = val.sample(3)
    assert s["image"].shape == (1, 64, 64) and s["image"].dtype == torch.uint8
    assert s["mask"].shape == (64, 64) and s["mask"].dtype == torch.uint8
    assert s["box"].shape == (4,) and s["box"].dtype == torch.int64 and isinstance(s["label"], int)
    img, label = val[3]
    assert torch.equal(img, s["image"]) and label == s["label"]
    small = FashionMNISTScenes(None, "val", canvas=40, items=items)
    assert small.sides == (14, 28)  # the default largest side scales with the canvas (44 at 64)
    b = small.batch(range(64))
    assert b["image"].shape == (64, 1, 40, 40) and b["mask"].shape == (64, 40, 40)
    assert int(b["box"][:, 2:].max()) <= 40 and int(b["side"].max()) <= 28


def test_box_is_tight_around_the_mask_and_mask_holds_the_label(batch: dict) -> None:
    for k in range(len(batch["label"])):
        mask, label = batch["mask"][k].numpy(), int(batch["label"][k])
        assert set(np.unique(mask).tolist()) == {0, label + 1}
        assert batch["box"][k].tolist() == _tight_box(mask)
    assert torch.equal(boxes_from_masks(batch["mask"]), batch["box"])
    assert boxes_from_masks(torch.zeros(1, 8, 8, dtype=torch.uint8)).tolist() == [[0, 0, 0, 0]]


def test_mask_and_box_match_the_pasted_item(items) -> None:
    """Without clutter the mask is the resized item's pixels >= 32 at the box, and the image shows the item."""
    clean = FashionMNISTScenes(None, "val", clutter=(0, 0), items=items)
    for i in range(40):
        s = clean.sample(i)
        side = s["side"]
        item = F.interpolate(items.images[i: i + 1].float(), size=(side, side), mode="bilinear", antialias=True)[0, 0]
        fg = (item >= 32).numpy()
        fy0, fx0 = _tight_box(fg)[1], _tight_box(fg)[0]
        x0, y0, x1, y1 = s["box"].tolist()
        ty, tx = y0 - fy0, x0 - fx0  # where the item's square was pasted
        assert 0 <= ty <= 64 - side and 0 <= tx <= 64 - side  # fully inside the canvas
        expected = np.zeros((64, 64), dtype=bool)
        expected[ty: ty + side, tx: tx + side] = fg
        assert np.array_equal(s["mask"].numpy() > 0, expected)
        shown = s["image"][0, ty: ty + side, tx: tx + side].float().flatten()
        corr = torch.corrcoef(torch.stack([shown, item.flatten()]))[0, 1]
        assert corr > 0.8, (i, float(corr))  # pixel noise and the soft edges over the grey keep it below 1


def test_clutter_hides_at_most_a_quarter_of_the_item(val: FashionMNISTScenes, batch: dict, items) -> None:
    # The scene draws of the item come before those of the fragments: the same scene without clutter
    # has the item at the same place, so its mask is the unoccluded foreground.
    clean = FashionMNISTScenes(None, "val", clutter=(0, 0), items=items).batch(range(512))
    assert torch.equal(clean["side"], batch["side"])
    seen = clean["mask"] > 0
    kept = batch["mask"] > 0
    assert not (kept & ~seen).any()  # fragments never add item pixels
    ratio = kept.flatten(1).sum(1) / seen.flatten(1).sum(1)
    assert ratio.min() >= 0.75 and (ratio < 1).sum() >= 20  # occlusion happens, within the bound
    clutter = (batch["image"] != clean["image"]) & ~seen[:, None]
    assert clutter.flatten(1).any(1).all()  # every scene has clutter outside the item


def test_small_and_large_items_occur(batch: dict) -> None:
    side = batch["side"]
    assert int(side.min()) == 14 and int(side.max()) == 44
    height = batch["box"][:, 3] - batch["box"][:, 1]
    assert (height <= 14).sum() >= 20 and (height >= 40).sum() >= 20


def test_batch_equals_per_sample_and_subset(val: FashionMNISTScenes) -> None:
    indices = [9000, 5, 5, 123, 0, 9999, 42]
    b = val.batch(indices)
    images, labels = val.__getitems__(indices)
    assert torch.equal(images, b["image"]) and torch.equal(labels, b["label"])
    for k, i in enumerate(indices):
        s = val.sample(i)
        for key in ("image", "mask", "box"):
            assert torch.equal(s[key], b[key][k]), (i, key)
    sub = val.subset(100, "limit_val")
    assert len(sub) == 100 and len(val) == 10_000 and torch.equal(sub.labels, val.labels[:100])
    assert torch.equal(sub.batch([99])["image"], val.batch([99])["image"])
    with pytest.raises(IndexError):
        sub.batch([100])


def test_loader_batches_with_and_without_workers(val: FashionMNISTScenes) -> None:
    sub = val.subset(96)
    direct, labels = sub.__getitems__(list(range(32)))
    for workers in (0, 1):
        loader = make_loader(sub, EvalSampler(len(sub), 32), workers, pin_memory=False)
        first = next(iter(loader))
        assert torch.equal(first[0], direct) and torch.equal(first[1], labels) and first[2] == 0


def test_dataset_stats_match_the_training_scenes() -> None:
    data = load_data("fashion-mnist-scenes", None, holdout=0)  # the statistics are of all 60,000 training scenes
    assert (data.kind, data.num_classes, data.in_chans, data.img_size, data.in_memory) == \
        ("fashion-mnist-scenes", 10, 1, 64, True)
    assert (len(data.train), len(data.val), data.classes) == (60_000, 10_000, FASHION_MNIST_CLASSES)
    idx = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:1024].tolist()
    x = data.train.batch(idx)["image"].double() / 255
    (mean,), (std,) = DATASET_STATS["fashion-mnist-scenes"]
    assert abs(x.mean().item() - mean) < 0.01 and abs(x.std().item() - std) < 0.01
    assert load_data("fashion-mnist-scenes", None, train=False, img_size=48).val.sample(0)["image"].shape == (1, 48, 48)


def test_bad_arguments_give_one_clear_error(items, tmp_path: Path, capsys) -> None:
    bad = [(dict(canvas=20), ConfigError, "canvas must be an integer >= 28, got 20"),
           (dict(canvas=64.0), ConfigError, "canvas"),
           (dict(split="dev"), ConfigError, "split must be train, val, test or holdout"),
           (dict(sides=(30, 20)), ConfigError, "smallest value above its largest"),
           (dict(sides=(5, 20)), ConfigError, "sides must be an integer from 10"),
           (dict(sides=(14, 80)), ConfigError, "sides must be an integer from 10 to 64"),
           (dict(clutter=(-1, 2)), ConfigError, "clutter"),
           (dict(clutter=3), ConfigError, "clutter must be a pair"),
           (dict(max_occlusion=0.9), ConfigError, "max_occlusion"),
           (dict(seed=-1), ConfigError, "seed")]
    for kwargs, error, text in bad:
        args = dict(split="val", items=items) | kwargs
        with pytest.raises(error, match=text):
            FashionMNISTScenes(None, **args)
    with pytest.raises(DataError, match="not found in"):
        FashionMNISTScenes(tmp_path, "val")
    with pytest.raises(DataError, match="at least 28"):
        load_data("fashion-mnist-scenes", None, train=False, img_size=20)
    with pytest.raises(ConfigError, match="n must be"):
        save_sample_grid(tmp_path / "g.png", n=0)
    rc = main(["train", "--data", "fashion-mnist-scenes", "--img-size", "16", "--no-progress", "--workers", "0",
               "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("openaff train: error: fashion-mnist-scenes") and err.count("\n") == 1, err


def test_sample_grid(tmp_path: Path) -> None:
    path = save_sample_grid(tmp_path / "grid" / "samples.png", n=8, cols=4)
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 100


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from openaff.training.train import train

    out = tmp_path_factory.mktemp("scenes") / "run"
    result = train(dict(model="aff_cifar_resnet8", model_kwargs=dict(width_mult=0.25), data="fashion-mnist-scenes",
                        epochs=1, batch_size=64, limit_train=256, limit_val=128, output=str(out), progress=False,
                        threads=1, workers=0, holdout=0))  # validation on the test split, which eval scores
    return out, result.history[-1]


def test_tiny_training_run(run_dir: tuple[Path, dict]) -> None:
    out, last = run_dir
    assert (out / "model.safetensors").is_file() and (out / "metrics.csv").is_file()
    from openaff.files import load_weights

    _, meta = load_weights(out / "model.safetensors")
    assert meta["data"] == "fashion-mnist-scenes" and meta["in_chans"] == 1 and meta["num_classes"] == 10
    assert np.isfinite(last["train_loss"]) and 0 <= last["val_top1"] <= 100


def test_eval_of_the_run_needs_no_flags(run_dir: tuple[Path, dict]) -> None:
    from openaff.training.evaluate import evaluate

    out, last = run_dir
    res = evaluate(out, progress=False, threads=1, limit=128)  # the 128 validation scenes of the run
    assert (res["data"], res["img_size"], res["images"]) == ("fashion-mnist-scenes", 64, 128)
    assert res["top1"] == pytest.approx(last["val_top1"], abs=1e-6)
