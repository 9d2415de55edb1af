"""The localisation score of maps against object boxes: the energy in the box and the pointing game
(:func:`localisation_score`), per model on images with boxes (:func:`score_models`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..training.errors import ConfigError, DataError
from .gradcam import compute_cams
from .images import Sample, _preprocess
from .models import CamModel, _resolve_class, load_model

__all__ = ["Localisation", "localisation_score", "score_models"]


@dataclass
class Localisation:
    """Per-image localisation of maps against boxes (see :func:`localisation_score`).

    Attributes:
        energy: the fraction of each map's sum inside its box (0 for an all-zero map).
        hit: whether each map's maximum lies in its box (grown by the tolerance); False for an all-zero map.
        box_fraction: the share of the image each box covers (what a uniform map scores on both).
        empty: whether the map is all zero.
    """

    energy: np.ndarray
    hit: np.ndarray
    box_fraction: np.ndarray
    empty: np.ndarray

    @property
    def energy_mean(self) -> float:
        return float(self.energy.mean()) if len(self.energy) else math.nan

    @property
    def pointing(self) -> float:
        return float(self.hit.mean()) if len(self.hit) else math.nan


def localisation_score(cams: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor | Sequence,
                       tolerance: float = 0.0) -> Localisation:
    """The energy-in-box fraction and the pointing-game hits of maps against object boxes.

    Energy (Score-CAM's energy-based pointing game): ``sum(map inside box) / sum(map)``. Pointing game
    (Zhang et al.): whether the map's maximum (the first one, in row-major order) lies inside the box
    grown by ``tolerance`` pixels. A box ``(x0, y0, x1, y1)`` holds pixels ``x0 <= x < x1``, ``y0 <= y < y1``
    (fractional edges, as after a resize, count the pixels whose centre ``x + 0.5`` is inside).

    Args:
        cams: ``B x H x W`` non-negative maps.
        boxes: ``B x 4`` boxes in the maps' pixels.
        tolerance: pointing-game tolerance in pixels.
    """
    cams = np.asarray(cams.detach().cpu() if isinstance(cams, torch.Tensor) else cams, dtype=np.float64)
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if cams.ndim != 3 or boxes.shape != (len(cams), 4):
        raise ValueError(f"expected B x H x W maps and B x 4 boxes, got {cams.shape} and {boxes.shape}")
    if (cams < 0).any():
        raise ValueError("maps must be non-negative")
    b, h, w = cams.shape
    cx, cy = np.arange(w)[None, :] + 0.5, np.arange(h)[None, :] + 0.5

    def inside(grow: float) -> np.ndarray:
        x_in = (cx >= boxes[:, :1] - grow) & (cx < boxes[:, 2:3] + grow)  # B x W
        y_in = (cy >= boxes[:, 1:2] - grow) & (cy < boxes[:, 3:4] + grow)  # B x H
        return y_in[:, :, None] & x_in[:, None, :]

    mask = inside(0.0)
    total = cams.reshape(b, -1).sum(1)
    empty = total <= 0
    energy = np.where(empty, 0.0, (cams * mask).reshape(b, -1).sum(1) / np.where(empty, 1.0, total))
    peak = cams.reshape(b, -1).argmax(1)
    grown = inside(float(tolerance)).reshape(b, -1)
    hit = grown[np.arange(b), peak] & ~empty
    return Localisation(energy, hit, mask.reshape(b, -1).mean(1), empty)


def _score_one(cm: CamModel, samples: list[Sample], method: str, target: str, tolerance: float,
               batch_size: int) -> tuple[dict, Localisation, np.ndarray]:
    prep = [_preprocess(s, cm) for s in samples]
    x = torch.cat([p[1] for p in prep])
    labels = np.asarray([_resolve_class(s.label, cm, "label") for s in samples])
    tg = labels.tolist() if target == "label" else None
    maps, probs = compute_cams(cm, x, tg, method=method, batch_size=batch_size)
    loc = localisation_score(maps, [p[2] for p in prep], tolerance)
    row = dict(model=cm.label, architecture=cm.name, n=len(samples), energy=loc.energy_mean, pointing=loc.pointing,
               top1=float((probs.argmax(1) == labels).mean()), box_fraction=float(loc.box_fraction.mean()),
               empty=int(loc.empty.sum()))
    return row, loc, maps


def score_models(models: Any, samples: Sequence[Sample], *, weights: Sequence[str | Path | None] | None = None,
                 method: str = "gradcam", target: str = "label", tolerance: float = 0.0,
                 model_kwargs: dict | None = None, batch_size: int = 64) -> list[dict]:
    """The localisation score of each model on images with boxes (e.g. :func:`scene_samples`).

    Args:
        models: a model or a list (see :func:`load_model`).
        samples: images with ``label`` and ``box``.
        weights: one weight source (or None) per model.
        method: one of :data:`METHODS`.
        target: ``"label"`` (the map of the true class, the pointing game's rule) or ``"predicted"``.
        tolerance: pointing-game tolerance in pixels.
        model_kwargs: ``timm.create_model`` keywords for models built by name.
        batch_size: images per pass.

    Returns:
        One row per model: ``model``, ``n``, ``energy`` (mean fraction in the box), ``pointing`` (hit
        rate), ``top1`` (accuracy on these images), ``box_fraction`` (the uniform map's score), ``empty``.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    samples = list(samples)
    if target not in ("label", "predicted"):
        raise ConfigError(f"the localisation target must be 'label' or 'predicted', got {target!r}")
    lacking = [s.name for s in samples if s.box is None or s.label is None]
    if lacking or not samples:
        raise DataError(f"the localisation score needs images with a box and a label; {lacking[0]} has none"
                        if lacking else "no images to score")
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"{len(weights)} weight sources for {len(models)} models: give one per model (None for "
                          "a model's own or random weights)")
    rows = []
    for j, m in enumerate(models):
        cm = load_model(m, None if weights is None else weights[j], model_kwargs=model_kwargs)
        rows.append(_score_one(cm, samples, method, target, tolerance, batch_size)[0])
    return rows
