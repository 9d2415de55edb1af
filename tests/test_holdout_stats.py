"""Held-out validation and the test split (issue 20), and the study's statistics: paired contrasts, Holm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _train_utils import write_fashion_mnist

from openaff.data.splits import holdout_indices, load_data, resolve_holdout
from openaff.errors import DataError
from openaff.stats import contrast_table, holm, paired_contrast, parse_contrasts
from openaff.study import StudyError, resolve_contrasts, split_fusion_spec
from openaff.training import make_config
from openaff.training.train import train


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=200, n_test=48)


def test_holdout_indices_are_disjoint_complete_and_deterministic() -> None:
    keep, out = holdout_indices(1000, 100)
    assert len(out) == 100 and len(keep) == 900
    assert set(keep.tolist()).isdisjoint(out.tolist()) and set(keep.tolist()) | set(out.tolist()) == set(range(1000))
    again = holdout_indices(1000, 100)
    assert torch.equal(keep, again[0]) and torch.equal(out, again[1])
    assert not torch.equal(out, holdout_indices(1000, 100, seed=1)[1])  # the seed decides
    assert torch.equal(out, out.sort().values)


def test_default_holdout_and_its_errors() -> None:
    assert resolve_holdout(None, "fashion-mnist", 60000) == 5000
    assert resolve_holdout(None, "cifar100", 50000) == 5000
    assert resolve_holdout(None, "fashion-mnist", 256) == 0  # a subset or fixture: nothing held out
    assert resolve_holdout(None, "imagefolder", 10**6) == 0  # folders keep their val/
    assert resolve_holdout(0, "cifar10", 50000) == 0  # the authors' protocol
    with pytest.raises(DataError, match="leaves no training images"):
        resolve_holdout(300, "fashion-mnist", 200)
    with pytest.raises(DataError, match="keep their own validation folder"):
        resolve_holdout(10, "imagefolder", 1000)


@pytest.mark.parametrize("kind", ["fashion-mnist", "fashion-mnist-scenes"])
def test_holdout_split_comes_from_training_images_and_test_is_the_test_split(fmnist: Path, kind: str) -> None:
    plain = load_data(kind, str(fmnist), holdout=0)
    held = load_data(kind, str(fmnist), holdout=40)
    assert held.holdout == 40 and len(held.val) == 40 and len(held.train) == 160 and len(held.test) == 48
    assert plain.test is None and len(plain.val) == 48
    items = (lambda d: d.items) if kind == "fashion-mnist-scenes" else (lambda d: d)
    _, out = holdout_indices(200, 40)
    assert torch.equal(items(held.val).images, items(plain.train).images[out])
    train_imgs = {bytes(x.numpy()) for x in items(held.train).images}
    assert not any(bytes(x.numpy()) in train_imgs for x in items(held.val).images)  # disjoint (the fixture's
    # images are random, so equal bytes would mean the same image)
    assert torch.equal(items(held.test).images, items(plain.val).images)  # the official test split
    if kind == "fashion-mnist-scenes":  # held-out scenes are scenes of their own (another hash), not training's
        assert held.val.split == "holdout" and held.train.split == "train"


def test_training_scores_the_test_split_once_with_selected_and_final_weights(fmnist: Path, tmp_path: Path) -> None:
    cfg = make_config(model="cifar_resnet8", model_kwargs=dict(width_mult=0.25), data="fashion-mnist-scenes",
                      data_dir=str(fmnist), img_size=32, holdout=40, limit_train=64, batch_size=32, epochs=2,
                      lr=0.05, output=str(tmp_path / "r"), progress=False, threads=1, workers=0, amp="none")
    result = train(cfg)
    test = json.loads((tmp_path / "r" / "test.json").read_text())
    assert test["images"] == 48 and test["selected_epoch"] == result.best_epoch and test["final_epoch"] == 1
    assert "held out" in test["selected_on"]
    for which in ("selected", "final"):
        by_size = test[which]["by_size"]
        assert sum(b["images"] for b in by_size) == 48  # every test scene in one side bin
        correct = sum(b["top1"] * b["images"] / 100 for b in by_size if b["images"])
        assert correct == pytest.approx(test[which]["test_top1"] * 48 / 100, abs=1e-6)
    if result.best_epoch == 1:
        assert test["selected"] == test["final"]


def test_segmentation_holds_out_the_same_scenes_and_scores_the_test_scenes_once(fmnist: Path,
                                                                               tmp_path: Path) -> None:
    """A segmenter on fashion-mnist-scenes gets the classification scenes' split (masks as targets): the epoch is
    chosen on held-out training scenes, the official test scenes are scored once (test.json, mIoU by item side)."""
    from openaff.segmentation.data import load_segmentation_data

    cfg = make_config(model="fpn_cifar_resnet8", model_kwargs=dict(width_mult=0.25), data="fashion-mnist-scenes",
                      data_dir=str(fmnist), img_size=32, holdout=40, limit_train=32, batch_size=16, epochs=1,
                      lr=0.05, output=str(tmp_path / "seg"), progress=False, threads=1, workers=0, amp="none")
    data, scenes = load_segmentation_data(cfg), load_data("fashion-mnist-scenes", str(fmnist), img_size=32, holdout=40)
    assert (len(data.val), len(data.train), len(data.test), data.holdout) == (40, 160, 48, 40)
    assert torch.equal(data.val[3][0], scenes.val[3][0]) and torch.equal(data.test[5][0], scenes.test[5][0])
    train(cfg)
    test = json.loads((tmp_path / "seg" / "test.json").read_text())
    assert test["images"] == 48 and "val_miou of 40 training images held out" in test["selected_on"]
    assert 0 <= test["selected"]["test_miou"] <= 100 and sum(b["scenes"] for b in test["final"]["by_size"]) == 48
    with pytest.raises(DataError, match="VOC folders keep their own validation list"):
        load_segmentation_data(make_config(model="fpn_cifar_resnet8", data="voc", data_dir=str(fmnist), holdout=8))


def test_the_authors_protocol_is_study_gpu_without_the_holdout() -> None:
    from openaff.training import load_recipe

    ours, theirs = load_recipe("study-gpu"), load_recipe("study-gpu-authors")
    assert {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)} == {"holdout"}
    assert (ours["holdout"], theirs["holdout"]) == (5000, 0)


def test_paired_contrast_and_holm_against_a_hand_computed_case() -> None:
    a, b = [71.0, 73.0, 70.0, 74.0], [70.0, 70.5, 69.0, 71.5]  # differences 1, 2.5, 1, 2.5
    c = paired_contrast(a, b)
    mean, n = 1.75, 4
    assert c["mean"] == pytest.approx(mean) and c["sd"] == pytest.approx(math.sqrt(0.75), rel=1e-9)  # sample sd
    half = 3.182446305284263 * c["sd"] / math.sqrt(n)  # t(0.975, 3)
    assert c["lo"] == pytest.approx(mean - half) and c["hi"] == pytest.approx(mean + half)
    t = mean / (c["sd"] / math.sqrt(n))  # 4.0415; two-sided p of t(3)
    assert t == pytest.approx(4.0414519, rel=1e-6) and c["p"] == pytest.approx(0.027283, rel=1e-3)
    # Holm: sorted p 0.01 x 3, 0.03 x 2, 0.04 x 1 -> monotone 0.03, 0.06, 0.06; None stays None
    assert holm([0.04, 0.01, None, 0.03]) == [pytest.approx(0.06), pytest.approx(0.03), None, pytest.approx(0.06)]
    rows = contrast_table({"aff": {0: 71.0, 1: 73.0, 2: 70.0}, "add": {0: 70.0, 1: 70.5, 2: 69.0, 3: 1.0}},
                          [("aff", "add")])
    assert rows[0]["seeds"] == [0, 1, 2] and rows[0]["p_holm"] == pytest.approx(rows[0]["p"])


def test_bad_contrasts_are_one_line_each() -> None:
    grid = ["add", "aff", "iaff", "aff@r2"]
    assert resolve_contrasts("aff-add,aff@r2-aff", grid) == [("aff", "add"), ("aff@r2", "aff")]
    assert resolve_contrasts(None, grid) == [("aff", "add"), ("iaff", "add"), ("iaff", "aff"), ("aff@r2", "aff")]
    with pytest.raises(StudyError, match="unknown fusion type 'afff'"):
        resolve_contrasts("afff-add", grid)
    with pytest.raises(StudyError, match="ms_gau not in this study's types"):
        resolve_contrasts("aff-ms_gau", grid)
    with pytest.raises(StudyError, match="is not TYPE-TYPE"):
        resolve_contrasts("aff", grid)
    with pytest.raises(ValueError, match="with itself"):
        parse_contrasts("aff-aff", grid)
    assert split_fusion_spec("aff@r2") == ("aff", 2) and split_fusion_spec("iaff") == ("iaff", None)
    with pytest.raises(StudyError, match="NAME@rK"):
        split_fusion_spec("aff@rx")


def test_study_reports_test_numbers_by_side_and_paired_contrasts(fmnist: Path, tmp_path: Path) -> None:
    import yaml

    from openaff.study import run_study, summarize

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(model="cifar_resnet8", model_kwargs=dict(width_mult=0.125),
                                          data="fashion-mnist-scenes", img_size=32, holdout=40, epochs=1,
                                          batch_size=16, lr=0.1, aug="none", amp="none", workers=0)))
    out = tmp_path / "s"
    res = run_study(out, fusions="add,aff@r2", depths="1", seeds=2, data=f"fashion-mnist-scenes:{fmnist}",
                    recipe=str(recipe), limit_train=64, threads=1, progress=False, contrasts="aff@r2-add")
    runs = {(r.fusion, r.seed): r for r in res.runs}
    assert all(r.status == "finished" and r.test is not None and r.test_by_size for r in res.runs)
    test = json.loads((out / "runs" / "aff@r2-b1-s0" / "test.json").read_text())
    assert runs["aff@r2", 0].test == test["selected"]["test_top1"]
    (c,) = res.contrasts
    assert (c["a"], c["b"], c["seeds"]) == ("aff@r2", "add", [0, 1])
    assert c["mean"] == pytest.approx(sum(runs["aff@r2", s].test - runs["add", s].test for s in (0, 1)) / 2)
    assert res.contrast_metric == "test at the selected epoch" and len(res.size_contrasts) == 4
    table = (out / "table.md").read_text()
    assert "## Test top-1 (%), epoch chosen on held-out validation" in table
    assert "## Test by pasted item side" in table and "| aff@r2 − add | 2 |" in table
    # The matched-budget AFF really is AFF at r = 2: more parameters than at r = 4.
    cells = {c["fusion"]: c for c in res.cells}
    assert cells["aff@r2"]["params"] > cells["add"]["params"]
    assert summarize(out, progress=False, contrasts="add-aff@r2").contrasts[0]["mean"] == pytest.approx(-c["mean"])
