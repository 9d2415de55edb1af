"""Pictures of a segmenter's predictions: colour overlays and an image | ground truth | prediction grid.

::

    openaff segment predict --weights runs/seg --output pics                 # the run's validation set
    openaff segment predict --weights runs/seg --images my_photos/ --output pics

Writes ``OUT/grid.png`` (for every sample: the image, the ground-truth mask where there is one, the
prediction; class colours in a legend) and ``OUT/overlays/<name>.png`` (the prediction blended over
the image at its own size). Colours are PASCAL VOC's colour map (background black, 255 = ignore
white); the classes are the ones the weights record.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError, check_int
from ..hub import load_pretrained
from ..photos import IMAGE_SUFFIXES
from ..training.config import make_config
from .data import VOC_CLASSES, load_segmentation_data, voc_palette
from .metrics import IGNORE_INDEX, confusion_matrix, scores

__all__ = ["IMAGE_SUFFIXES", "colorize", "overlay", "predict", "save_grid"]

_PALETTE = voc_palette()


def colorize(mask: np.ndarray) -> np.ndarray:
    """``H x W`` class mask -> ``H x W x 3`` uint8 colours (VOC's colour map; 255 white)."""
    pal = _PALETTE.copy()
    pal[IGNORE_INDEX] = 255
    return pal[mask.astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (``H x W`` grey or ``H x W x 3``) with the non-background classes of ``mask`` blended in."""
    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image
    colour = colorize(mask).astype(np.float32)
    fg = ((mask != 0) & (mask != IGNORE_INDEX))[..., None]
    out = np.where(fg, (1 - alpha) * rgb + alpha * colour, rgb)
    return out.round().clip(0, 255).astype(np.uint8)


def save_grid(path: str | Path, samples: list[dict], class_names: list[str], cols: int = 4, title: str = "") -> Path:
    """A PNG grid: per sample the image, its ground truth (if any) and the prediction.

    Args:
        path: the PNG file.
        samples: mappings with ``name``, ``image`` (``H x W`` or ``H x W x 3`` uint8), ``pred`` and
            optionally ``mask`` (``H x W`` class masks).
        class_names: one name per class, for the legend.
        cols: samples per row.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    has_gt = any(s.get("mask") is not None for s in samples)
    per = 3 if has_gt else 2
    cols = max(1, min(cols, len(samples)))
    rows = math.ceil(len(samples) / cols)
    fig, axes = plt.subplots(rows, cols * per, figsize=(1.5 * cols * per, 1.7 * rows + 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    used: set[int] = set()
    for k, s in enumerate(samples):
        r, c = divmod(k, cols)
        img = s["image"]
        panels = [("image", img, dict(cmap="gray", vmin=0, vmax=255) if img.ndim == 2 else {})]
        if has_gt:
            gt = s.get("mask")
            panels.append(("truth", colorize(gt) if gt is not None else np.zeros((*img.shape[:2], 3), np.uint8), {}))
            if gt is not None:
                used.update(int(v) for v in np.unique(gt) if v != IGNORE_INDEX)
        panels.append(("prediction", colorize(s["pred"]), {}))
        used.update(int(v) for v in np.unique(s["pred"]))
        for j, (what, arr, kw) in enumerate(panels):
            ax = axes[r, c * per + j]
            ax.imshow(arr, interpolation="nearest", **kw)
            ax.set_title(f"{s['name']}" if j == 0 else what, fontsize=6, pad=2)
    handles = [Patch(color=_PALETTE[i] / 255, label=class_names[i] if i < len(class_names) else str(i))
               for i in sorted(used)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0.06, 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _folder_images(folder: Path, in_chans: int, n: int) -> list[tuple[str, np.ndarray]]:
    if not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for p in files[:n]:
        try:
            with Image.open(p) as f:
                out.append((p.stem, np.asarray(f.convert("L" if in_chans == 1 else "RGB"))))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
            raise DataError(f"cannot read image {p}: {err}") from None
    return out


def _val_samples(info: dict, data: str | None, data_dir: str | None, n: int, start: int
                 ) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]:
    meta = info.get("metadata") or {}
    data = data or meta.get("data")
    if data is None:
        raise ConfigError("the weights do not record their data set; pass --data (or --images DIR)")
    data_dir = data_dir or (meta.get("data_dir") if data == meta.get("data") else None)
    size = (info.get("input_size") or [None])[-1]
    cfg = make_config(model=info["architecture"], data=data, data_dir=data_dir,
                      img_size=size if data == "fashion-mnist-scenes" else None)
    split = load_segmentation_data(cfg, train=False)
    val = split.val
    if start >= len(val):
        raise ConfigError(f"--start {start}: the validation split has {len(val)} images")
    out = []
    for i in range(start, min(start + n, len(val))):
        img, mask = val[i]
        arr = img.numpy()
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
        name = val.ids[i] if hasattr(val, "ids") else f"val {i}"
        out.append((str(name), arr, mask.numpy()))
    return out, split.classes


@torch.no_grad()
def predict(weights: str | Path, output: str | Path, *, images: str | Path | None = None, data: str | None = None,
            data_dir: str | None = None, n: int = 16, start: int = 0, cols: int = 4, device: str = "auto",
            threads: int | None = None, alpha: float = 0.5) -> dict:
    """Predict masks and write ``grid.png`` and ``overlays/*.png`` into ``output``.

    Args:
        weights: a training run or model folder of a segmenter (``local-dir:`` allowed).
        output: the folder for the pictures.
        images: a folder of images to segment (default: the validation set the weights record).
        data: the data set instead of the recorded one (``fashion-mnist-scenes``, ``voc``, a folder).
        data_dir: its directory.
        n: how many images.
        start: index of the first validation image.
        cols: samples per row of the grid.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: CPU threads.
        alpha: opacity of the overlay colours.

    Returns:
        ``grid``, ``overlays`` (paths), ``images`` (count), ``title`` (the grid's) and, with ground truth, ``miou`` and
        ``pixel_acc`` of these images (%).
    """
    check_int(n, "--n must be a positive number of images")
    if threads:
        torch.set_num_threads(threads)
    net, info = load_pretrained(str(weights).removeprefix("local-dir:"))
    if not getattr(net, "is_segmenter", False):
        raise ConfigError(f"{weights} holds {info['architecture']}, a classifier; openaff segment predict needs a "
                          "segmentation model's weights")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    net.to(dev).eval()
    in_chans = net.in_chans
    mean = torch.tensor(info["mean"], device=dev).view(1, -1, 1, 1) * 255
    std = torch.tensor(info["std"], device=dev).view(1, -1, 1, 1) * 255
    names = list(info.get("label_names") or [])
    if images is not None:
        items = [(name, arr, None) for name, arr in _folder_images(Path(images), in_chans, n)]
    else:
        items, classes = _val_samples(info, data, data_dir, n, start)
        names = names or classes
    names = names or (VOC_CLASSES if net.num_classes == 21 else [str(i) for i in range(net.num_classes)])
    out = Path(output)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    samples, paths = [], []
    cm = torch.zeros(net.num_classes, net.num_classes, dtype=torch.int64)
    for name, arr, mask in items:
        x = torch.from_numpy(arr.copy()).to(dev)
        x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
        pred = net((x.float() - mean) / std).argmax(1)[0].cpu()
        if mask is not None:
            cm += confusion_matrix(pred, torch.from_numpy(mask), net.num_classes)
        p = out / "overlays" / f"{Path(name).name.replace(' ', '_')}.png"
        Image.fromarray(overlay(arr, pred.numpy(), alpha)).save(p)
        paths.append(p)
        samples.append(dict(name=name, image=arr, mask=mask, pred=pred.numpy().astype(np.uint8)))
    has_gt = all(s["mask"] is not None for s in samples)
    result = dict(images=len(samples), overlays=[str(p) for p in paths])
    fusion = getattr(net, "fusion", None)  # the merges' fusion: the registered name alone may not say it
    title = f"{info['architecture']}{f' (fusion {fusion})' if fusion else ''}: {len(samples)} images"
    if has_gt:
        s = scores(cm)
        result.update(miou=s["miou"], pixel_acc=s["pixel_acc"])
        title += f", mIoU {s['miou']:.1f} % on these"
    result.update(title=title, grid=str(save_grid(out / "grid.png", samples, names, cols, title)))
    return result
