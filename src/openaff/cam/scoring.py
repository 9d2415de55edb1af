"""A model's maps on scenes with boxes, scored beside the baseline maps on the same scenes.

:func:`score_scenes` makes, per scene, the model's map (of the predicted class by default) and the baseline maps
(:mod:`.baselines`), and scores each: the energy in the box and the pointing game (:func:`localisation_score`),
and ROAD (:func:`road_scores`) on the first ``road_limit`` of the scenes it summarises. :func:`summarise` keeps
the correctly classified scenes (by default), averages, and splits by the item's pasted side
(:func:`size_bins`); :func:`score_models` does both for a list of models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError, check_int
from .baselines import BASELINES, baseline_maps
from .faithfulness import ROAD_PERCENTILES, road_scores
from .gradcam import compute_cams
from .images import Sample, _preprocess
from .localisation import localisation_score
from .models import CamModel, _resolve_class, load_model

__all__ = ["SceneScores", "score_models", "score_scenes", "size_bins", "summarise"]


@dataclass
class SceneScores:
    """Per-scene scores of one model's maps and of the baseline maps (see :func:`score_scenes`).

    Attributes:
        model: the model's label.
        label: the true class of each scene.
        predicted: the model's class.
        target: the class the model's map explains.
        side: the item's pasted side (the samples' pixels), or None where unknown.
        energy: map name (``model`` and each baseline) -> the share of its sum inside the box, per scene.
        hit: map name -> whether its maximum lies in the box (grown by the tolerance).
        road: map name -> ROAD score per scene (NaN where not measured).
        box_fraction: the share of the image each box covers.
        empty: whether the model's map is all zero.
    """

    model: str
    label: np.ndarray
    predicted: np.ndarray
    target: np.ndarray
    side: np.ndarray | None
    energy: dict[str, np.ndarray]
    hit: dict[str, np.ndarray]
    road: dict[str, np.ndarray]
    box_fraction: np.ndarray
    empty: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.label

    @property
    def maps(self) -> list[str]:
        return list(self.energy)


def _check_samples(samples: Sequence[Sample]) -> list[Sample]:
    samples = list(samples)
    lacking = [s.name for s in samples if s.box is None or s.label is None]
    if lacking or not samples:
        raise DataError(f"the localisation score needs images with a box and a label; {lacking[0]} has none"
                        if lacking else "no images to score")
    return samples


def _check_limit(value: int | None, what: str) -> int | None:
    return value if value is None else check_int(value, f"{what} must be a number of scenes >= 0 (or None for all)",
                                                 lo=0)


def score_scenes(cm: CamModel, samples: Sequence[Sample], *, method: str = "gradcam", target: str = "predicted",
                 baselines: Sequence[str] = BASELINES, centre_sigma: float | None = None, correct_only: bool = True,
                 road_limit: int | None = 0, road_percentiles: Sequence[int] = ROAD_PERCENTILES,
                 road_cache: dict | None = None, tolerance: float = 0.0, batch_size: int = 64) -> SceneScores:
    """The model's maps and the baseline maps of ``samples``, scored against their boxes.

    Energy in box and pointing are scored on every scene; ROAD on the first ``road_limit`` scenes that
    :func:`summarise` keeps (the correctly classified ones with ``correct_only``), for the model's map and each
    baseline, against the class the model's map explains.

    Args:
        cm: the model (see :func:`load_model`).
        samples: images with ``label`` and ``box`` (e.g. :func:`scene_samples`).
        method: one of :data:`METHODS`.
        target: ``"predicted"`` (the map of the model's class) or ``"label"`` (of the true class).
        baselines: the baseline maps to score beside (see :data:`BASELINES`).
        centre_sigma: the centre prior's standard deviation in pixels (default: a quarter of the side).
        correct_only: ROAD only on correctly classified scenes.
        road_limit: how many of those get ROAD (0: none, None: all).
        road_percentiles: ROAD's percentiles.
        road_cache: a dict keeping the baselines' imputed images between calls (see :func:`road_scores`).
        tolerance: pointing-game tolerance in pixels.
        batch_size: images per pass.

    Raises:
        ConfigError: a bad target, method, baseline or limit.
        DataError: images without a box or a label.
    """
    samples = _check_samples(samples)
    if target not in ("label", "predicted"):
        raise ConfigError(f"the localisation target must be 'label' or 'predicted', got {target!r}")
    road_limit = _check_limit(road_limit, "road_limit")
    for kind in baselines:
        if kind not in BASELINES:
            raise ConfigError(f"unknown baseline map {kind!r}; choose from {', '.join(BASELINES)}")
    prep = [_preprocess(s, cm) for s in samples]
    x = torch.cat([p[1] for p in prep])
    displays = np.stack([p[0] for p in prep])
    boxes = [p[2] for p in prep]
    labels = np.asarray([_resolve_class(s.label, cm, "label") for s in samples])
    maps, probs = compute_cams(cm, x, labels.tolist() if target == "label" else None, method=method,
                               batch_size=batch_size)
    predicted = probs.argmax(1)
    chosen = labels if target == "label" else predicted
    all_maps = {"model": maps, **{k: baseline_maps(k, displays, sigma=centre_sigma) for k in baselines}}
    energy, hit, road = {}, {}, {}
    box_fraction = empty = None
    for name, m in all_maps.items():
        loc = localisation_score(m, boxes, tolerance)
        energy[name], hit[name] = loc.energy, loc.hit
        if name == "model":
            box_fraction, empty = loc.box_fraction, loc.empty
        road[name] = np.full(len(samples), np.nan, dtype=np.float64)
    keep = np.flatnonzero(predicted == labels) if correct_only else np.arange(len(samples))
    if road_limit != 0:
        keep = keep[:road_limit] if road_limit is not None else keep
        for name, m in all_maps.items():
            road[name][keep] = road_scores(cm, x[keep], m[keep], chosen[keep].tolist(), percentiles=road_percentiles,
                                           cache=None if name == "model" else road_cache, batch_size=batch_size)
    sides = [s.side for s in samples]
    side = None if any(v is None for v in sides) else np.asarray(sides, dtype=np.int64)
    return SceneScores(cm.label, labels, predicted, chosen, side, energy, hit, road, box_fraction, empty)


def size_bins(lo: int, hi: int, k: int = 4) -> list[tuple[int, int]]:
    """``k`` bins of integer sides ``lo..hi`` (inclusive), as equal in width as integers allow: ``(first, last)``.

    Args:
        lo: the smallest side.
        hi: the largest side.
        k: the number of bins (at most ``hi - lo + 1``).
    """
    check_int(k, "the number of size bins must be a positive integer")
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))) or lo > hi:
        raise ConfigError(f"size bins need integer sides lo <= hi, got {lo!r} and {hi!r}")
    if k > hi - lo + 1:
        raise ConfigError(f"{k} size bins for the {hi - lo + 1} sides {lo}-{hi}: at most one bin per side")
    return [(int(a[0]), int(a[-1])) for a in np.array_split(np.arange(lo, hi + 1), k)]


def _mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return float(values.mean()) if len(values) else None


def _means(scores: SceneScores, sel: np.ndarray) -> dict[str, Any]:
    """The mean of every score over the scenes ``sel``, and each map's gain over the brightness map."""
    row: dict[str, Any] = dict(scored=int(sel.sum()))
    for name in scores.maps:
        row[f"energy_{name}"] = _mean(scores.energy[name][sel])
        row[f"pointing_{name}"] = _mean(scores.hit[name][sel].astype(np.float64))
        row[f"road_{name}"] = _mean(scores.road[name][sel])
    measured = sel & np.isfinite(scores.road["model"])
    row["road_scored"] = int(measured.sum())
    if "brightness" in scores.maps:
        # Per-scene differences, so that a map is compared with the brightness map on the same scenes.
        row["energy_gain"] = _mean(scores.energy["model"][sel] - scores.energy["brightness"][sel])
        row["pointing_gain"] = _mean(scores.hit["model"][sel].astype(np.float64)
                                     - scores.hit["brightness"][sel].astype(np.float64))
        row["road_gain"] = _mean(scores.road["model"][measured] - scores.road["brightness"][measured])
    return row


def summarise(scores: SceneScores, *, correct_only: bool = True, bins: Sequence[tuple[int, int]] | None = None
              ) -> dict[str, Any]:
    """Means of :func:`score_scenes`'s scores over the correctly classified scenes (all with ``correct_only=False``).

    Args:
        scores: what :func:`score_scenes` gave.
        correct_only: keep only the scenes the model classifies correctly.
        bins: ``(first, last)`` pasted sides (see :func:`size_bins`): the same means per bin, under ``bins``.

    Returns:
        ``model``, ``n`` (scenes), ``correct``, ``top1``, ``scored`` (scenes averaged over), ``empty``,
        ``box_fraction``; ``energy_X``, ``pointing_X``, ``road_X`` for the model's map (``X = model``) and each
        baseline; ``energy_gain``, ``pointing_gain``, ``road_gain`` (model minus brightness, scene by scene);
        ``road_scored``; and ``bins``: a list of the same per bin with ``first``, ``last``, ``n``, ``correct``.

    Raises:
        DataError: bins for scenes without their sides.
    """
    correct = scores.correct
    sel = correct if correct_only else np.ones(len(correct), dtype=bool)
    row: dict[str, Any] = dict(model=scores.model, n=len(correct), correct=int(correct.sum()),
                               top1=float(correct.mean()), correct_only=correct_only,
                               empty=int(scores.empty[sel].sum()), box_fraction=_mean(scores.box_fraction[sel]))
    row.update(_means(scores, sel))
    if bins is not None:
        if scores.side is None:
            raise DataError("size bins need the scenes' pasted sides (samples from scene_samples)")
        row["bins"] = []
        for first, last in bins:
            inside = (scores.side >= first) & (scores.side <= last)
            b = dict(first=int(first), last=int(last), n=int(inside.sum()), correct=int((inside & correct).sum()),
                     top1=_mean(correct[inside].astype(np.float64)))
            b.update(_means(scores, inside & sel))
            row["bins"].append(b)
    return row


def score_models(models: Any, samples: Sequence[Sample], *, weights: Sequence[str | Path | None] | None = None,
                 method: str = "gradcam", target: str = "predicted", correct_only: bool = True,
                 baselines: Sequence[str] = BASELINES, road_limit: int | None = 0,
                 bins: Sequence[tuple[int, int]] | None = None, tolerance: float = 0.0,
                 model_kwargs: dict | None = None, batch_size: int = 64) -> list[dict]:
    """The localisation (and ROAD) scores of each model beside the baseline maps, on images with boxes.

    Args:
        models: a model or a list (see :func:`load_model`).
        samples: images with ``label`` and ``box`` (e.g. :func:`scene_samples`).
        weights: one weight source (or None) per model.
        method: one of :data:`METHODS`.
        target: ``"predicted"`` (the map of the model's class) or ``"label"`` (of the true class).
        correct_only: average over the correctly classified scenes only.
        baselines: the baseline maps scored beside each model.
        road_limit: how many of the averaged scenes get ROAD (0: none, None: all).
        bins: pasted-side bins (see :func:`size_bins`).
        tolerance: pointing-game tolerance in pixels.
        model_kwargs: ``timm.create_model`` keywords for models built by name.
        batch_size: images per pass.

    Returns:
        One :func:`summarise` row per model.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    samples = _check_samples(samples)
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"{len(weights)} weight sources for {len(models)} models: give one per model (None for "
                          "a model's own or random weights)")
    rows, cache = [], {}
    for j, m in enumerate(models):
        cm = load_model(m, None if weights is None else weights[j], model_kwargs=model_kwargs)
        scores = score_scenes(cm, samples, method=method, target=target, baselines=baselines,
                              correct_only=correct_only, road_limit=road_limit, road_cache=cache, tolerance=tolerance,
                              batch_size=batch_size)
        row = summarise(scores, correct_only=correct_only, bins=bins)
        rows.append(dict(row, architecture=cm.name))
    return rows

