"""Foreground IoU, item-class and scene accuracy, the same by item side, the wide decoder, the rescore command."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from _train_utils import env, write_fashion_mnist

from openaff.cli import main
from openaff.data.loader import EvalSampler, make_loader
from openaff.data.scenes import FashionMNISTScenes
from openaff.segmentation import create_segmenter
from openaff.segmentation.data import SceneMasks, SegmentationPipeline, seg_collate
from openaff.segmentation.fpn import fusion_share
from openaff.segmentation.metrics import IGNORE_INDEX, confusion_matrix
from openaff.segmentation.object_scores import (
    binned_counts,
    foreground_scores,
    scene_counts,
    scores_from_counts,
    side_bins,
    size_columns,
)
from openaff.segmentation.rescore import paired_contrast
from openaff.segmentation.task import SEGMENT
from openaff.training import make_config
from openaff.training.distributed import DistInfo
from openaff.training.train import train

X = IGNORE_INDEX


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 2 x 4 images, classes 0 (background) to 3, worked out by hand below."""
    target = torch.tensor([
        [[0, 0, 1, 1], [0, 1, 1, X]],  # item 1; pred: 3 item pixels found (2 right), 2 false, 1 missed
        [[3, 3, 3, 0], [0, 0, 0, 0]],  # item 3; pred: 3 found (1 right), 1 false; predicted classes tie 2:2
        [[2, 2, 0, 0], [0, 0, 0, 0]],  # item 2; nothing predicted: 2 missed, scene wrong
        [[0, 0, 0, 0], [0, 0, 0, 0]],  # no item: 1 false pixel, the scene is not counted
    ])
    pred = torch.tensor([
        [[0, 2, 1, 1], [1, 0, 2, 3]],  # the ignored pixel's 3 counts nowhere; majority 1 (x3) over 2 (x2): right
        [[2, 2, 3, 0], [3, 0, 0, 0]],  # 2 and 3 twice each: the lower class (2) wins the tie: wrong
        [[0, 0, 0, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 1], [0, 0, 0, 0]],
    ])
    return pred, target


def test_foreground_iou_item_and_scene_accuracy_against_a_hand_computed_case() -> None:
    pred, target = _case()
    counts = scene_counts(pred, target, 4)
    # fg_tp, fg_fp, fg_fn, item_correct, scenes, scenes_correct
    assert counts.tolist() == [[3, 2, 1, 2, 1, 1], [3, 1, 0, 1, 1, 0], [0, 0, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]]
    pooled = scores_from_counts(counts)
    # TP 6, FP 4, FN 3: 6 / 13; right class on 3 of the 6 found pixels; 1 of the 3 scenes with an item
    assert pooled["fg_iou"] == pytest.approx(100 * 6 / 13)
    assert pooled["item_acc"] == pytest.approx(50.0)
    assert pooled["scene_acc"] == pytest.approx(100 / 3) and pooled["scenes"] == 3
    # the confusion matrix gives the same pixel scores
    fg = foreground_scores(confusion_matrix(pred, target, 4))
    assert fg["fg_iou"] == pytest.approx(100 * 6 / 13) and fg["item_acc"] == pytest.approx(50.0)
    # a perfect prediction, and nothing counted at all
    perfect = scores_from_counts(scene_counts(target.clamp(max=3), target, 4))
    assert perfect["fg_iou"] == perfect["item_acc"] == perfect["scene_acc"] == 100.0
    assert all(math.isnan(v) for v in foreground_scores(torch.zeros(4, 4, dtype=torch.int64)).values())
    with pytest.raises(ValueError, match="same B x H x W shape"):
        scene_counts(pred[0], target[0], 4)


