"""Scores that separate finding the item from naming it: foreground IoU, item-class accuracy, by item size.

mIoU mixes two skills: where the item is (foreground against background) and which of the classes
it is. On ``fashion-mnist-scenes`` (one item per scene) a model that outlines every item exactly but
names half of them wrongly has a low mIoU, so the two are reported apart (class 0 is the background):

* **foreground IoU** (``fg_iou``): class-agnostic IoU of "item" (any class but 0) against background,
  pooled over all pixels: ``TP / (TP + FP + FN)`` with TP the true-item pixels predicted as any item
  class, FP background pixels predicted as an item, FN item pixels predicted as background. From the
  confusion matrix: ``TP = cm[1:, 1:].sum()``, ``FP = cm[0, 1:].sum()``, ``FN = cm[1:, 0].sum()``.
* **item-class accuracy** (``item_acc``, pixels): of the true-item pixels that are predicted as an
  item (the TP above), the share given the right class: ``trace(cm[1:, 1:]) / cm[1:, 1:].sum()``; it
  does not depend on how well the item was outlined.
* **scene accuracy** (``scene_acc``, scenes): per scene, the majority class among the pixels predicted
  as an item (ties: the lower class number) against the scene's class (the majority true item class,
  the only one on scenes); a scene with no pixel predicted as an item counts as wrong, a scene with no
  true item pixel is not counted. This is the segmenter's classification accuracy, comparable with the
  classification study's top-1.

Pixels labelled 255 (ignore) count nowhere. The pooled scores come from counts that add up over
batches and processes; per scene the same counts are kept (:func:`scene_counts`) so that they can be
summed within bins of the pasted item's side (:func:`side_bins`, :func:`binned_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..data.scenes import side_bins
from .metrics import IGNORE_INDEX

__all__ = ["COUNT_NAMES", "ItemTally", "binned_counts", "foreground_scores", "scene_counts", "scores_from_counts",
           "side_bins", "size_columns", "size_table"]

# One row of per-scene counts (:func:`scene_counts`): pixels, then scenes.
COUNT_NAMES = ("fg_tp", "fg_fp", "fg_fn", "item_correct", "scenes", "scenes_correct")


def foreground_scores(cm: torch.Tensor) -> dict:
    """Foreground IoU and item-class accuracy (%) from a confusion matrix whose class 0 is the background.

    Args:
        cm: ``K x K`` pixel counts (rows: truth, columns: prediction), as
            :func:`openaff.segmentation.metrics.confusion_matrix` makes them.

    Returns:
        ``fg_iou`` and ``item_acc`` (NaN where nothing was counted).
    """
    cm = cm.double()
    tp, fp, fn = cm[1:, 1:].sum().item(), cm[0, 1:].sum().item(), cm[1:, 0].sum().item()
    correct = cm[1:, 1:].diagonal().sum().item()
    return dict(fg_iou=_pct(tp, tp + fp + fn), item_acc=_pct(correct, tp))


def scene_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-image counts ``B x 6`` int64, the columns of :data:`COUNT_NAMES`.

    Args:
        pred: ``B x H x W`` predicted classes.
        target: ``B x H x W`` true classes (0: background; ``ignore_index`` not counted).
        num_classes: number of classes (background included).
        ignore_index: target value that is not counted.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must be the same "
                         "B x H x W shape")
    valid = target != ignore_index
    pf, tf = (pred != 0) & valid, (target != 0) & valid
    both = pf & tf
    b = pred.shape[0]
    dims = (1, 2)
    counts = [both.sum(dims), (pf & ~tf).sum(dims), (~pf & tf).sum(dims), (both & (pred == target)).sum(dims)]
    # Majority classes per scene: one bincount over (scene, class) pairs for the predicted and the true items.
    offset = torch.arange(b, device=pred.device).view(b, 1, 1) * num_classes
    pred_hist = torch.bincount((offset + pred.long())[pf], minlength=b * num_classes).view(b, num_classes)
    true_hist = torch.bincount((offset + target.long().clamp(max=num_classes - 1))[tf],
                               minlength=b * num_classes).view(b, num_classes)
    has_true, has_pred = true_hist.sum(1) > 0, pred_hist.sum(1) > 0
    same = pred_hist[:, 1:].argmax(1) == true_hist[:, 1:].argmax(1)  # argmax: the first of equal counts
    counts += [has_true, has_true & has_pred & same]
    return torch.stack([c.long() for c in counts], 1)


def scores_from_counts(counts: torch.Tensor) -> dict:
    """``fg_iou``, ``item_acc`` and ``scene_acc`` (%) of summed counts (the last dimension: :data:`COUNT_NAMES`)."""
    tp, fp, fn, correct, scenes, scenes_correct = (v.item() for v in counts.double().reshape(-1, 6).sum(0))
    return dict(fg_iou=_pct(tp, tp + fp + fn), item_acc=_pct(correct, tp), scene_acc=_pct(scenes_correct, scenes),
                scenes=int(scenes))


def binned_counts(counts: torch.Tensor, sides: torch.Tensor, bins: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per-scene counts summed within side bins: ``len(bins) x 6`` (a scene outside every bin is left out).

    Args:
        counts: ``B x 6`` counts of :func:`scene_counts`.
        sides: ``B`` pasted sides of the scenes.
        bins: inclusive ``(smallest, largest)`` side ranges.
    """
    out = torch.zeros(len(bins), counts.shape[1], dtype=torch.int64, device=counts.device)
    sides = sides.to(counts.device)
    for k, (lo, hi) in enumerate(bins):
        out[k] = counts[(sides >= lo) & (sides <= hi)].sum(0)
    return out


