"""Maps that know nothing of a model, scored beside its CAMs: what a score is worth over the image itself.

* ``brightness``: the image minus its median, clipped at 0 (per image, grey level; colour images are averaged
  over channels). On ``fashion-mnist-scenes`` the item is light on a darker canvas, so this map alone puts most
  of its energy in the item's box: a model's map adds something only where it beats this one.
* ``centre``: a Gaussian at the canvas centre (``sigma``: a quarter of the shorter side by default), the
  prior of an object near the middle.
* ``uniform``: a constant map, its ties broken at random by a jitter of 1e-6 (seeded by the image), so that
  its pointing-game maximum and its ROAD order are a random pixel and a random order; its energy in a box is
  the box's share of the image (to 1e-6).

No library provides these (pytorch-grad-cam scores CAMs, not reference maps); they are a few lines each.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import ConfigError, check_number

__all__ = ["BASELINES", "baseline_maps", "brightness_map", "centre_prior", "uniform_map"]

BASELINES = ("brightness", "centre", "uniform")
JITTER = 1e-6  # the uniform map's tie-breaking amplitude


def _images(images: np.ndarray) -> np.ndarray:
    """``B x H x W`` grey levels from ``B x H x W`` or ``B x H x W x C`` images."""
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 4:
        arr = arr.mean(-1)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ConfigError(f"baseline maps need B x H x W or B x H x W x C images, got shape {np.shape(images)}")
    return arr


def _unit(maps: np.ndarray) -> np.ndarray:
    """Each map scaled to a maximum of 1, as pytorch-grad-cam scales CAMs (an all-zero map stays zero)."""
    peak = maps.reshape(len(maps), -1).max(1)
    return (maps / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


def brightness_map(images: np.ndarray) -> np.ndarray:
    """The image minus its median, clipped at 0, scaled to [0, 1]: ``B x H x W`` float32.

    Args:
        images: ``B x H x W [x C]`` images (any range).
    """
    grey = _images(images)
    return _unit(np.clip(grey - np.median(grey.reshape(len(grey), -1), 1)[:, None, None], 0, None))


def centre_prior(images: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """A Gaussian at the centre of each image, peak 1: ``B x H x W`` float32.

    Args:
        images: ``B x H x W [x C]`` images (only their size is used).
        sigma: the Gaussian's standard deviation in pixels (default: a quarter of the shorter side).
    """
    b, h, w = _images(images).shape
    sigma = min(h, w) / 4 if sigma is None else sigma
    check_number(sigma, "the centre prior's sigma must be a positive number of pixels", gt=0)
    y, x = np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2
    g = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * float(sigma) ** 2))
    return np.broadcast_to(g / g.max(), (b, h, w)).astype(np.float32)


def uniform_map(images: np.ndarray) -> np.ndarray:
    """A constant map (1) with ties broken at random by a ``1e-6`` jitter seeded by each image: ``B x H x W``.

    Args:
        images: ``B x H x W [x C]`` images (the jitter's seeds).
    """
    grey = _images(images)
    out = np.empty(grey.shape, dtype=np.float32)
    for i, img in enumerate(grey):
        seed = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=8).digest(), "little")
        out[i] = 1 - JITTER * np.random.default_rng(seed).random(img.shape)
    return out


def baseline_maps(kind: str, images: np.ndarray, *, sigma: float | None = None) -> np.ndarray:
    """The baseline map ``kind`` (one of :data:`BASELINES`) of each image: ``B x H x W`` float32 in [0, 1].

    Args:
        kind: ``brightness``, ``centre`` or ``uniform``.
        images: ``B x H x W [x C]`` images as the model sees them (before normalisation).
        sigma: the centre prior's standard deviation in pixels.
    """
    if kind == "brightness":
        return brightness_map(images)
    if kind == "centre":
        return centre_prior(images, sigma)
    if kind == "uniform":
        return uniform_map(images)
    raise ConfigError(f"unknown baseline map {kind!r}; choose from {', '.join(BASELINES)}")
