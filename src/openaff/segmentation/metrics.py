"""Segmentation scores from a confusion matrix: mIoU, pixel accuracy, mean class accuracy, per-class IoU.

The confusion matrix counts pixels: row = true class, column = predicted class; pixels whose
target is the ignore index (255) are not counted. It is a sum, so the matrices of batches and of
processes add up (the trainer all-reduces it) and the scores are exact over the whole set.

A class that is neither in the targets nor in the predictions has no IoU (NaN) and is left out of
the mean, as in mmsegmentation and torchmetrics' ``JaccardIndex(ignore_index=...)`` with absent
classes dropped; a class that is predicted but never true has IoU 0 and counts.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..files import atomic_write

__all__ = ["IGNORE_INDEX", "class_iou_table", "confusion_matrix", "scores", "write_class_iou_csv"]

IGNORE_INDEX = 255  # VOC's "void": borders and unlabelled pixels


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``num_classes x num_classes`` int64 pixel counts (rows: target, columns: prediction).

    Args:
        pred: predicted class per pixel (any shape; e.g. ``logits.argmax(1)``).
        target: true class per pixel, same shape; ``ignore_index`` pixels are skipped.
        num_classes: number of classes.
        ignore_index: target value that is not counted.

    Raises:
        ValueError: shapes differ, or a target or prediction outside ``0 .. num_classes - 1``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise ValueError(f"target value {bad} is neither a class (0-{num_classes - 1}) nor the ignore index "
                         f"{ignore_index}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"predictions must be classes 0-{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(cm: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and mean class accuracy (%), and the per-class IoU (%, NaN for absent classes).

    Args:
        cm: a confusion matrix of :func:`confusion_matrix` (summed over batches and processes).

    Returns:
        ``miou``, ``pixel_acc``, ``mean_acc`` (floats, NaN when nothing was counted) and ``class_iou``
        (a list, one value per class).
    """
    cm = cm.double()
    tp = cm.diagonal()
    truth, predicted = cm.sum(1), cm.sum(0)
    union = truth + predicted - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(truth > 0, tp / truth.clamp(min=1), nan)
    total = cm.sum()
    return dict(miou=100 * _nanmean(iou), pixel_acc=100 * (tp.sum() / total).item() if total > 0 else math.nan,
                mean_acc=100 * _nanmean(acc), class_iou=[100 * v for v in iou.tolist()])


def _nanmean(t: torch.Tensor) -> float:
    ok = ~torch.isnan(t)
    return t[ok].mean().item() if ok.any() else math.nan


def class_iou_table(class_iou: Sequence[float], names: Sequence[str]) -> str:
    """A markdown table of the per-class IoU (``—`` for classes absent from targets and predictions)."""
    rows = ["| class | IoU (%) |", "|---|---:|"]
    for name, v in zip(names, class_iou, strict=True):
        rows.append(f"| {name} | {'—' if math.isnan(v) else f'{v:.2f}'} |")
    return "\n".join(rows)


def write_class_iou_csv(history: Sequence[dict], names: Sequence[str], path: str | Path) -> None:
    """``class_iou.csv``: one row per epoch, one column per class (empty: absent class)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["epoch", *names])
    for row in history:
        values = row.get("class_iou") or []
        writer.writerow([row["epoch"], *("" if math.isnan(v) else f"{v:.4f}" for v in values)])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
