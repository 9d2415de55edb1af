"""From a :class:`TrainConfig` to loaders: data set, samplers, batch pipelines, for every task.

Per-image work (decoding, RandomResizedCrop, colour jitter, AutoAugment/RandAugment) uses timm's
transforms in the loader workers (:mod:`.transforms`); batch work (pad-crop-flip of small images, PCA
lighting, random erasing, normalisation) runs on the training device (``loader.BatchPipeline``). What
differs by task (targets, pipelines, collation) comes from :mod:`.tasks`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset

from ..data.datasets import DATASET_STATS, ImageData, SeededTransform, resolve_source
from ..data.loader import BatchPipeline, EvalSampler, TrainSampler, collate, make_loader
from ..errors import ConfigError, DataError
from .config import TrainConfig
from .distributed import DistInfo
from .tasks import task_for_model
from .transforms import build_transforms  # noqa: F401  (its public home before transforms.py)

__all__ = ["DataBundle", "build_data", "build_transforms"]


@dataclass
class DataBundle:
    """The loaders of one run and the facts the model and the schedule need."""

    kind: str
    num_classes: int
    in_chans: int
    data: ImageData
    sampler: TrainSampler | None
    train_pipeline: BatchPipeline
    eval_pipeline: BatchPipeline
    val_loader: DataLoader
    workers: int
    pin_memory: bool
    root: str = ""  # the data set's directory (absolute), recorded with the weights for `openaff eval`
    collate: Callable = collate  # batches of (images, targets, skipped); segmentation: masks as targets
    task: str = "classify"  # the name of the model's task (openaff.training.tasks), e.g. "segment"
    test_loader: DataLoader | None = None  # the official test split, when validation is held out of training

    @property
    def mean(self) -> tuple[float, ...]:
        return self.data.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.data.std

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch if self.sampler else 0

    @property
    def train_size(self) -> int:
        return len(self.data.train) if self.data.train is not None else 0

    @property
    def val_size(self) -> int:
        return len(self.data.val)

    def train_loader(self, epoch: int, start: int = 0) -> DataLoader:
        """The loader of ``epoch`` from batch ``start`` on (the same batches whenever it is made)."""
        self.sampler.set_epoch(epoch, start)
        transform = getattr(self.data.train, "transform", None) or getattr(self.data.train, "seeded_transform", None)
        if isinstance(transform, SeededTransform) or hasattr(transform, "epoch"):
            transform.epoch = epoch  # workers are forked per epoch and see it
        return make_loader(self.data.train, self.sampler, self.workers, self.pin_memory,
                           seed=self.sampler.seed * 1_000_003 + epoch, collate_fn=self.collate)


def build_data(cfg: TrainConfig, dist: DistInfo, train: bool = True, mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None) -> DataBundle:
    """Load the data set of ``cfg`` and build its loaders for this process.

    Args:
        cfg: the run's configuration (data, augmentation, batch size, workers).
        dist: rank, world size and device.
        train: also build the training side (evaluation needs only the validation split).
        mean: per-channel normalisation mean (default: the data set's); evaluation passes the one
            the weights were trained with.
        std: per-channel normalisation std (default: the data set's).

    The task of the model (:func:`openaff.training.tasks.task_for_model`) loads the splits with its
    targets (a segmentation model: masks) and makes the batch pipelines; the rest is the same for all.
    """
    task = task_for_model(cfg.model)
    kind, root = resolve_source(cfg.data, cfg.data_dir)
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
    mean = tuple(mean) if mean is not None else DATASET_STATS[kind][0]
    std = tuple(std) if std is not None else DATASET_STATS[kind][1]
    data = task.load_data(cfg, kind, train, mean, std)
    if len(mean) != data.in_chans or len(std) != data.in_chans:
        raise DataError(f"normalisation mean {mean} / std {std} has {len(mean)}/{len(std)} values but the images of "
                        f"{cfg.data_dir or cfg.data} have {data.in_chans} channel(s)")
    data.mean, data.std = mean, std
    data.val = data.val.subset(cfg.limit_val, "limit_val")
    if len(data.val) == 0:
        raise DataError(f"the validation split of {cfg.data_dir or cfg.data} holds no images")
    per_rank = cfg.batch_size // dist.world_size
    sampler = None
    if train:
        data.train = data.train.subset(cfg.limit_train, "limit_train")
        if len(data.train) < cfg.batch_size:
            raise DataError(f"the training split holds {len(data.train)} images, fewer than one batch "
                            f"({cfg.batch_size}); lower --batch-size")
        sampler = TrainSampler(len(data.train), per_rank, dist.rank, dist.world_size, cfg.seed)
    pin = dist.device.type == "cuda"
    workers = cfg.workers
    if workers is None:  # in-memory batches are one tensor gather: workers would only add copies
        procs_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
        workers = 0 if data.in_memory else max(1, min(8, (os.cpu_count() or 1) // procs_here))
    train_pipe, eval_pipe = task.pipelines(cfg, data, dist.device)

    def loader(split: Dataset) -> DataLoader:
        return make_loader(split, EvalSampler(len(split), 2 * per_rank, dist.rank, dist.world_size), workers, pin,
                           collate_fn=task.collate)

    test_loader = None
    if data.test is not None:
        data.test = data.test.subset(cfg.limit_test, "limit_test")
        test_loader = loader(data.test)
    return DataBundle(data.kind, data.num_classes, data.in_chans, data, sampler, train_pipe, eval_pipe,
                      loader(data.val), workers, pin, str(root.resolve()), collate=task.collate, task=task.name,
                      test_loader=test_loader)
