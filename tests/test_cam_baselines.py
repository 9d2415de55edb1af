"""The CAM scores' references: baseline maps on a hand-made scene, predicted-class and correct-only scoring, size
bins, and ROAD (pytorch-grad-cam's faithfulness metric) on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from openaff.cam import (
    SceneScores,
    baseline_maps,
    brightness_map,
    centre_prior,
    compute_cams,
    load_model,
    localisation_score,
    road_scores,
    scene_samples,
    score_scenes,
    size_bins,
    summarise,
    uniform_map,
)
from openaff.cam.images import Sample, _preprocess
from openaff.errors import ConfigError, DataError

pytest.importorskip("pytorch_grad_cam")


# --- the baseline maps on a hand-made scene ------------------------------------------------------------------------

def _scene() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A 10 x 10 grey canvas (0.2) with a bright 3 x 4 item in box (2, 3, 5, 7) and one bright clutter pixel."""
    img = np.full((10, 10), 0.2)
    img[3:7, 2:5] = np.linspace(0.5, 1.0, 12).reshape(4, 3)  # the item: 12 of 100 pixels, its peak at (6, 4)
    img[9, 9] = 0.9  # clutter, outside the box
    return img, (2, 3, 5, 7)


def test_baseline_maps_score_as_computed_by_hand():
    img, box = _scene()
    maps = {k: baseline_maps(k, img[None]) for k in ("brightness", "centre", "uniform")}
    loc = {k: localisation_score(m, [box]) for k, m in maps.items()}
    # Brightness: the image minus its median (0.2), clipped at 0: the item's excess and the clutter pixel's 0.7.
    item = np.linspace(0.5, 1.0, 12) - 0.2
    assert loc["brightness"].energy[0] == pytest.approx(item.sum() / (item.sum() + 0.7))
    assert loc["brightness"].hit[0]  # its maximum is the item's brightest pixel
    np.testing.assert_allclose(maps["brightness"][0].max(), 1.0)
    # Centre: a Gaussian of sigma 10 / 4 = 2.5 px at the canvas centre (5, 5).
    c = np.arange(10) + 0.5 - 5
    g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * 2.5 ** 2))
    assert loc["centre"].energy[0] == pytest.approx(g[3:7, 2:5].sum() / g.sum())
    assert loc["centre"].hit[0]  # its (first) maximum, pixel (4, 4), lies in the box
    assert not localisation_score(centre_prior(img[None], sigma=2.5), [(6, 0, 10, 3)]).hit[0]
    # Uniform: energy is the box's share of the canvas; its maximum a random pixel (ties broken by a jitter).
    assert loc["uniform"].energy[0] == pytest.approx(0.12, abs=1e-6)
    hits = localisation_score(uniform_map(np.random.default_rng(0).random((400, 10, 10))), [box] * 400).pointing
    assert 0.06 < hits < 0.2  # about 12 % of random pixels fall in the box
    np.testing.assert_array_equal(uniform_map(img[None]), uniform_map(img[None]))  # seeded by the image


def test_brightness_map_of_a_colour_image_and_flat_images():
    img, box = _scene()
    colour = np.stack([img, img, img], -1)[None]
    np.testing.assert_allclose(brightness_map(colour), brightness_map(img[None]), atol=1e-6)
    flat = brightness_map(np.full((1, 8, 8), 0.3))
    assert (flat == 0).all()  # nothing above the median: an all-zero map, scored 0 (empty)
    assert localisation_score(flat, [box]).empty[0]


def test_baseline_maps_bad_input_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"unknown baseline map 'edges'; choose from brightness, centre, uniform"):
        baseline_maps("edges", np.zeros((1, 4, 4)))
    with pytest.raises(ConfigError, match=r"baseline maps need B x H x W or B x H x W x C images, got shape \(4, 4\)"):
        brightness_map(np.zeros((4, 4)))
    with pytest.raises(ConfigError, match=r"centre prior's sigma must be a positive number of pixels, got -1"):
        centre_prior(np.zeros((1, 4, 4)), sigma=-1)


