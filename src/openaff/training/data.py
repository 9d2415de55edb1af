"""From a :class:`TrainConfig` to loaders: data set, per-image transforms, samplers, batch pipelines.

Per-image work (decoding, RandomResizedCrop, colour jitter, AutoAugment/RandAugment) uses timm's
transforms in the loader workers; batch work (pad-crop-flip of small images, PCA lighting,
random erasing, normalisation) runs on the training device (``loader.BatchPipeline``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from timm.data import create_transform
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.transforms import MaybePILToTensor
from torch.utils.data import DataLoader
from torchvision import transforms as T

from .config import TrainConfig
from .datasets import DATASET_STATS, SCENES_CANVAS, ImageData, SeededTransform, load_data, resolve_source
from .distributed import DistInfo
from .errors import ConfigError, DataError
from .loader import BatchPipeline, EvalSampler, TrainSampler, collate, make_loader

__all__ = ["DataBundle", "build_data", "build_transforms"]


def _auto_augment(spec: str, img_size: int, mean: tuple[float, ...]) -> Callable:
    fill = tuple(round(255 * m) for m in mean)
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=fill if len(fill) == 3 else fill[0])
    if spec.startswith("rand"):
        return rand_augment_transform(spec, hparams)
    if spec.startswith("augmix"):
        return augment_and_mix_transform(spec, hparams)
    return auto_augment_transform(spec, hparams)


def build_transforms(cfg: TrainConfig, kind: str, img_size: int, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> tuple[Callable | None, Callable | None]:
    """Per-image ``(train, eval)`` transforms returning uint8 tensors (None: no per-image work).

    Image folders: timm's ImageNet transforms (``imagenet`` augmentation: RandomResizedCrop
    0.08-1, flip, colour jitter, AutoAugment if asked; evaluation: resize ``img_size / crop_pct``,
    centre crop). In-memory data sets only need one for AutoAugment/RandAugment.
    """
    if cfg.aug == "scale-crop-flip":
        raise ConfigError("aug scale-crop-flip is the segmentation augmentation (image and mask); use crop-flip for "
                          f"{cfg.model}, a classifier")
    if kind == "imagefolder":
        common = dict(input_size=img_size, interpolation="bilinear", mean=mean, std=std, use_prefetcher=True)
        evaluate = create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
        if cfg.aug != "imagenet":
            return evaluate, evaluate
        train = create_transform(is_training=True, scale=(0.08, 1.0), hflip=cfg.hflip,
                                 color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment, **common)
        return train, evaluate
    if cfg.aug == "imagenet":
        raise ConfigError(f"the imagenet augmentation needs an image folder; use crop-flip for {kind}")
    if cfg.auto_augment:
        return T.Compose([_auto_augment(cfg.auto_augment, img_size, mean), MaybePILToTensor()]), None
    return None, None


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
    task: str = "classify"  # or "segment" (openaff.segmentation.data)
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

    A segmentation model (``cfg.task == "segment"``) gets masks as targets
    (:func:`openaff.segmentation.data.build_segmentation_data`).
    """
    if cfg.task == "segment":
        from ..segmentation.data import build_segmentation_data

        return build_segmentation_data(cfg, dist, train, mean, std)
    kind, root = resolve_source(cfg.data, cfg.data_dir)
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
    img_size = cfg.img_size or {"imagefolder": 224, "fashion-mnist-scenes": SCENES_CANVAS}.get(kind)
    mean = tuple(mean) if mean is not None else DATASET_STATS[kind][0]
    std = tuple(std) if std is not None else DATASET_STATS[kind][1]
    train_tf, eval_tf = build_transforms(cfg, kind, img_size or 32, mean, std)
    data = load_data(cfg.data, cfg.data_dir, train=train, cifar100_labels=cfg.cifar100_labels, img_size=cfg.img_size,
                     train_transform=SeededTransform(train_tf, cfg.seed) if train_tf else None,
                     eval_transform=eval_tf, skip_corrupt=cfg.skip_corrupt, holdout=cfg.holdout)
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
    crop = cfg.crop_padding if cfg.aug == "crop-flip" else 0
    hflip = cfg.hflip if cfg.aug == "crop-flip" else 0.0  # image folders flip per image
    train_pipe = BatchPipeline(dist.device, data.mean, data.std, cfg.channels_last, crop_padding=crop, hflip=hflip,
                               lighting=cfg.pca_lighting, erasing=cfg.random_erasing, seed=cfg.seed)
    eval_pipe = BatchPipeline(dist.device, data.mean, data.std, cfg.channels_last)
    val_loader = make_loader(data.val, EvalSampler(len(data.val), 2 * per_rank, dist.rank, dist.world_size),
                             workers, pin)
    test_loader = None
    if data.test is not None:
        data.test = data.test.subset(cfg.limit_test, "limit_test")
        test_loader = make_loader(data.test, EvalSampler(len(data.test), 2 * per_rank, dist.rank, dist.world_size),
                                  workers, pin)
    return DataBundle(data.kind, data.num_classes, data.in_chans, data, sampler, train_pipe, eval_pipe, val_loader,
                      workers, pin, str(root.resolve()), test_loader=test_loader)
