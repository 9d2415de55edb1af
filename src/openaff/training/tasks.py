"""What a task is to the training engine: its data, criterion, evaluation, metric and files.

The engine (``train.py``, ``evaluate.py``, ``data.py``, ``factory.py``) never names a task: it asks
:func:`task_for_model` which registered :class:`Task` claims the run's model and calls that task's
methods. Classification is the task every model has unless another claims it; segmentation
(:mod:`openaff.segmentation.task`) registers itself when ``openaff`` is imported, so the engine never
imports the segmentation package (the import direction is segmentation -> training, never back).

A new task (say detection) subclasses :class:`Task`, overrides what differs and calls
:func:`register_task` at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..data.datasets import SCENES_CANVAS, ImageData, SeededTransform
from ..data.loader import BatchPipeline, collate
from ..data.splits import load_data
from ..errors import ConfigError
from .distributed import DistInfo
from .engine import evaluate as evaluate_classifier
from .history import COLUMNS, plot_curves, write_csv
from .transforms import build_transforms

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["CLASSIFY", "TASKS", "ClassificationTask", "Criterion", "Task", "get_task", "register_task",
           "task_for_model"]


@dataclass
class Criterion:
    """The loss and the optional batch mixer feeding it (soft targets when mixing)."""

    loss_fn: nn.Module
    mixup: Callable | None = None


class Task:
    """The interface: every method the engine calls. :class:`ClassificationTask` is the reference."""

    name: str = ""
    metric: str = ""  # the validation column that chooses the kept (best) epoch
    metric_label: str = ""  # how the console and the model card call it
    scores: tuple[str, ...] = ()  # the validation columns of a metrics.csv row
    card_scores: tuple[str, ...] = ()  # the scores a model card lists
    command: str = "openaff train"  # the command that trains it (model cards)
    model_kind: str = "model"  # what a model card calls the model ("classifier")
    pipeline_tag: str = ""  # the Hugging Face Hub's task of the model card ("image-classification")
    model_type: str = ""  # the card's "Model Type" entry

    def claims(self, model: str) -> bool:
        """Whether runs of ``model`` (a timm name) are this task's."""
        raise NotImplementedError

    def load_data(self, cfg: TrainConfig, kind: str, train: bool, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> ImageData:
        """The splits of ``cfg``'s data set (of ``kind``, as :func:`resolve_source` found it) with this task's targets
        and per-image transforms."""
        raise NotImplementedError

    def pipelines(self, cfg: TrainConfig, data: ImageData, device: torch.device) -> tuple[Any, Any]:
        """The on-device ``(train, eval)`` batch pipelines."""
        raise NotImplementedError

    collate: Callable = staticmethod(collate)  # batches of (images, targets, skipped)

    def criterion(self, cfg: TrainConfig, num_classes: int, device: torch.device) -> Criterion:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, pipeline, dist: DistInfo, *, amp: str = "none",  # noqa: ANN001
                 progress: bool = True, desc: str = "eval", num_classes: int | None = None) -> dict:
        """Validation scores over the whole loader, summed over all ranks (keys ``val_*``)."""
        raise NotImplementedError

    def row(self, val: dict) -> dict:
        """What an epoch's history row keeps of the evaluation beyond :attr:`scores`."""
        return {}

    def epoch_summary(self, row: dict) -> str:
        """The scores of the console's line after each epoch."""
        raise NotImplementedError

    def write_metrics(self, history: list[dict], out: Path, title: str, classes: Sequence[str] | None) -> None:
        """metrics.csv and curves.png (and the task's own files), rewritten after every epoch."""
        raise NotImplementedError

    def final_table(self, final: dict, classes: Sequence[str] | None, out: Path) -> str:
        """Text printed before the run's closing lines (empty, or a table ending with a newline)."""
        return ""

    def weights_meta(self) -> dict:
        """What the kept weights' metadata records of the task (read back by ``openaff eval``)."""
        return {}

    def eval_fields(self, res: dict, classes: Sequence[str] | None) -> dict:
        """The result of :func:`openaff.training.evaluate.evaluate` from the evaluation's scores."""
        raise NotImplementedError

    def eval_lines(self, res: dict, skipped: str) -> list[str]:
        """What ``openaff eval`` prints of that result."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Image classification: labels as targets, cross-entropy (smoothed, mixed), top-1/top-5."""

    name, metric, metric_label, scores = "classify", "val_top1", "top-1", ("val_top1", "val_top5")
    card_scores, model_kind = scores, "classifier"
    pipeline_tag, model_type = "image-classification", "Image classification / feature backbone"

    def claims(self, model: str) -> bool:
        return True

    def load_data(self, cfg: TrainConfig, kind: str, train: bool, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> ImageData:
        img_size = cfg.img_size or {"imagefolder": 224, "fashion-mnist-scenes": SCENES_CANVAS}.get(kind)
        train_tf, eval_tf = build_transforms(cfg, kind, img_size or 32, mean, std)
        seeded = SeededTransform(train_tf, cfg.seed) if train_tf else None
        return load_data(cfg.data, cfg.data_dir, train=train, cifar100_labels=cfg.cifar100_labels,
                         img_size=cfg.img_size, train_transform=seeded, eval_transform=eval_tf,
                         skip_corrupt=cfg.skip_corrupt, holdout=cfg.holdout)

    def pipelines(self, cfg: TrainConfig, data: ImageData, device: torch.device) -> tuple[BatchPipeline, BatchPipeline]:
        crop = cfg.crop_padding if cfg.aug == "crop-flip" else 0
        hflip = cfg.hflip if cfg.aug == "crop-flip" else 0.0  # image folders flip per image
        train = BatchPipeline(device, data.mean, data.std, cfg.channels_last, crop_padding=crop, hflip=hflip,
                              lighting=cfg.pca_lighting, erasing=cfg.random_erasing, seed=cfg.seed)
        return train, BatchPipeline(device, data.mean, data.std, cfg.channels_last)

    def criterion(self, cfg: TrainConfig, num_classes: int, device: torch.device) -> Criterion:
        if cfg.mixup > 0 or cfg.cutmix > 0:
            # timm's Mixup also smooths the (soft) labels, so the loss is plain soft-target cross-entropy.
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=num_classes)
            return Criterion(SoftTargetCrossEntropy().to(device), mixup)
        if cfg.label_smoothing > 0:
            return Criterion(LabelSmoothingCrossEntropy(cfg.label_smoothing).to(device))
        return Criterion(nn.CrossEntropyLoss().to(device))

    def evaluate(self, model: nn.Module, loader, pipeline, dist: DistInfo, *, amp: str = "none",  # noqa: ANN001
                 progress: bool = True, desc: str = "eval", num_classes: int | None = None) -> dict:
        return evaluate_classifier(model, loader, pipeline, dist, amp=amp, progress=progress, desc=desc)

    def epoch_summary(self, row: dict) -> str:
        return f"top-1 {row['val_top1']:.2f} %, top-5 {row['val_top5']:.2f} %"

    def write_metrics(self, history: list[dict], out: Path, title: str, classes: Sequence[str] | None) -> None:
        write_csv(history, out / "metrics.csv", COLUMNS)
        plot_curves(history, out / "curves.png", title=title)

    def eval_fields(self, res: dict, classes: Sequence[str] | None) -> dict:
        return dict(top1=res["val_top1"], top5=res["val_top5"])

    def eval_lines(self, res: dict, skipped: str) -> list[str]:
        return [f"{res['model']} on {res['data']} ({res['images']} images{skipped}): top-1 {res['top1']:.2f} %, "
                f"top-5 {res['top5']:.2f} %, loss {res['loss']:.4f}"]


CLASSIFY = ClassificationTask()
TASKS: dict[str, Task] = {CLASSIFY.name: CLASSIFY}


def register_task(task: Task) -> Task:
    """Add (or replace) a task; the most recently registered task that claims a model wins."""
    TASKS.pop(task.name, None)
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name`` (``classify``, ``segment``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_for_model(model: str) -> Task:
    """The task of runs of ``model``: the last registered one that claims it (classification claims all)."""
    for task in reversed(TASKS.values()):
        if task.claims(model):
            return task
    return CLASSIFY
