"""``metrics.csv`` (one row per epoch) and ``curves.png`` (loss and accuracy), rewritten after every epoch.

The rows live in the resume checkpoint, so a resumed run rewrites exactly the epochs it has.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .checkpoint import atomic_write

__all__ = ["COLUMNS", "plot_curves", "write_csv"]

COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "img_per_s", "seconds")


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Write the metrics rows (the standard columns first, then any extra ones such as ``ema_val_top1``)."""
    extra = [k for r in rows for k in r if k not in COLUMNS]
    names = list(COLUMNS) + list(dict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Training/validation loss and validation top-1/top-5 accuracy against the epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [r["val_top1"] for r in rows], "o-", label="top-1")
    ax2.plot(epochs, [r["val_top5"] for r in rows], "o-", label="top-5")
    if any("ema_val_top1" in r for r in rows):
        ax2.plot(epochs, [r.get("ema_val_top1", float("nan")) for r in rows], "o--", label="top-1 (EMA)")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
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
