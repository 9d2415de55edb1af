"""The learning-rate schedules a run can use: timm's, stepped per update, spanning exactly the run's epochs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["SCHEDULES", "base_lr", "create_lr_scheduler"]

# The per-step timm schedules a run can use (plateau needs a metric per epoch, which per-step training has not).
SCHEDULES = ("cosine", "tanh", "poly", "multistep", "step", "constant", "wsd", "rsqrt")
_DECAYING = ("cosine", "tanh", "poly")


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