def test_side_bins_and_the_scores_by_side_on_a_hand_made_set() -> None:
    assert side_bins(14, 33) == [(14, 18), (19, 23), (24, 28), (29, 33)]  # the 48-pixel canvas
    assert side_bins(14, 44) == [(14, 21), (22, 29), (30, 37), (38, 44)]  # the 64-pixel canvas
    assert side_bins(14, 15, 4) == [(14, 14), (15, 15)]
    with pytest.raises(ValueError, match="smallest <= largest"):
        side_bins(20, 14)
    pred, target = _case()
    counts = scene_counts(pred, target, 4)
    bins = side_bins(14, 33)
    per_bin = binned_counts(counts, torch.tensor([14, 20, 33, 20]), bins)
    assert per_bin.tolist() == [[3, 2, 1, 2, 1, 1], [3, 2, 0, 1, 1, 0], [0] * 6, [0, 0, 2, 0, 1, 0]]
    rows = [dict(sides=b, **scores_from_counts(r)) for b, r in zip(bins, per_bin, strict=True)]
    assert rows[0]["fg_iou"] == pytest.approx(50.0) and rows[0]["scene_acc"] == 100.0
    assert rows[1]["fg_iou"] == pytest.approx(60.0) and rows[1]["item_acc"] == pytest.approx(100 / 3)
    assert rows[1]["scene_acc"] == 0.0 and rows[1]["scenes"] == 1
    assert math.isnan(rows[2]["fg_iou"]) and rows[2]["scenes"] == 0
    assert rows[3]["fg_iou"] == 0.0 and math.isnan(rows[3]["item_acc"]) and rows[3]["scene_acc"] == 0.0
    cols = size_columns(rows)
    assert list(cols)[:3] == ["val_fg_iou_s14_18", "val_item_acc_s14_18", "val_scene_acc_s14_18"] and len(cols) == 12


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=32)


def test_the_engine_scores_every_scene_with_its_own_side(fmnist: Path) -> None:
    torch.manual_seed(0)
    net = create_segmenter("fpn_cifar_resnet8", num_classes=11, in_chans=1, width_mult=0.25).eval()
    scenes = SceneMasks(FashionMNISTScenes(fmnist, "val", 32)).subset(13)
    assert scenes.side_range == (14, 22)
    made = scenes.scenes.batch(range(13))
    assert torch.equal(scenes.item_sides(), made["side"])
    loader = make_loader(scenes, EvalSampler(13, 5), 0, False, collate_fn=seg_collate)  # batches of 5, 5, 3
    pipe = SegmentationPipeline(torch.device("cpu"), (0.2,), (0.3,))
    res = SEGMENT.evaluate(net, loader, pipe, DistInfo(), num_classes=11, progress=False)
    with torch.no_grad():
        x, y = pipe.batch(made["image"], made["mask"])
        counts = scene_counts(net(x).argmax(1), y, 11)
    bins = side_bins(14, 22)
    expected = [scores_from_counts(r) for r in binned_counts(counts, made["side"], bins)]
    assert [tuple(r["sides"]) for r in res["by_size"]] == bins
    assert sum(r["scenes"] for r in res["by_size"]) == 13
    for got, want in zip(res["by_size"], expected, strict=True):
        for k in ("fg_iou", "item_acc", "scene_acc"):
            assert got[k] == pytest.approx(want[k], abs=1e-9, nan_ok=True)
    assert res["val_scene_acc"] == pytest.approx(scores_from_counts(counts)["scene_acc"])
    assert res["val_fg_iou"] == pytest.approx(scores_from_counts(counts)["fg_iou"])


def test_the_wide_decoder_gives_fusion_more_than_a_trace_of_the_model() -> None:
    kw = dict(num_classes=11, in_chans=1, width_mult=0.25)
    narrow = create_segmenter("aff_fpn_cifar_resnet20", **kw)
    wide = create_segmenter("aff_fpn_cifar_resnet20", inner_chs=64, **kw)
    assert fusion_share(narrow)[2] < 0.6 < fusion_share(wide)[2]
    assert fusion_share(create_segmenter("fpn_cifar_resnet20", inner_chs=64, **kw))[1] == 0
    # levels of 16 and 32 channels get a lateral; the deepest (64) is already at the width
    assert [type(m).__name__ for m in wide.laterals] == ["Sequential", "Sequential", "Identity"]
    for merge in wide.merges:  # every merge fuses at the one width, after the high map's Conv1x1-BN-ReLU (4b)
        assert next(m for m in merge.fuse.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 64
        assert [type(m).__name__ for m in merge.project] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert wide(torch.randn(2, 1, 48, 48)).shape == (2, 11, 48, 48)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="inner_chs must be a positive number"):
            create_segmenter("aff_fpn_cifar_resnet20", inner_chs=bad, **kw)