def size_columns(by_size: Sequence[dict], prefix: str = "val_") -> dict[str, float]:
    """Flat columns of a by-size list (``metrics.csv``): ``val_fg_iou_s14_18``, ``val_scene_acc_s14_18``, ...

    Args:
        by_size: mappings with ``sides`` (``(lo, hi)``), ``fg_iou``, ``item_acc``, ``scene_acc``.
        prefix: the columns' prefix.
    """
    return {f"{prefix}{key}_s{row['sides'][0]}_{row['sides'][1]}": row[key] for row in by_size
            for key in ("fg_iou", "item_acc", "scene_acc")}


class ItemTally:
    """Scene counts of an evaluation, pooled and, where the data set knows its items' sides, by side bin.

    The data set may offer ``item_sides()`` (the pasted side of every scene, int64) and ``side_range``
    (smallest, largest); then each :meth:`add` takes the sides of the loader's next index batch (the
    loader keeps its batch sampler's order, also with worker processes).

    Args:
        loader: the evaluation DataLoader (its ``dataset`` and ``batch_sampler`` are read).
        device: where the counts are summed (the all-reduce's device).
        n_bins: number of side bins (:func:`side_bins`).
    """

    def __init__(self, loader, device: torch.device, n_bins: int = 4) -> None:  # noqa: ANN001  (a DataLoader)
        ds = getattr(loader, "dataset", None)
        self.sides = ds.item_sides() if hasattr(ds, "item_sides") else None
        self.bins = side_bins(*ds.side_range, n_bins) if self.sides is not None else []
        self._batches = iter(loader.batch_sampler) if self.sides is not None else None
        self.total = torch.zeros(len(COUNT_NAMES), dtype=torch.int64, device=device)
        self.by_bin = torch.zeros(len(self.bins), len(COUNT_NAMES), dtype=torch.int64, device=device)

    def add(self, pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
        """Count one batch (the loader's next one)."""
        counts = scene_counts(pred, target, num_classes)
        self.total += counts.sum(0)
        if self._batches is not None:
            idx = torch.as_tensor(next(self._batches), dtype=torch.long)
            self.by_bin += binned_counts(counts, self.sides[idx], self.bins)

    def tensors(self) -> list[torch.Tensor]:
        """What to all-reduce (summed in place; the same list on every rank, as every rank has the same data set)."""
        return [self.total, self.by_bin] if self.bins else [self.total]

    def results(self) -> dict:
        """``scene_acc`` (%) and ``by_size``: per bin ``sides`` ``(lo, hi)``, ``scenes``, ``fg_iou``, ``item_acc``,
        ``scene_acc`` (empty when the sides are unknown)."""
        by_size = [dict(sides=bin_, **scores_from_counts(row.cpu())) for bin_, row in zip(self.bins, self.by_bin,
                                                                                          strict=True)]
        return dict(scene_acc=scores_from_counts(self.total.cpu())["scene_acc"], by_size=by_size)


def size_table(by_size: Sequence[dict]) -> str:
    """A markdown table of the scores by item side (one row per bin)."""
    rows = ["| item side (px) | scenes | foreground IoU (%) | item-class acc. (%) | scene acc. (%) |",
            "|---|---:|---:|---:|---:|"]
    for r in by_size:
        cells = ("—" if math.isnan(r[k]) else f"{r[k]:.2f}" for k in ("fg_iou", "item_acc", "scene_acc"))
        rows.append(f"| {r['sides'][0]}-{r['sides'][1]} | {r['scenes']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _pct(num: float, den: float) -> float:
    return 100 * num / den if den > 0 else math.nan
