"""The localisation score of maps against object boxes: the energy in the box and the pointing game
(:func:`localisation_score`; per model beside baseline maps: :mod:`.scoring`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Localisation", "localisation_score"]


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
