"""Model, optimiser, scheduler, AMP scaler, EMA, mixup and loss of a run, all from timm's factories."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .config import TrainConfig
from .engine import TrainState
from .errors import ConfigError

__all__ = ["Criterion", "build_training", "create_model"]


class DataFacts(Protocol):
    """What the factories need to know of the data (a ``DataBundle``, or a stand-in without images)."""

    num_classes: int
    in_chans: int
    batches_per_epoch: int


@dataclass
class Criterion:
    """The loss and the optional batch mixer feeding it (soft targets when mixing)."""

    loss_fn: nn.Module
    mixup: Callable | None = None


def create_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The timm model of ``cfg`` for the data set's class and channel counts.

    ``num_classes`` and ``in_chans`` come from the data; ``model_kwargs`` may repeat them (a
    converted file records both) but not contradict them.
    """
    kwargs = dict(cfg.model_kwargs)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        given = kwargs.pop(key, value)
        if given != value:
            raise ConfigError(f"model_kwargs {key}={given!r} contradicts the data set, which has {key}={value}; "
                              f"drop {key} from the model settings (it is taken from the data)")
    try:
        return timm.create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"unknown model {cfg.model!r} (see `openaff models` or timm.list_models())") from None
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model {cfg.model} with model_kwargs {cfg.model_kwargs}: {err}") from None


def build_training(cfg: TrainConfig, data: DataFacts, dist: distributed.DistInfo) -> tuple[TrainState, Criterion]:
    """The training state (model, optimiser, per-step scheduler, scaler, EMA) and the criterion.

    The initial weights depend only on ``cfg.seed``, so they are the same on every rank.
    """
    torch.manual_seed(cfg.seed)
    model = create_model(cfg, data.num_classes, data.in_chans)
    if cfg.sync_bn and dist.distributed:
        model = distributed.convert_sync_batchnorm(model, dist.device)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base * cfg.batch_size / cfg.lr_base_size
    # timm's factory puts BN parameters and biases (all 1-d parameters) in a group without weight decay.
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_milestones=cfg.decay_milestones,
        decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=data.batches_per_epoch)
    if scheduler is None:
        raise ConfigError(f"unknown or unsupported scheduler {cfg.sched!r}")
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    forward = model
    if dist.distributed:
        forward = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    state = TrainState(model, forward, optimizer, scheduler, scaler, ema)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        # timm's Mixup also smooths the (soft) labels, so the loss is plain soft-target cross-entropy.
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=data.num_classes)
        return state, Criterion(SoftTargetCrossEntropy().to(dist.device), mixup)
    if cfg.label_smoothing > 0:
        return state, Criterion(LabelSmoothingCrossEntropy(cfg.label_smoothing).to(dist.device))
    return state, Criterion(nn.CrossEntropyLoss().to(dist.device))
