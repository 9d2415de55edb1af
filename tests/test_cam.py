"""``openaff cam`` / ``openaff attention``: Grad-CAM maps and grids, MS-CAM attention maps, the localisation score."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from _train_utils import write_fashion_mnist
from PIL import Image
from safetensors.torch import save_file

from openaff import cam
from openaff.cam import (
    CamError,
    Sample,
    attention_maps,
    compute_cams,
    default_target_layer,
    gradcam_grid,
    load_model,
    localisation_score,
    photo_samples,
    scene_samples,
    score_models,
    score_study,
    size_bins,
)
from openaff.cli import main
from openaff.data.scenes import FASHION_MNIST_CLASSES
from openaff.errors import ConfigError
from openaff.hub import save_pretrained
from openaff.study import run_study

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("skimage")

SMALL = dict(width_mult=0.25)  # 16/32/64 channels
TINY = dict(width_mult=0.125)


@pytest.fixture(scope="module")
def photos() -> list[Sample]:
    return photo_samples()  # scikit-image's astronaut, chelsea, coffee


@pytest.fixture(scope="module")
def aff8() -> cam.CamModel:
    torch.manual_seed(0)
    return load_model("aff_cifar_resnet8", model_kwargs=SMALL, img_size=64)


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST look-alike: the scenes are made from it as from the real one."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=512, n_test=256)


def _inputs(cm: cam.CamModel, samples: list[Sample]) -> torch.Tensor:
    return torch.cat([cam._preprocess(s, cm)[1] for s in samples])


# --- maps -------------------------------------------------------------------------------------------------------

def test_heatmap_shape_and_range_on_photos(aff8, photos):
    x = _inputs(aff8, photos)
    assert x.shape == (3, 3, 64, 64)
    maps, probs = compute_cams(aff8, x)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    for m in maps:  # pytorch-grad-cam scales each map to [0, 1]: a real map spans it
        assert m.max() == pytest.approx(1, abs=1e-3) and m.std() > 0.05
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert probs.shape == (3, 100)
    # The three photos give three different maps.
    assert np.abs(maps[0] - maps[1]).max() > 0.1 and np.abs(maps[1] - maps[2]).max() > 0.1


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_map_changes_with_the_target_class(aff8, photos, method):
    x = _inputs(aff8, photos[:2])
    a, pa = compute_cams(aff8, x, [3, 3], method=method)
    b, pb = compute_cams(aff8, x, [71, 71], method=method)
    np.testing.assert_allclose(pa, pb)  # the same forward pass
    assert np.abs(a - b).max() > 0.1
    again, _ = compute_cams(aff8, x, [3, 3], method=method)
    np.testing.assert_allclose(a, again, atol=1e-6)  # and the same map for the same class


def test_unknown_method_is_one_clear_error(aff8, photos):
    with pytest.raises(ConfigError, match=r"unknown CAM method 'fullgradx'; choose one of gradcam, gradcam\+\+"):
        compute_cams(aff8, _inputs(aff8, photos[:1]), method="fullgradx")


# --- target layers ------------------------------------------------------------------------------------------------

def _ours(module: str) -> list[str]:
    return timm.list_models(module=module)


@pytest.mark.parametrize(("module", "expected"), [
    ("aff_cifar", lambda name: "layer3" if "resnext" in name else "act_final"),
    ("aff_inception", lambda name: "act_final"),
    ("aff_resnet", lambda name: "layer4"),
])
def test_default_target_layer_of_every_registered_model(module, expected):
    names = _ours(module)
    assert len(names) >= 4
    for name in names:
        with torch.device("meta"):
            net = timm.create_model(name)
        layer = default_target_layer(net)
        assert layer == expected(name), name
        # The last stage's output: what the classifier's pooling sees (its channels).
        assert net.feature_info[-1]["num_chs"] == net.num_features


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50", "resnet18"])
def test_default_target_layer_of_timm_models(name):
    with torch.device("meta"):
        net = timm.create_model(name)
    assert default_target_layer(net) == "layer4"


@pytest.mark.parametrize(("name", "kwargs"), [
    ("aff_cifar_resnet8", TINY),
    ("iaff_cifar_resnext11_32x4d", dict(width_mult=0.25)),
    ("aff_cifar_inception_resnet8", TINY),
    ("aff_resnet50", dict(layers=(1, 1, 1, 1), num_classes=10)),
    ("resnet18", dict(num_classes=10)),
])
def test_automatic_layer_gives_a_real_map_for_each_family(name, kwargs, photos):
    cm = load_model(name, model_kwargs=kwargs, img_size=64)
    maps, _ = compute_cams(cm, _inputs(cm, photos[:1]))
    assert maps.shape == (1, 64, 64) and 0.05 < maps.std() and maps.max() <= 1


def test_target_layer_override(aff8, photos):
    x = _inputs(aff8, photos[:1])
    default, _ = compute_cams(aff8, x, [5])
    early = load_model(aff8, target_layer="layer2")
    assert early.target_layer == "layer2" and aff8.target_layer == "act_final"
    m, _ = compute_cams(early, x, [5])
    assert m.shape == (1, 64, 64) and np.abs(m - default).max() > 0.1
    with pytest.raises(ConfigError, match=r"aff_cifar_resnet8 has no module 'layer9' \(its top-level modules: "
                                          r"input_norm, conv1, layer1"):
        load_model(aff8, target_layer="layer9")


# --- weights, preprocessing, class names -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene_run(tmp_path_factory) -> Path:
    """A folder as `openaff train` writes it for a fashion-mnist-scenes model at 48 px (random weights)."""
    torch.manual_seed(1)
    kwargs = dict(width_mult=0.125, in_chans=1, num_classes=10)
    net = timm.create_model("aff_cifar_resnet8", **kwargs)
    return save_pretrained(net, tmp_path_factory.mktemp("run") / "aff-b1-s0", architecture="aff_cifar_resnet8",
                           model_args=kwargs, input_size=(1, 48, 48), mean=(0.1558,), std=(0.1663,),
                           label_names=FASHION_MNIST_CLASSES)


def test_run_folder_gives_preprocessing_and_class_names(scene_run, fm_dir):
    cm = load_model(scene_run)
    assert cm.name == "aff_cifar_resnet8" and cm.label == "aff-b1-s0" and cm.source == str(scene_run)
    assert cm.input_size == (1, 48, 48) and cm.mean == (0.1558,) and cm.std == (0.1663,)
    assert cm.class_names == FASHION_MNIST_CLASSES
    same = load_model(scene_run / "model.safetensors")  # the file alone records the same
    assert same.input_size == cm.input_size and same.class_names == FASHION_MNIST_CLASSES
    # A scene is resized whole (no crop) and normalised with the run's statistics; its box follows.
    s = scene_samples([0], canvas=64, data_dir=fm_dir)[0]
    display, x, box = cam._preprocess(s, cm)
    assert x.shape == (1, 1, 48, 48) and display.shape == (48, 48, 1)
    np.testing.assert_allclose(box, np.asarray(s.box) * 48 / 64)
    np.testing.assert_allclose(x[0, 0].numpy() * 0.1663 + 0.1558, display[:, :, 0], atol=1e-6)
    at_canvas = cam._preprocess(scene_samples([0], canvas=48, data_dir=fm_dir)[0], cm)
    np.testing.assert_allclose(at_canvas[0][:, :, 0] * 255, scene_samples([0], canvas=48, data_dir=fm_dir)[0]
                               .image[:, :, 0], atol=1e-3)


def test_imagenet_names_and_eval_transform():
    with torch.device("meta"):
        net = timm.create_model("resnet50d")
    cm = load_model(net)
    assert cm.class_names[0] == "tench" and len(cm.class_names) == 1000
    assert cm.input_size == (3, 224, 224) and cm.crop_pct == 0.875 and cm.mean == pytest.approx((0.485, 0.456, 0.406))
    chelsea = photo_samples(["chelsea"])[0]  # 300 x 451: resize the short side to 256, centre crop 224
    display, x, box = cam._preprocess(chelsea, cm)
    assert display.shape == (224, 224, 3) and box is None and x.shape == (1, 3, 224, 224)


# --- the grid -----------------------------------------------------------------------------------------------------

def test_grid_has_a_panel_per_image_and_model(aff8, photos, tmp_path):
    out = tmp_path / "grid.png"
    grid = gradcam_grid([aff8, "cifar_resnet8"], photos, output=out, model_kwargs=TINY, img_size=64)
    assert grid.path == out and out.is_file()
    fig = grid.figure
    assert len(fig.axes) == 6  # 3 images x 2 models, nothing else
    rows = sorted({round(ax.get_position().y0, 3) for ax in fig.axes})
    cols = sorted({round(ax.get_position().x0, 3) for ax in fig.axes})
    assert len(rows) == 3 and len(cols) == 2
    assert all(len(ax.get_images()) == 2 for ax in fig.axes)  # the image and its heatmap
    with Image.open(out) as img:
        assert img.size == tuple(round(v * 100) for v in fig.get_size_inches())
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("aff_cifar_resnet8\n") and titles[1].startswith("cifar_resnet8\n")
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["astronaut", "chelsea", "coffee"]
    for i in range(3):
        for j in range(2):
            k = int(grid.predicted[i, j])
            assert f"class {k} {grid.scores[i, j]:.2f}" in titles[2 * i + j]
            assert grid.cams[i][j].shape == (64, 64) and grid.correct[i][j] is None
    assert grid.labels == ["aff_cifar_resnet8", "cifar_resnet8"]


def test_grid_marks_wrong_predictions(scene_run, fm_dir):
    samples = scene_samples(range(6), canvas=48, data_dir=fm_dir)
    grid = gradcam_grid(scene_run, samples)
    labels = [s.label for s in samples]
    wrong = [grid.predicted[i, 0] != labels[i] for i in range(6)]
    assert any(wrong)  # random weights
    for i, ax in enumerate(grid.figure.axes):
        assert grid.correct[i][0] is (not wrong[i])
        title = ax.get_title()
        assert FASHION_MNIST_CLASSES[grid.predicted[i, 0]] in title  # names from the weights' metadata
        if wrong[i]:
            assert f"wrong (true: {FASHION_MNIST_CLASSES[labels[i]]})" in title and ax.title.get_color() == "red"
        else:
            assert "wrong" not in title
        assert len(ax.patches) == 1  # the item's box
    # The map of the true class instead of the predicted one.
    by_label = gradcam_grid(scene_run, samples, target="label")
    assert by_label.targets[:, 0].tolist() == labels


def test_unknown_class_is_one_clear_error(scene_run, photos):
    with pytest.raises(ConfigError, match=r"unknown class index 12: aff-b1-s0 has 10 classes \(0-9\)"):
        gradcam_grid(scene_run, photos[:1], target=12)
    with pytest.raises(ConfigError, match=r"unknown class 'Hat' for aff-b1-s0; its classes: T-shirt/top, Trouser"):
        gradcam_grid(scene_run, photos[:1], target="Hat")
    assert gradcam_grid(scene_run, photos[:1], target="Bag").targets[0, 0] == 8


# --- attention maps -----------------------------------------------------------------------------------------------

def test_attention_maps_per_stage(aff8, photos, tmp_path):
    x = _inputs(aff8, photos[:1])
    with torch.no_grad():
        before = aff8.model(x)
    res = attention_maps(aff8, photos[0], output=tmp_path / "att.png")
    with torch.no_grad():
        assert torch.equal(aff8.model(x), before)  # the hooks are gone and changed nothing
    assert [(m.name, m.stage, m.size, m.channels) for m in res.maps] == [
        ("layer1.0.fusion.mscam", "layer1", (64, 64), 16), ("layer2.0.fusion.mscam", "layer2", (32, 32), 32),
        ("layer3.0.fusion.mscam", "layer3", (16, 16), 64)]
    for m in res.maps:
        assert (m.weight > 0).all() and (m.weight < 1).all()
        assert m.kinds == {"local_att": "local", "global_att": "global"}
        assert m.branches["local_att"].shape == m.size and m.branches["global_att"].shape == (1, 1)
        # The local and global contributions add up to the pre-sigmoid total.
        np.testing.assert_allclose(m.branches["local_att"] + m.branches["global_att"], m.logit, atol=1e-5)
        assert m.channel_logits["global_att"].shape == (m.channels,)
        assert 0 <= m.local_share <= 1
    assert res.path.is_file() and len([a for a in res.figure.axes if a.get_images() or a.patches]) >= 3 * 3


def test_attention_maps_equal_the_mscam_formula(photos):
    """The hooked maps against the MS-CAM's written-out weight on the block's own input."""
    torch.manual_seed(0)
    cm = load_model("iaff_cifar_resnet8", model_kwargs=TINY, img_size=32)
    seen = {}
    mscam = cm.model.get_submodule("layer2.0.fusion.mscam2")
    handle = mscam.local_att.register_forward_pre_hook(lambda _m, inp: seen.setdefault("z", inp[0].clone()))
    try:
        res = attention_maps(cm, photos[1])
    finally:
        handle.remove()
    assert [m.name.rsplit(".", 1)[1] for m in res.maps] == ["mscam1", "mscam2"] * 3
    (m,) = [m for m in res.maps if m.name == "layer2.0.fusion.mscam2"]
    with torch.no_grad():
        w = mscam.formula(seen["z"][:1])[0].mean(0).numpy()
    np.testing.assert_allclose(m.weight, w, atol=1e-6)


@pytest.mark.parametrize(("fusion", "kinds", "share"), [
    ("aff_global_global", {"global_att": "global", "global_att2": "global"}, False),
    ("half_aff", {"local_att": "local", "global_att": "global"}, False),
    ("ms_se", {"local_att": "local", "global_att": "global"}, True),
])
def test_attention_maps_of_other_fusions(fusion, kinds, share, photos):
    cm = load_model("cifar_resnet8", model_kwargs=dict(TINY, fusion=fusion), img_size=32)
    res = attention_maps(cm, photos[2])
    assert len(res.maps) == 3
    for m in res.maps:
        assert m.kinds == kinds and (m.weight > 0).all() and (m.weight < 1).all()
        assert (m.local_share is not None) == share
        if fusion == "aff_global_global":  # one weight per channel: the map is flat
            assert np.ptp(m.weight) < 1e-6


def test_attention_of_the_same_layer_family(photos):
    cm = load_model("aff_cifar_inception_resnet8", model_kwargs=TINY, img_size=32)
    res = attention_maps(cm, photos[0])
    # The stem's cell, then the two cells of each block; every cell fuses its two convolutions.
    assert [m.stage for m in res.maps] == ["conv1", "layer1", "layer1", "layer2", "layer2", "layer3", "layer3"]
    assert all((m.weight > 0).all() and (m.weight < 1).all() for m in res.maps)


def test_attention_without_mscam_is_one_clear_error(photos):
    cm = load_model("cifar_resnet8", model_kwargs=TINY, img_size=32)
    with pytest.raises(CamError, match=r"cifar_resnet8 has no MS-CAM fusion blocks"):
        attention_maps(cm, photos[0])


# --- the localisation score -------------------------------------------------------------------------------------

def test_localisation_score_of_hand_made_maps():
    box = (2, 3, 5, 7)  # x 2..4, y 3..6: 3 x 4 = 12 of 100 pixels
    cams = np.zeros((5, 10, 10))
    cams[0, 3:7, 2:5] = np.linspace(0.1, 1, 12).reshape(4, 3)  # all inside
    cams[1] = 0.5  # uniform: its maximum is pixel (0, 0), outside
    cams[2, 9, 9] = 1.0  # the peak outside, half the energy inside
    cams[2, 4, 3] = cams[2, 5, 3] = cams[2, 4, 4] = cams[2, 5, 4] = 0.25
    cams[3, 6, 4] = 1.0  # the peak on the box's last pixel
    cams[3, 7, 5] = 0.5  # just outside (the ends are exclusive)
    loc = localisation_score(cams, [box] * 5)
    np.testing.assert_allclose(loc.energy, [1.0, 0.12, 0.5, 1 / 1.5, 0.0])
    assert loc.hit.tolist() == [True, False, False, True, False]
    assert loc.empty.tolist() == [False, False, False, False, True]  # an all-zero map scores nothing
    np.testing.assert_allclose(loc.box_fraction, 0.12)
    assert loc.energy_mean == pytest.approx((1 + 0.12 + 0.5 + 1 / 1.5) / 5) and loc.pointing == pytest.approx(0.4)
    # The pointing game's tolerance grows the box: pixel (9, 9) lies 5 px right of it, (0, 0) 3 px above it.
    assert localisation_score(cams, [box] * 5, tolerance=2).hit.tolist() == [True, False, False, True, False]
    assert localisation_score(cams, [box] * 5, tolerance=3).hit.tolist() == [True, True, False, True, False]
    assert localisation_score(cams, [box] * 5, tolerance=5).hit.tolist() == [True, True, True, True, False]
    # A box scaled by a resize (fractional edges): pixels whose centre is inside count.
    half = localisation_score(cams[:1], [(1.9, 2.6, 5.1, 7.4)])
    assert half.energy[0] == pytest.approx(1.0) and half.box_fraction[0] == pytest.approx(0.12)
    with pytest.raises(ValueError, match="non-negative"):
        localisation_score(-cams, [box] * 5)


def test_score_models_on_scenes(scene_run, fm_dir):
    samples = scene_samples(range(16), canvas=48, data_dir=fm_dir)
    (row,) = score_models(scene_run, samples, correct_only=False)
    assert row["n"] == row["scored"] == 16 and 0 <= row["top1"] <= 1
    assert 0 <= row["energy_model"] <= 1 and 0 <= row["pointing_model"] <= 1
    # By hand from the maps of the predicted classes, on every scene.
    cm = load_model(scene_run)
    prep = [cam._preprocess(s, cm) for s in samples]
    maps, _ = compute_cams(cm, torch.cat([p[1] for p in prep]))
    expected = localisation_score(maps, [p[2] for p in prep])
    assert row["energy_model"] == pytest.approx(expected.energy_mean)
    assert row["pointing_model"] == pytest.approx(expected.pointing)
    boxes = np.asarray([s.box for s in samples], dtype=float)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 48 ** 2
    assert row["box_fraction"] == pytest.approx(area.mean())
    assert row["energy_uniform"] == pytest.approx(area.mean(), abs=1e-5)  # a uniform map's energy: the box's share
    assert row["energy_gain"] == pytest.approx(row["energy_model"] - row["energy_brightness"])
    with pytest.raises(ConfigError, match="2 weight sources for 1 models"):
        score_models(scene_run, samples, weights=[None, None])


# --- a study ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, fm_dir) -> Path:
    """Two runs (add, aff; 8 steps each) of a study on fashion-mnist-scenes at 32 px, plus one that never finished."""
    root = tmp_path_factory.mktemp("study")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        model="cifar_resnet8", model_kwargs=TINY, data="fashion-mnist-scenes", img_size=32, epochs=1, batch_size=32,
        lr=0.1, sched="cosine", aug="crop-flip", crop_padding=2, workers=0)))
    out = root / "s"
    run_study(out, fusions="add,aff", depths="1", seeds=1, data=f"fashion-mnist-scenes:{fm_dir}", recipe=str(recipe),
              limit_train=256, limit_val=64, threads=1, progress=False)
    late = out / "runs" / "aff-b1-s1"
    late.mkdir()
    cfg = yaml.safe_load((out / "runs" / "aff-b1-s0" / "config.yaml").read_text())
    (late / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": 1, "output": str(late)}))
    return out


def test_study_is_scored_per_fusion_type(tiny_study, tmp_path, capsys):
    res = score_study(tiny_study, tmp_path / "cam", limit=48, road_limit=3, grid_indices=[0, 1, 2], progress=False)
    assert [(r["run"], r["set"], r["fusion"], r["seed"], r["n"]) for r in res.runs] == [
        ("add-b1-s0", "cluttered", "add", 0, 48), ("add-b1-s0", "clean", "add", 0, 48),
        ("aff-b1-s0", "cluttered", "aff", 0, 48), ("aff-b1-s0", "clean", "aff", 0, 48)]
    assert res.skipped == ["aff-b1-s1: unfinished (0 of 1 epochs)"]
    assert [(g["set"], g["fusion"], g["b"], g["n_runs"]) for g in res.groups] == [
        ("cluttered", "add", 1, 1), ("cluttered", "aff", 1, 1), ("clean", "add", 1, 1), ("clean", "aff", 1, 1)]
    st = res.settings
    assert st["canvas"] == 32 and st["target_layer"] == "act_final" and st["split"] == "test"
    assert st["sides"] == [14, 22] and st["bins"] == [[14, 16], [17, 18], [19, 20], [21, 22]]
    assert st["machine"].startswith(f"{os.cpu_count()}-core ") and st["wall_s"] > 0
    # The study's numbers are those of scoring the run folder directly, on the correctly classified scenes.
    run = res.runs[2]
    samples = scene_samples(range(48), canvas=32, split="test", data_dir=run["data_dir"])
    (direct,) = score_models(str(tiny_study / "runs" / "aff-b1-s0"), samples, road_limit=3,
                             bins=size_bins(14, 22, 4))
    for k in ("correct", "scored", "energy_model", "energy_brightness", "pointing_model", "road_model", "road_centre"):
        assert run[k] == pytest.approx(direct[k]), k
    assert run["scored"] == run["correct"] > 0 and run["road_scored"] == min(3, run["correct"])
    assert [b["n"] for b in run["bins"]] == [b["n"] for b in direct["bins"]] and sum(b["n"] for b in run["bins"]) == 48
    g = res.groups[1]
    assert g["energy_model"]["mean"] == pytest.approx(direct["energy_model"]) and g["energy_model"]["std"] is None
    # The clean set: the same items at the same places, without clutter.
    clean = scene_samples(range(48), canvas=32, split="test", data_dir=run["data_dir"], clutter=(0, 0))
    assert [(s.side, s.label) for s in clean] == [(s.side, s.label) for s in samples]
    for a, b in zip(samples, clean, strict=True):  # occlusion only hides foreground: the box can only grow
        assert b.box[0] <= a.box[0] and b.box[1] <= a.box[1] and b.box[2] >= a.box[2] and b.box[3] >= a.box[3]
    (direct_clean,) = score_models(str(tiny_study / "runs" / "aff-b1-s0"), clean, road_limit=3)
    assert res.runs[3]["energy_model"] == pytest.approx(direct_clean["energy_model"])
    assert set(res.paths) == {"md", "csv", "json", "grid"} and all(p.is_file() for p in res.paths.values())
    with res.paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["set"]) for r in rows] == [(r["run"], r["set"]) for r in res.runs]
    assert float(rows[2]["energy_model"]) == pytest.approx(direct["energy_model"], abs=1e-6)
    assert rows[2]["bin0_sides"] == "14-16" and int(rows[2]["bin0_n"]) == direct["bins"][0]["n"]
    doc = json.loads(res.paths["json"].read_text())
    assert doc["settings"]["scenes"] == 48 and len(doc["groups"]) == 4 and doc["skipped"] == res.skipped
    md = res.paths["md"].read_text()
    assert f"`openaff cam --study {tiny_study} -o {tmp_path / 'cam'} --limit 48 --road-limit 3 --grid-indices 0,1,2`" \
        in md
    assert f"Machine: {st['machine']}; wall time " in md
    assert "## Cluttered scenes" in md and "## The same scenes without clutter" in md and "ROAD (clean):" in md
    assert md.count(f"| aff | 1 | 1 | {run['correct']} / 48 | {100 * run['energy_model']:.1f} | "
                    f"{100 * run['energy_brightness']:.1f} |") == 1
    assert "| fusion | b | 14-16 px | 17-18 px | 19-20 px | 21-22 px |" in md
    with Image.open(res.paths["grid"]) as img:
        assert img.size[0] > img.size[1] / 3  # 3 scene rows x 2 fusion columns
    # The command prints the tables and writes the same files.
    assert main(["cam", "--study", str(tiny_study), "-o", str(tmp_path / "cli"), "--limit", "48", "--road-limit", "3",
                 "--grid-indices", "0,1,2"]) == 0
    printed = capsys.readouterr().out
    assert "## Cluttered scenes" in printed and "cam: aff-b1-s0 clean: " in printed
    assert (tmp_path / "cli" / "localisation.csv").read_text() == res.paths["csv"].read_text()


def test_study_grid_has_one_column_per_fusion(tiny_study, tmp_path, monkeypatch):
    seen = {}
    real = cam.gradcam_grid

    def spy(models, samples, **kwargs):
        grid = real(models, samples, **kwargs)
        seen.update(models=models, rows=len(samples), axes=len(grid.figure.axes), titles=kwargs["titles"])
        return grid

    monkeypatch.setattr(cam.study, "gradcam_grid", spy)  # where score_study looks it up
    score_study(tiny_study, tmp_path, limit=8, sets=["cluttered"], road_limit=0, grid_indices=[3, 4], progress=False)
    assert seen["rows"] == 2 and seen["axes"] == 4 and seen["titles"] == ["add s0", "aff s0"]


# --- the commands: output and one-line errors --------------------------------------------------------------------

def test_cam_command_writes_the_grid(tmp_path, capsys, fm_dir):
    out = tmp_path / "g.png"
    assert main(["cam", "aff_cifar_resnet8", "cifar_resnet8", "--model-kwargs", "width_mult=0.125", "in_chans=1",
                 "num_classes=10", "--data", "fashion-mnist-scenes", "--data-dir", str(fm_dir), "--indices", "0,2-3",
                 "--img-size", "32", "-o", str(out), "--method", "gradcam++"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 2 + 1 and lines[-1].startswith(f"wrote {out} (3 x 2 panels, gradcam++ at act_final)")
    assert lines[0].startswith("scene 0 (") and out.is_file()


def test_attention_command(tmp_path, capsys):
    img = tmp_path / "astronaut.png"
    Image.fromarray(photo_samples(["astronaut"])[0].image).resize((48, 48)).save(img)
    out = tmp_path / "a.png"
    argv = ["attention", "iaff_cifar_resnet8", str(img), "--model-kwargs", "width_mult=0.125", "-o", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and lines[0].startswith("layer1.0.fusion.mscam1\t32x32\tw mean 0.")
    assert out.is_file()


def _error(argv: list[str], capsys) -> str:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own exits (a bad option value)
        rc = exit_.code
    assert rc == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, scene_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.txt").write_text("not an image\n")
    (root / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image data")
    (root / "empty").mkdir()
    torch.manual_seed(0)
    other = timm.create_model("cifar_resnext11_32x4d", width_mult=0.25, num_classes=10)
    save_file(other.state_dict(), str(root / "plain.safetensors"))  # no model recorded
    return dict(root=root, run=scene_run)


@pytest.mark.parametrize(("argv", "expected"), [
    (["cam", "aff_cifar_resnet8", "--images", "{root}/notes.txt"], r"cannot read image \S*notes.txt: not an image"),
    (["cam", "aff_cifar_resnet8", "--images", "{root}/fake.png"], r"cannot read image \S*fake.png: not an image file"),
    (["cam", "{run}", "--data", "photos", "--target-class", "12"], r"unknown class index 12: aff-b1-s0 has 10 classes"),
    (["cam", "cifar_resnext11_32x4d", "--weights", "{run}/model.safetensors", "--data", "photos"],
     r"model.safetensors holds aff_cifar_resnet8, not cifar_resnext11_32x4d"),
    (["cam", "aff_cifar_resnet8", "--weights", "{root}/plain.safetensors", "--model-kwargs", "num_classes=10",
      "--data", "photos"], r"the weights in \S*plain.safetensors do not fit aff_cifar_resnet8: \d+ missing"),
    (["cam", "aff_resnet_51", "--data", "photos"], r"unknown model 'aff_resnet_51' \(`openaff models` lists ours"),
    (["cam", "aff_cifar_resnet8", "--images", "{root}/no/such/folder"], r"image path \S*no/such/folder does not exist"),
    (["cam", "aff_cifar_resnet8", "--images", "{root}/empty"], r"image folder \S*empty holds no image files"),
    (["cam", "{root}/no/such/run", "--data", "photos"], r"weight source \S*no/such/run does not exist"),
    (["cam", "--study", "{root}/no/such/study"], r"study folder \S*no/such/study does not exist"),
    (["cam", "--study", "{root}/empty"], r"\S*empty is not a study folder: it has no runs/"),
    (["cam", "--study", "{root}/empty", "--target-class", "label"],
     r"--study scores maps of the predicted class on correctly classified scenes; drop --target-class"),
    (["cam", "--study", "{root}/empty", "--sets", "cluttered,busy"],
     r"unknown scene set 'busy'; choose from cluttered, clean"),
    (["cam", "--study", "{root}/empty", "--road-limit", "some"], r"--road-limit: must be a number of scenes or 'all'"),
    (["cam", "--study", "{root}/empty", "--size-bins", "0"], r"--size-bins: must be >= 1"),
    (["cam", "aff_cifar_resnet8", "--data", "photos", "--method", "gradcam+"], r"unknown CAM method 'gradcam\+'"),
    (["cam", "aff_cifar_resnet8", "--data", "photos", "--target-layer", "layer9"], r"has no module 'layer9'"),
    (["cam", "aff_cifar_resnet8", "--data", "fashion-mnist-scenes", "--data-dir", "{root}", "--indices", "0"],
     r"Fashion-MNIST file t10k-images-idx3-ubyte\[.gz\] not found in"),
    (["cam", "{run}", "--data", "fashion-mnist-scenes", "--indices", "0,x"], r"--indices: expected integers"),
    (["cam", "aff_cifar_resnet8"], r"give the images"),
    (["attention", "cifar_resnet8", "--data", "photos", "--indices", "chelsea", "--model-kwargs", "width_mult=0.125"],
     r"cifar_resnet8 has no MS-CAM fusion blocks"),
    (["attention", "aff_cifar_resnet8", "--data", "photos", "--model-kwargs", "width_mult=0.125"],
     r"openaff attention draws one image; 3 given"),
])
def test_bad_input_is_one_clear_line(argv, expected, bad_files, capsys, tmp_path):
    argv = [a.format(root=bad_files["root"], run=bad_files["run"]) for a in argv]
    if argv[0] == "cam" and "--study" not in argv:
        argv += ["-o", str(tmp_path / "x.png")]
    line = _error(argv, capsys)
    prog = f"openaff {argv[0]}: error: "
    assert line.startswith(prog), line
    assert re.search(expected, line), line
    assert not (tmp_path / "x.png").exists()


def test_python_m_openaff_cam_is_the_cam_command(capsys) -> None:
    from openaff.cam.__main__ import main as cam_main

    with pytest.raises(SystemExit) as exit_info:
        cam_main(["aff_cifar_resnet8", "--nosuch"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("openaff cam: error: unrecognized arguments: --nosuch"), err