# --- size bins ------------------------------------------------------------------------------------------------------

def test_size_bins():
    assert size_bins(14, 33, 4) == [(14, 18), (19, 23), (24, 28), (29, 33)]
    assert size_bins(10, 20, 3) == [(10, 13), (14, 17), (18, 20)]  # 11 sides: 4, 4, 3
    assert size_bins(14, 15, 2) == [(14, 14), (15, 15)] and size_bins(5, 9, 1) == [(5, 9)]
    with pytest.raises(ConfigError, match=r"3 size bins for the 2 sides 14-15: at most one bin per side"):
        size_bins(14, 15, 3)
    with pytest.raises(ConfigError, match=r"number of size bins must be a positive integer, got 0"):
        size_bins(14, 33, 0)
    with pytest.raises(ConfigError, match=r"size bins need integer sides lo <= hi, got 20 and 10"):
        size_bins(20, 10)


def _hand_made_scores() -> SceneScores:
    """Six scenes: sides 14, 15, 18, 19, 25, 30; scenes 1, 3 and 4 misclassified."""
    label = np.array([0, 1, 2, 3, 4, 5])
    predicted = np.array([0, 9, 2, 9, 9, 5])
    energy = dict(model=np.array([0.5, 0.9, 0.7, 0.1, 0.2, 0.6]), brightness=np.array([0.4, 0.4, 0.5, 0.5, 0.5, 0.8]))
    hit = dict(model=np.array([1, 1, 0, 1, 0, 1], bool), brightness=np.array([0, 1, 1, 1, 1, 1], bool))
    road = dict(model=np.array([0.3, np.nan, 0.1, np.nan, np.nan, np.nan]),
                brightness=np.array([0.1, np.nan, 0.2, np.nan, np.nan, np.nan]))
    return SceneScores("hand", label, predicted, predicted, np.array([14, 15, 18, 19, 25, 30]), energy, hit, road,
                       np.full(6, 0.1), np.zeros(6, bool))


def test_summarise_keeps_the_correct_scenes_and_splits_by_size():
    row = summarise(_hand_made_scores(), bins=[(14, 16), (17, 22), (23, 30)])
    assert (row["n"], row["correct"], row["scored"], row["road_scored"]) == (6, 3, 3, 2)
    assert row["top1"] == pytest.approx(0.5)
    assert row["energy_model"] == pytest.approx((0.5 + 0.7 + 0.6) / 3)  # scenes 0, 2, 5
    assert row["energy_brightness"] == pytest.approx((0.4 + 0.5 + 0.8) / 3)
    assert row["energy_gain"] == pytest.approx((0.1 + 0.2 - 0.2) / 3)
    assert row["pointing_model"] == pytest.approx(2 / 3) and row["pointing_gain"] == pytest.approx(0)
    assert row["road_model"] == pytest.approx(0.2) and row["road_gain"] == pytest.approx((0.2 - 0.1) / 2)
    b0, b1, b2 = row["bins"]
    assert (b0["first"], b0["last"], b0["n"], b0["correct"], b0["scored"]) == (14, 16, 2, 1, 1)
    assert b0["energy_model"] == pytest.approx(0.5) and b0["top1"] == pytest.approx(0.5)
    assert (b1["n"], b1["correct"]) == (2, 1) and b1["energy_gain"] == pytest.approx(0.2)
    assert (b2["n"], b2["correct"]) == (2, 1) and b2["energy_model"] == pytest.approx(0.6)
    assert b2["road_model"] is None and b2["road_scored"] == 0  # scene 5 got no ROAD
    every = summarise(_hand_made_scores(), correct_only=False)
    assert every["scored"] == 6 and every["energy_model"] == pytest.approx(3.0 / 6) and "bins" not in every
    no_sides = _hand_made_scores()
    no_sides.side = None
    with pytest.raises(DataError, match="size bins need the scenes' pasted sides"):
        summarise(no_sides, bins=[(14, 30)])


# --- a tiny model: predicted-class maps, correct-only filtering, ROAD -------------------------------------------------

