"""Per-image transforms of classification data: timm's ImageNet transforms for image folders, AutoAugment /
RandAugment / AugMix for in-memory data sets (uint8 tensors out; the batch work runs on the device)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from timm.data import create_transform
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.transforms import MaybePILToTensor
from torchvision import transforms as T

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["build_transforms"]


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
