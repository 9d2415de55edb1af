"""Model, optimiser, scheduler, AMP scaler, EMA and the task's criterion of a run, from timm's factories."""

from __future__ import annotations

from typing import Protocol

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from . import distributed
from .config import TrainConfig
from .engine import TrainState
from .schedules import SCHEDULES, base_lr, create_lr_scheduler  # noqa: F401  (SCHEDULES: its home before schedules.py)
from .tasks import Criterion, task_for_model

__all__ = ["SCHEDULES", "Criterion", "base_lr", "build_training", "create_lr_scheduler", "create_model"]



class DataFacts(Protocol):
    """What the factories need to know of the data (a ``DataBundle``, or a stand-in without images)."""

    num_classes: int
    in_chans: int
    batches_per_epoch: int


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

    The initial weights depend only on ``cfg.seed``, so they are the same on every rank. The
    criterion is the model's task's (:meth:`openaff.training.tasks.Task.criterion`).
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
    return state, task_for_model(cfg.model).criterion(cfg, data.num_classes, dist.device)