class LeftHalf(nn.Module):
    """A 3-class net that sees only the left half of its input (a convolution for Grad-CAM's layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.head.weight *= 20  # confident enough that an imputation moves its probabilities
        self.num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x[..., : x.shape[-1] // 2]))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny() -> object:
    return load_model(LeftHalf(), img_size=16)


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, 16, 16)).astype(np.float32))


def test_road_equals_pytorch_grad_cams_roadcombined(tiny, monkeypatch):
    """Without the imputer's noise and with maps free of ties, ours is the library's ROADCombined."""
    from pytorch_grad_cam.metrics import road
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    monkeypatch.setattr(road.torch, "randn_like", torch.zeros_like)
    x = _inputs(4)
    maps = np.random.default_rng(1).random((4, 16, 16)).astype(np.float32)
    targets = [0, 1, 2, 1]
    ours = road_scores(tiny, x, maps, targets, percentiles=(20, 50, 80))
    theirs = ROADCombined(percentiles=[20, 50, 80])(x, maps, [ClassifierOutputSoftmaxTarget(k) for k in targets],
                                                    tiny.model)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.abs(ours).max() > 1e-3  # not trivially zero


def test_road_of_the_half_the_model_sees(tiny, monkeypatch):
    from pytorch_grad_cam.metrics import road

    x = _inputs(6, seed=2)
    left = np.zeros((6, 16, 16), np.float32)
    left[..., :8] = 1  # the half the model sees
    with torch.no_grad():
        p0 = torch.softmax(tiny.model(x), 1)
    targets = p0.argmax(1).tolist()
    on = road_scores(tiny, x, left, targets, percentiles=(50,))
    # Deterministic, whatever the batch; the cache gives the same scores.
    np.testing.assert_array_equal(road_scores(tiny, x[2:4], left[2:4], targets[2:4], percentiles=(50,)), on[2:4])
    cache: dict = {}
    assert road_scores(tiny, x, left, targets, percentiles=(50,), cache=cache).tolist() == on.tolist()
    assert len(cache) == 6 * 2  # an imputed image per scene, for MoRF and for LeRF
    assert road_scores(tiny, x, left, targets, percentiles=(50,), cache=cache).tolist() == on.tolist()
    # Without the imputer's noise: at p = 50 the map of the seen half imputes the ignored half in LeRF (no change)
    # and the seen half in MoRF, its inverse the other way round: scores -d/2 and +d/2, d the change in the target's
    # probability when the left half is imputed (by hand, with the library's imputer).
    monkeypatch.setattr(road.torch, "randn_like", torch.zeros_like)
    on = road_scores(tiny, x, left, targets, percentiles=(50,))
    off = road_scores(tiny, x, 1 - left, targets, percentiles=(50,))
    keep_right = torch.from_numpy(1 - left[0])
    imputed = torch.stack([road.NoisyLinearImputer()(img, keep_right) for img in x])
    with torch.no_grad():
        p1 = torch.softmax(tiny.model(imputed), 1)
    d = (p1 - p0)[torch.arange(6), targets].numpy()
    np.testing.assert_allclose(on, -d / 2, atol=1e-5)
    np.testing.assert_allclose(off, d / 2, atol=1e-5)
    assert np.abs(d).max() > 0.05


def test_road_bad_input_is_one_clear_error(tiny):
    x, maps = _inputs(2), np.zeros((2, 16, 16), np.float32)
    with pytest.raises(ConfigError, match=r"ROAD percentiles must lie strictly between 0 and 100, got \[0, 50\]"):
        road_scores(tiny, x, maps, [0, 1], percentiles=(0, 50))
    with pytest.raises(ConfigError, match=r"ROAD needs B x H x W maps at the input's size; got maps \(2, 8, 8\)"):
        road_scores(tiny, x, maps[:, :8, :8], [0, 1])
    with pytest.raises(ConfigError, match=r"1 target classes for 2 images"):
        road_scores(tiny, x, maps, [0])


def _relabelled(cm, n: int, wrong: set[int]) -> list[Sample]:
    """``n`` hand-made scenes labelled with the model's own class, except those in ``wrong``."""
    rng = np.random.default_rng(3)
    samples = []
    for i in range(n):
        img = (rng.random((16, 16, 1)) * 255).astype(np.uint8)
        samples.append(Sample(img, f"s{i}", 0, (1, 2, 7, 9), side=8 + i % 4))
    with torch.no_grad():
        pred = cm.model(torch.cat([_preprocess(s, cm)[1] for s in samples])).argmax(1).tolist()
    for i, s in enumerate(samples):
        s.label = (pred[i] + 1) % 3 if i in wrong else pred[i]
    return samples