def test_the_wide_decoder_trains_a_step_and_reloads(fmnist: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_segmenter("aff_fpn_cifar_resnet20", num_classes=11, in_chans=1, width_mult=0.25, inner_chs=64)
    scenes = FashionMNISTScenes(fmnist, "train", 48).batch(range(8))
    x, y = (scenes["image"].float() - 40) / 60, scenes["mask"].long()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adagrad(net.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("laterals.") for n in moved) and any(".fuse." in n for n in moved)
    # one step through the engine: the wide decoder is recorded and rebuilds; metrics.csv has the new columns
    cfg = make_config(model="aff_fpn_cifar_resnet20", model_kwargs=dict(width_mult=0.25, inner_chs=64),
                      data="fashion-mnist-scenes", data_dir=str(fmnist), img_size=48, limit_train=8, limit_val=8,
                      batch_size=8, epochs=1, opt="adagrad", lr=0.01, output=str(tmp_path / "run"), progress=False,
                      threads=1, workers=0)
    train(cfg)
    row = next(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert all(0 <= float(row[k]) <= 100 for k in ("val_fg_iou", "val_item_acc", "val_scene_acc")
               if row[k] != "nan")
    assert "val_scene_acc_s14_18" in row
    again = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    assert again.inner_chs == 64 and len(again.laterals) == 3


def test_paired_contrast_against_a_hand_computed_case() -> None:
    # differences 1, 1, 2.5: mean 1.5, sd sqrt(0.75); t(0.975, 2) = 4.302653, t(0.8, 2) = 1.060660
    c = paired_contrast([1.0, 2.0, 3.5], [0.0, 1.0, 1.0])
    sd = 0.75 ** 0.5
    assert c["n"] == 3 and c["mean"] == pytest.approx(1.5) and c["sd"] == pytest.approx(sd)
    assert (c["lo"], c["hi"]) == pytest.approx((1.5 - 4.302653 * sd / 3 ** 0.5, 1.5 + 4.302653 * sd / 3 ** 0.5),
                                               abs=1e-5)
    assert c["mdd"] == pytest.approx((4.302653 + 1.060660) * sd / 3 ** 0.5, abs=1e-5)
    # t = 1.5 / (sd / sqrt 3) = 3; with 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2)
    assert c["p"] == pytest.approx(1 - 3 / 11 ** 0.5, abs=1e-9)
    one = paired_contrast([2.0], [1.0])
    assert one["mean"] == 1.0 and one["lo"] is None and one["mdd"] is None
    with pytest.raises(ValueError, match="differ in number"):
        paired_contrast([1.0, 2.0], [1.0])


def test_the_rescore_command_on_a_two_run_study(fmnist: Path, tmp_path: Path, capsys) -> None:
    for fusion, seed in (("add", 0), ("aff", 0)):
        cfg = make_config(model="fpn_cifar_resnet8", model_kwargs=dict(width_mult=0.25, fusion=fusion),
                          data="fashion-mnist-scenes", data_dir=str(fmnist), img_size=32, limit_train=16,
                          limit_val=12, batch_size=16, epochs=1, seed=seed, output=str(tmp_path / f"study/runs/"
                                                                                     f"{fusion}-b1-s{seed}"),
                          progress=False, threads=1, workers=0)
        train(cfg)
    capsys.readouterr()
    assert main(["segment", "rescore", str(tmp_path / "study"), "--split", "val", "--limit", "12", "--threads", "1",
                 "--output", str(tmp_path / "out")]) == 0
    assert "2 runs re-scored" in capsys.readouterr().out
    res = json.loads((tmp_path / "out" / "rescore.json").read_text())
    # the val scenes are the ones the runs were validated on: the recorded mIoU again
    for r in res["runs"]:
        assert r["miou"] == pytest.approx(r["miou_recorded"], abs=1e-3) and r["images"] == 12
    assert res["contrasts"]["aff-add"]["fg_iou"]["n"] == 1
    text = (tmp_path / "out" / "rescore.md").read_text()
    assert "| add | 1 |" in text and "no interval" in text and "14-16 px" in text
    rows = list(csv.DictReader((tmp_path / "out" / "rescore.csv").open()))
    assert [r["run"] for r in rows] == ["add-b1-s0", "aff-b1-s0"] and "scene_acc_s21_22" in rows[0]
    assert main(["segment", "rescore", str(tmp_path / "nothing")]) == 2
    assert "openaff segment rescore: error:" in capsys.readouterr().err


def test_the_fusion_share_table_of_the_docs_is_what_its_code_prints() -> None:
    text = (Path(__file__).parents[1] / "docs" / "segmentation.md").read_text()
    section = text.split("**How much of the model the fusion is, and `inner_chs`.**", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    printed = section.split("```python\n", 1)[1].split("```", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == printed
