"""Semantic segmentation as a task of the training engine (:mod:`openaff.training.tasks`).

Registered when :mod:`openaff.segmentation` is imported (``import openaff`` does): runs of a segmenter
(:func:`~openaff.segmentation.fpn.is_segmenter`) get masks as targets with joint image/mask augmentation
(:mod:`.data`), the per-pixel cross-entropy over labelled pixels (:mod:`.loss`), and the pixel confusion
matrix's scores (:mod:`.metrics`, :mod:`.object_scores`); the best epoch is the one of the best mIoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.datasets import ImageData
from ..training.config import TrainConfig
from ..training.distributed import DistInfo, all_reduce_sum
from ..training.engine import autocast
from ..training.history import SEGMENT_COLUMNS, plot_curves, write_csv
from ..training.tasks import Criterion, Task, register_task
from .data import SCALE_RANGE, SegmentationPipeline, load_segmentation_data, seg_collate
from .fpn import is_segmenter
from .loss import PixelCrossEntropy
from .metrics import IGNORE_INDEX, class_iou_table, confusion_matrix, scores, write_class_iou_csv
from .object_scores import ItemTally, foreground_scores, size_columns, size_table

__all__ = ["SEGMENT", "SegmentationTask"]


class SegmentationTask(Task):
    """Per-pixel classification of AFF-FPN and other segmenters: mIoU chooses the kept epoch."""

    name, metric, metric_label = "segment", "val_miou", "mIoU"
    scores = ("val_miou", "val_pixel_acc", "val_mean_acc", "val_fg_iou", "val_item_acc", "val_scene_acc")
    card_scores = ("val_miou", "val_pixel_acc", "val_mean_acc")
    command, model_kind = "openaff segment train", "segmenter"
    pipeline_tag, model_type = "image-segmentation", "Semantic segmentation"
    collate = staticmethod(seg_collate)

    def claims(self, model: str) -> bool:
        return is_segmenter(model)

    def load_data(self, cfg: TrainConfig, kind: str, train: bool, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> ImageData:
        return load_segmentation_data(cfg, train)

    def pipelines(self, cfg: TrainConfig, data: ImageData,
                  device: torch.device) -> tuple[SegmentationPipeline, SegmentationPipeline]:
        on_device = data.in_memory and cfg.aug in ("crop-flip", "scale-crop-flip")  # VOC: the workers move both
        train = SegmentationPipeline(device, data.mean, data.std, cfg.channels_last,
                                     crop_padding=cfg.crop_padding if on_device and cfg.aug == "crop-flip" else 0,
                                     hflip=cfg.hflip if on_device else 0.0, lighting=cfg.pca_lighting, seed=cfg.seed,
                                     scale=SCALE_RANGE if on_device and cfg.aug == "scale-crop-flip" else None)
        return train, SegmentationPipeline(device, data.mean, data.std, cfg.channels_last)

    def criterion(self, cfg: TrainConfig, num_classes: int, device: torch.device) -> Criterion:
        # The mean over the labelled pixels of all processes' batches, as one process would compute it;
        # VOC's 255 (borders, unlabelled) counts nowhere. Label smoothing allowed, mixup not.
        return Criterion(PixelCrossEntropy(label_smoothing=cfg.label_smoothing))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, pipeline, dist: DistInfo, *, amp: str = "none",  # noqa: ANN001
                 progress: bool = True, desc: str = "eval", num_classes: int | None = None) -> dict:
        """The mean cross-entropy per labelled pixel and the pixel confusion matrix's scores, over all ranks.

        Returns:
            ``val_loss``, ``val_miou``, ``val_pixel_acc``, ``val_mean_acc``, ``val_fg_iou``, ``val_item_acc``,
            ``val_scene_acc`` (%, :mod:`openaff.segmentation.object_scores`), ``by_size`` (per item-side bin,
            where the data set knows the sides), ``class_iou`` (a list), ``confusion`` (``num_classes x
            num_classes`` int64), ``images`` and ``skipped``.
        """
        model.eval()
        dev = dist.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, labelled pixels, images, skipped
        cm = None
        items = ItemTally(loader, dev)  # per-scene counts: scene accuracy, and by item size where the data knows it
        for images, masks, skipped in tqdm(loader, desc=desc, disable=not (progress and dist.is_main),
                                           dynamic_ncols=True, mininterval=1.0, leave=False):
            sums[3] += skipped
            if len(masks) == 0:
                continue
            x, y = pipeline.batch(images, masks)
            with autocast(dev, amp):
                out = model(x)
            out = out.float()
            k = num_classes or out.shape[1]
            if cm is None:
                cm = torch.zeros(k, k, dtype=torch.int64, device=dev)
            sums[0] += F.cross_entropy(out, y, ignore_index=IGNORE_INDEX, reduction="sum").double()
            sums[1] += (y != IGNORE_INDEX).sum()
            sums[2] += len(y)
            pred = out.argmax(1)
            cm += confusion_matrix(pred, y, k)
            items.add(pred, y, k)
        if cm is None:  # a rank without validation images still joins the sums
            k = num_classes or 1
            cm = torch.zeros(k, k, dtype=torch.int64, device=dev)
        all_reduce_sum(sums)
        all_reduce_sum(cm)
        for t in items.tensors():
            all_reduce_sum(t)
        s, fg, per_scene = scores(cm.cpu()), foreground_scores(cm.cpu()), items.results()
        return dict(val_loss=sums[0].item() / max(sums[1].item(), 1), val_miou=s["miou"],
                    val_pixel_acc=s["pixel_acc"], val_mean_acc=s["mean_acc"], val_fg_iou=fg["fg_iou"],
                    val_item_acc=fg["item_acc"], val_scene_acc=per_scene["scene_acc"], by_size=per_scene["by_size"],
                    class_iou=s["class_iou"], confusion=cm.cpu(), images=int(sums[2].item()),
                    skipped=int(sums[3].item()))

    def row(self, val: dict) -> dict:
        # class_iou goes to class_iou.csv (not a column of metrics.csv); the scores by item size where the
        # data set knows the sides.
        return dict(class_iou=val["class_iou"], **size_columns(val["by_size"]))

    def epoch_summary(self, row: dict) -> str:
        return (f"mIoU {row['val_miou']:.2f} %, pixel acc {row['val_pixel_acc']:.2f} %, foreground IoU "
                f"{row['val_fg_iou']:.2f} %, scene acc {row['val_scene_acc']:.2f} %")

    def write_metrics(self, history: list[dict], out: Path, title: str, classes: Sequence[str] | None) -> None:
        write_csv(history, out / "metrics.csv", SEGMENT_COLUMNS)
        write_class_iou_csv(history, classes, out / "class_iou.csv")
        plot_curves(history, out / "curves.png", title=title, scores=(("val_miou", "mIoU"), ("val_pixel_acc",
                    "pixel accuracy")), score_title="validation segmentation")

    def final_table(self, final: dict, classes: Sequence[str] | None, out: Path) -> str:
        return (f"per-class IoU after the last epoch (also {out / 'class_iou.csv'}):\n"
                + class_iou_table(final["class_iou"], classes) + "\n")

    def weights_meta(self) -> dict:
        return {"task": self.name}

    def eval_fields(self, res: dict, classes: Sequence[str] | None) -> dict:
        return dict(miou=res["val_miou"], pixel_acc=res["val_pixel_acc"], mean_acc=res["val_mean_acc"],
                    fg_iou=res["val_fg_iou"], item_acc=res["val_item_acc"], scene_acc=res["val_scene_acc"],
                    by_size=res["by_size"], class_iou=dict(zip(classes, res["class_iou"], strict=True)),
                    confusion=res["confusion"].tolist())

    def eval_lines(self, res: dict, skipped: str) -> list[str]:
        lines = [class_iou_table(list(res["class_iou"].values()), list(res["class_iou"])),
                 f"{res['model']} on {res['data']} ({res['images']} images{skipped}): mIoU {res['miou']:.2f} %, "
                 f"pixel accuracy {res['pixel_acc']:.2f} %, mean class accuracy {res['mean_acc']:.2f} %, "
                 f"loss {res['loss']:.4f}"]
        if res["by_size"]:
            lines.append(f"by item side:\n{size_table(res['by_size'])}")
        lines.append(f"finding apart from naming the items: foreground IoU {res['fg_iou']:.2f} %, item-class "
                     f"accuracy {res['item_acc']:.2f} % (of the item pixels found), scene accuracy "
                     f"{res['scene_acc']:.2f} % (majority class of each scene's predicted item pixels)")
        return lines


SEGMENT = register_task(SegmentationTask())
