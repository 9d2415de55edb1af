"""Whether a map points at what the model uses: ROAD (Rong et al., 2022) from pytorch-grad-cam.

:func:`road_scores` is pytorch-grad-cam's ``ROADCombined`` (the mean over percentiles ``p`` of
``(LeRF_p - MoRF_p) / 2``, each the change in the target class's softmax probability when the pixels are
imputed by its ``NoisyLinearImputer``: MoRF_p keeps the ``p`` % least relevant pixels and imputes the others,
LeRF_p keeps the ``p`` % most relevant), built from the library's own ``PerturbationConfidenceMetric``,
``RemoveMostRelevantFirst``/``RemoveLeastRelevantFirst`` and ``NoisyLinearImputer``, with three changes that
the library's classes do not offer:

* ties are broken before thresholding (a jitter of 1e-6, seeded by the image and the map): the library keeps
  ``map < percentile`` and so imputes every tied pixel at once, all of a Grad-CAM's zeros or a whole uniform map;
* each imputation's noise is seeded by the image, the map and the percentile, so a score does not depend on
  the batch or the order of the calls;
* imputed images can be kept in a ``cache`` (a dict) and reused: a baseline map of a scene is the same for
  every model, and the imputation (a sparse solve per image and percentile) is most of the cost.

Higher is more faithful: removing the pixels the map ranks lowest keeps the confidence, removing those it
ranks highest takes it away. A random order scores about 0.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .models import CamModel

__all__ = ["ROAD_PERCENTILES", "road_scores"]

ROAD_PERCENTILES = (20, 50, 80)  # of pytorch-grad-cam's default 10, 20, ..., 90: a third of the solves
JITTER = 1e-6


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


class _SeededPerturbation:
    """A pytorch-grad-cam perturbation (``(image C x H x W, map H x W) -> image``) made deterministic per call
    (its noise seeded by the image, the map and ``tag``) and memoised in ``cache``."""

    def __init__(self, perturbation, tag: str, cache: dict | None) -> None:
        self.perturbation, self.tag, self.cache = perturbation, tag.encode(), cache

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        key = _digest(image.numpy().tobytes(), mask.numpy().tobytes(), self.tag)
        if self.cache is not None and key in self.cache:
            return self.cache[key].clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)
            out = self.perturbation(image, mask)
        if self.cache is not None:
            self.cache[key] = out.clone()
        return out


def _untied(inputs: torch.Tensor, maps: np.ndarray) -> np.ndarray:
    """Each map plus a jitter of at most 1e-6, seeded by its image and itself (ties broken at random)."""
    out = np.empty(maps.shape, dtype=np.float32)
    for i, m in enumerate(maps):
        seed = int.from_bytes(_digest(inputs[i].numpy().tobytes(), m.tobytes())[:8], "little")
        out[i] = m + JITTER * np.random.default_rng(seed).random(m.shape, dtype=np.float32)
    return out


def road_scores(cm: CamModel, inputs: torch.Tensor, maps: np.ndarray, targets: Sequence[int], *,
                percentiles: Sequence[int] = ROAD_PERCENTILES, cache: dict | None = None,
                batch_size: int = 64) -> np.ndarray:
    """ROAD (combined MoRF/LeRF, softmax confidence) of each image's map: a float per image, higher is more faithful.

    Args:
        cm: the model (see :func:`load_model`).
        inputs: ``B x C x H x W`` normalised images, as the model is fed.
        maps: ``B x H x W`` non-negative maps at the input's size.
        targets: the class whose confidence is watched, per image.
        percentiles: the percentiles ``p`` (0 < p < 100) averaged over.
        cache: a dict that keeps imputed images between calls (for maps that recur, e.g. baselines).
        batch_size: images per forward pass.

    Raises:
        ConfigError: shapes, targets or percentiles that do not fit.
    """
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    maps = np.asarray(maps, dtype=np.float32)
    if inputs.ndim != 4 or maps.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ConfigError(f"ROAD needs B x H x W maps at the input's size; got maps {maps.shape} for inputs "
                          f"{tuple(inputs.shape)}")
    if len(targets) != len(inputs):
        raise ConfigError(f"{len(targets)} target classes for {len(inputs)} images")
    percentiles = [int(p) for p in percentiles]
    if not percentiles or any(not 0 < p < 100 for p in percentiles):
        raise ConfigError(f"ROAD percentiles must lie strictly between 0 and 100, got {list(percentiles)}")
    if len(inputs) == 0:
        return np.zeros(0, dtype=np.float32)
    inputs = inputs.detach().cpu().float().contiguous()
    maps = _untied(inputs, maps)
    device = next(cm.model.parameters()).device
    total = np.zeros(len(inputs), dtype=np.float64)
    with warnings.catch_warnings():
        # The imputer calls np.argwhere on a torch tensor: numpy 2 warns about torch's __array_wrap__ signature.
        warnings.filterwarnings("ignore", message="__array_wrap__", category=DeprecationWarning)
        for p in percentiles:
            for sign, name, removal in ((1, "lerf", RemoveLeastRelevantFirst), (-1, "morf", RemoveMostRelevantFirst)):
                metric = PerturbationConfidenceMetric(_SeededPerturbation(removal(p, NoisyLinearImputer()),
                                                                          f"{name}{p}", cache))
                for start in range(0, len(inputs), batch_size):
                    sl = slice(start, start + batch_size)
                    tg = [ClassifierOutputSoftmaxTarget(int(k)) for k in targets[sl]]
                    total[sl] += sign * metric(inputs[sl].to(device), maps[sl], tg, cm.model) / 2
    return (total / len(percentiles)).astype(np.float32)
