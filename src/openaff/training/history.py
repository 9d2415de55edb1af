"""``metrics.csv`` (one row per epoch) and ``curves.png`` (loss and accuracy), rewritten after every epoch.

The rows live in the resume checkpoint, so a resumed run rewrites exactly the epochs it has.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..files import atomic_write

__all__ = ["COLUMNS", "SEGMENT_COLUMNS", "plot_curves", "write_csv"]

# lr_mean: the mean learning rate of the epoch's updates (the schedule steps per update; the rate left after an
# epoch is the next one's, 0 after the last epoch of a cosine run).
COLUMNS = ("epoch", "lr_mean", "train_loss", "val_loss", "val_top1", "val_top5", "img_per_s", "seconds")
# Segmentation runs (percentages like top-1; the per-class IoU goes to class_iou.csv).
# val_fg_iou, val_item_acc, val_scene_acc: finding the item apart from naming it (openaff.segmentation.object_scores);
# the same by item size follow as extra columns (val_fg_iou_s14_18, ...) where the data set knows the sides.
SEGMENT_COLUMNS = ("epoch", "lr_mean", "train_loss", "val_loss", "val_miou", "val_pixel_acc", "val_mean_acc",
                   "val_fg_iou", "val_item_acc", "val_scene_acc", "img_per_s", "seconds")


def write_csv(rows: list[dict], path: str | Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """Write the metrics rows (the standard columns first, then any extra ones such as ``ema_val_top1``).

    Args:
        rows: one mapping per epoch; values that are lists (a segmentation run's ``class_iou``) are left out.
        path: the CSV file.
        columns: the standard columns (:data:`COLUMNS`, or :data:`SEGMENT_COLUMNS`).
    """
    rows = [{k: v for k, v in r.items() if not isinstance(v, (list, tuple, dict))} for r in rows]
    extra = [k for r in rows for k in r if k not in columns]
    names = list(columns) + list(dict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def plot_curves(rows: list[dict], path: str | Path, title: str = "",
                scores: tuple[tuple[str, str], ...] = (("val_top1", "top-1"), ("val_top5", "top-5")),
                score_title: str = "validation accuracy") -> None:
    """Training/validation loss and the validation scores (default top-1/top-5 accuracy) against the epoch.

    Args:
        rows: the metrics rows.
        path: the PNG file.
        title: the figure's title.
        scores: ``(column, label)`` of each score curve (segmentation: mIoU, pixel accuracy); the EMA
            twin ``ema_<column>`` of the first is drawn dashed where the rows have it.
        score_title: the right panel's title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    for key, label in scores:
        ax2.plot(epochs, [r[key] for r in rows], "o-", label=label)
    first, first_label = scores[0]
    if any(f"ema_{first}" in r for r in rows):
        ax2.plot(epochs, [r.get(f"ema_{first}", float("nan")) for r in rows], "o--", label=f"{first_label} (EMA)")
    ax2.set(xlabel="epoch", ylabel="%" if first != "val_top1" else "accuracy (%)", title=score_title)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