def test_maps_of_the_predicted_class_scored_on_correct_scenes(tiny):
    samples = _relabelled(tiny, 8, wrong={1, 4, 5})
    scores = score_scenes(tiny, samples, road_limit=2)
    assert scores.correct.tolist() == [i not in {1, 4, 5} for i in range(8)]
    np.testing.assert_array_equal(scores.target, scores.predicted)  # the predicted class, also where it is wrong
    x = torch.cat([_preprocess(s, tiny)[1] for s in samples])
    maps, _ = compute_cams(tiny, x, scores.predicted.tolist())
    boxes = [_preprocess(s, tiny)[2] for s in samples]
    np.testing.assert_allclose(scores.energy["model"], localisation_score(maps, boxes).energy, atol=1e-6)
    # ROAD on the first two correct scenes only (0 and 2), for the model and every baseline.
    for name in ("model", "brightness", "centre", "uniform"):
        assert np.isfinite(scores.road[name]).tolist() == [i in (0, 2) for i in range(8)], name
    row = summarise(scores, bins=size_bins(8, 11, 2))
    assert (row["correct"], row["scored"], row["road_scored"]) == (5, 5, 2)
    assert row["energy_model"] == pytest.approx(scores.energy["model"][[0, 2, 3, 6, 7]].mean())
    assert [(b["n"], b["correct"]) for b in row["bins"]] == [(4, 1), (4, 4)]  # sides 8, 9 (scenes 0, 1, 4, 5) | 10, 11
    by_label = score_scenes(tiny, samples, target="label")
    assert by_label.target.tolist() == [s.label for s in samples]
    assert not np.allclose(by_label.energy["model"][1], scores.energy["model"][1])  # scene 1: another class's map


def test_score_scenes_bad_input_is_one_clear_error(tiny):
    samples = _relabelled(tiny, 2, wrong=set())
    with pytest.raises(ConfigError, match=r"the localisation target must be 'label' or 'predicted', got 'true'"):
        score_scenes(tiny, samples, target="true")
    with pytest.raises(ConfigError, match=r"road_limit must be a number of scenes >= 0 \(or None for all\), got -1"):
        score_scenes(tiny, samples, road_limit=-1)
    with pytest.raises(ConfigError, match=r"unknown baseline map 'edges'"):
        score_scenes(tiny, samples, baselines=("edges",))
    with pytest.raises(DataError, match=r"needs images with a box and a label; s0 has none"):
        score_scenes(tiny, [Sample(samples[0].image, "s0", 0)])


def test_scenes_without_clutter_keep_the_item(tmp_path):
    from _train_utils import write_fashion_mnist

    fm = write_fashion_mnist(tmp_path, n_train=64, n_test=64)
    busy = scene_samples(range(16), canvas=32, split="test", data_dir=fm)
    clean = scene_samples(range(16), canvas=32, split="test", data_dir=fm, clutter=(0, 0))
    assert all(s.side is not None and 14 <= s.side <= 22 for s in busy)
    assert [(s.label, s.side) for s in busy] == [(s.label, s.side) for s in clean]
    # Without clutter the canvas is the item on a flat level with noise: brightness finds nearly all of it.
    img = np.stack([s.image[:, :, 0] / 255 for s in clean])
    energy = localisation_score(brightness_map(img), [s.box for s in clean]).energy
    busy_energy = localisation_score(brightness_map(np.stack([s.image[:, :, 0] / 255 for s in busy])),
                                     [s.box for s in busy]).energy
    assert energy.mean() > busy_energy.mean()
