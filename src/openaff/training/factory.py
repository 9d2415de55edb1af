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
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .config import TrainConfig
from .engine import TrainState
from .errors import ConfigError

__all__ = ["SCHEDULES", "Criterion", "base_lr", "build_training", "create_lr_scheduler", "create_model"]

# The per-step timm schedules a run can use (plateau needs a metric per epoch, which per-step training has not).
SCHEDULES = ("cosine", "tanh", "poly", "multistep", "step", "constant", "wsd", "rsqrt")
_DECAYING = ("cosine", "tanh", "poly")


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
    from ..segmentation import fpn  # noqa: F401  (registers the segmenters: a task of the same engine)

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


def base_lr(cfg: TrainConfig) -> float:
    """The peak learning rate: ``lr``, or ``lr_base`` scaled linearly to the batch size."""
    return cfg.lr if cfg.lr is not None else cfg.lr_base * cfg.batch_size / cfg.lr_base_size


def create_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Scheduler:
    """The per-step learning-rate schedule of ``cfg`` (timm's schedulers), spanning exactly ``cfg.epochs``.

    ``warmup_epochs`` of linear warm-up from ``warmup_lr`` to the peak come first; then

    * ``cosine``, ``tanh``, ``poly``: the decay runs over the remaining ``epochs - warmup_epochs``
      epochs and reaches ``min_lr`` with the last step (timm's ``warmup_prefix=True``). This is the
      authors' schedule, gluoncv's ``LRSequential([linear warm-up, cosine])``: their ImageNet logs
      show 5 warm-up epochs, then a cosine over 235 (lr 0.048605 at the end of epoch 100 of 240).
      timm's default instead runs the cosine over all epochs from step 0 under the warm-up, 3 % below
      theirs in mid-training.
    * ``multistep``: the lr is multiplied by ``decay_rate`` from the first step of each epoch in
      ``decay_milestones`` on (epochs of the whole run, warm-up included; timm's own multistep
      convention would decay one step early).
    * ``step``, ``constant``: timm's, on the whole run's steps; ``wsd``, ``rsqrt``: timm's, which fit
      their stable and decay phases into the epochs after the warm-up.

    Update ``k`` (from 1) trains with the schedule's value after ``k - 1`` updates (timm's
    convention: a warm-up from 0 starts with lr 0); gluoncv uses its value at ``k`` with ``N - 1``
    denominators, so the two differ by at most two warm-up increments (1.2e-5 in the ImageNet recipes).

    Args:
        cfg: the run's configuration (``sched``, ``epochs``, ``warmup_*``, ``min_lr``, ``decay_*``).
        optimizer: its param groups' ``lr`` is the peak learning rate.
        updates_per_epoch: optimiser steps per epoch.
    """
    if cfg.sched not in SCHEDULES:
        raise ConfigError(f"unknown or unsupported scheduler {cfg.sched!r}; choose one of {', '.join(SCHEDULES)} "
                          "(all stepped per update)")
    if cfg.sched in _DECAYING and cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"warmup_epochs ({cfg.warmup_epochs:g}) must be less than epochs ({cfg.epochs}): the "
                          f"{cfg.sched} decay follows the warm-up within the run")
    n = updates_per_epoch
    if cfg.sched == "multistep":
        # timm compares decay_t with t + 1 (t: updates done), so m * n + 1 first decays update m * n + 1, the
        # first of epoch m.
        return MultiStepLRScheduler(optimizer, decay_t=sorted(int(m) * n + 1 for m in cfg.decay_milestones),
                                    decay_rate=cfg.decay_rate, warmup_t=cfg.warmup_epochs * n,
                                    warmup_lr_init=cfg.warmup_lr, warmup_prefix=False, t_in_epochs=False)
    prefix = cfg.sched in _DECAYING
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs - cfg.warmup_epochs if prefix else cfg.epochs,
            decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
            warmup_prefix=prefix, step_on_epochs=False, updates_per_epoch=n)
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"scheduler {cfg.sched} for {cfg.epochs} epochs: {' '.join(str(err).split())}") from None
    return scheduler


def build_training(cfg: TrainConfig, data: DataFacts, dist: distributed.DistInfo) -> tuple[TrainState, Criterion]:
    """The training state (model, optimiser, per-step scheduler, scaler, EMA) and the criterion.

    The initial weights depend only on ``cfg.seed``, so they are the same on every rank. A
    segmentation model gets the per-pixel cross-entropy with ignore index 255 (label smoothing
    allowed, mixup not).
    """
    torch.manual_seed(cfg.seed)
    model = create_model(cfg, data.num_classes, data.in_chans)
    if cfg.sync_bn and dist.distributed:
        model = distributed.convert_sync_batchnorm(model, dist.device)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # timm's factory puts BN parameters and biases (all 1-d parameters) in a group without weight decay.
    try:
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=base_lr(cfg), weight_decay=cfg.weight_decay,
                                        momentum=cfg.momentum)
    except (AssertionError, ValueError) as err:  # timm's way of saying "unknown optimizer"
        raise ConfigError(f"optimizer {cfg.opt!r}: {' '.join(str(err).split()) or 'unknown'} "
                          "(see timm.optim.list_optimizers())") from None
    scheduler = create_lr_scheduler(cfg, optimizer, data.batches_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    forward = model
    if dist.distributed:
        forward = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    state = TrainState(model, forward, optimizer, scheduler, scaler, ema)
    if cfg.task == "segment":  # per-pixel cross-entropy; VOC's 255 (borders, unlabelled) counts nowhere
        # (the mean over the labelled pixels of all processes' batches, as one process would compute it)
        from ..segmentation.loss import PixelCrossEntropy

        return state, Criterion(PixelCrossEntropy(label_smoothing=cfg.label_smoothing))
    if cfg.mixup > 0 or cfg.cutmix > 0:
        # timm's Mixup also smooths the (soft) labels, so the loss is plain soft-target cross-entropy.
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=data.num_classes)
        return state, Criterion(SoftTargetCrossEntropy().to(dist.device), mixup)
    if cfg.label_smoothing > 0:
        return state, Criterion(LabelSmoothingCrossEntropy(cfg.label_smoothing).to(dist.device))
    return state, Criterion(nn.CrossEntropyLoss().to(dist.device))
