"""What ``last.pt`` holds, how it is written (by all ranks together) and how a run picks it up again.

Resuming continues a run exactly: the weights, optimiser, scaler, EMA, counters and every rank's
RNG states come back, and the configuration is the run's own (:func:`resume_config`). Only
``epochs`` and settings that change neither the numbers nor the data (:data:`RESUMABLE`) may be
given anew. The learning-rate schedule is not restored but rebuilt from the configuration and
set to the update count reached: with the same ``epochs`` that is the schedule the run had; with
more (or fewer) it is the schedule of a run planned with the new total from the start, continued
at the step reached, so the lr jumps to that schedule's value (a finished cosine run at lr 0 goes
on at the lr the longer cosine has there), as timm's ``train.py --resume`` does.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import CheckpointError, ConfigError, NonFiniteLossError
from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .config import TrainConfig, make_config
from .distributed import DistInfo, all_reduce_sum
from .engine import TrainState

__all__ = ["CHECKPOINT_FORMAT", "RESUMABLE", "Checkpointer", "check_finite", "load_resume_checkpoint",
           "non_finite", "restore", "resume_config"]

CHECKPOINT_FORMAT = "openaff-train-1"
_COUNTERS = ("epoch", "step", "global_step", "loss_sum", "seen", "skipped", "lr_sum", "updates", "history", "best_top1",
             "best_epoch")
# Counters checkpoints of earlier versions lack: a resumed epoch's lr_mean then counts its updates after the resume.
_NEWER_COUNTERS = ("lr_sum", "updates")
# Settings a resumed run may change besides `epochs`: they change neither the numbers nor the data (where the
# data set lives, how many processes load it, threads, display, how often last.pt is written, whether an
# unreadable image stops the run).
RESUMABLE = ("data_dir", "workers", "threads", "cpu_alloc", "progress", "checkpoint_every", "skip_corrupt")


def non_finite(*modules: nn.Module | None) -> list[str]:
    """Names of the floating-point parameters and buffers (BN statistics included) that hold NaN/inf."""
    bad = []
    for module in modules:
        if module is None:
            continue
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def check_finite(state: TrainState, dist: DistInfo, where: str) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if the weights of any rank hold NaN/inf.

    Ranks can disagree (BN statistics are per rank without SyncBN), so the verdict is all-reduced:
    all ranks stop together instead of some waiting for the others in the next collective.
    """
    bad = non_finite(state.model, state.ema)
    if all_reduce_sum(torch.tensor([float(len(bad))], device=dist.device)).item() > 0:
        names = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else " (on another rank)"
        raise NonFiniteLossError(f"the weights became NaN/inf{names} {where}; training stopped")


class Checkpointer:
    """Writes ``DIR/last.pt``; every rank calls it (each contributes its RNG states), rank 0 writes.

    Args:
        cfg: the run's configuration (stored, so that ``--resume DIR`` needs nothing else).
        dist: process-group facts.
        out: the output folder.
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo, out: Path) -> None:
        self.cfg, self.dist, self.path = cfg, dist, out / "last.pt"
        self.last: tuple[int, int] | None = None  # (epoch, step) of the last checkpoint written

    def __call__(self, state: TrainState) -> None:
        # Never replace a good checkpoint with diverged weights: parameters and buffers (a BN running_var can
        # overflow while the loss stays finite).
        check_finite(state, self.dist, f"at epoch {state.epoch} step {state.step}")
        rng = [get_rng_state()]
        if self.dist.distributed:
            rng = [None] * self.dist.world_size
            tdist.all_gather_object(rng, get_rng_state())
        if self.dist.is_main:
            save_checkpoint(self.path, dict(
                format=CHECKPOINT_FORMAT, config=asdict(self.cfg), model=state.model.state_dict(),
                optimizer=state.optimizer.state_dict(),
                scaler=state.scaler.state_dict(), ema=state.ema.state_dict() if state.ema is not None else None,
                rng=rng, world_size=self.dist.world_size, **{k: getattr(state, k) for k in _COUNTERS}))
        self.last = (state.epoch, state.step)

    def describe_last(self) -> str:
        """For error messages: which checkpoint a user can go back to."""
        if self.last is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint, {self.path} (epoch {self.last[0]}, step {self.last[1]}), is kept"


def load_resume_checkpoint(folder: str | Path) -> dict:
    """``folder/last.pt``, checked to be one of ours."""
    if not Path(folder).is_dir():
        raise CheckpointError(f"--resume {folder}: no such run folder")
    if not (Path(folder) / "last.pt").is_file():
        raise CheckpointError(f"--resume {folder}: the folder holds no last.pt (no checkpoint was written there)")
    ckpt = load_checkpoint(Path(folder) / "last.pt")
    if ckpt.get("format") != CHECKPOINT_FORMAT or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{folder}/last.pt is not an openaff training checkpoint")
    return ckpt


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_config(ckpt: dict, folder: str | Path, given: TrainConfig | None = None,
                  explicit: set[str] | None = None) -> TrainConfig:
    """The configuration a resumed run trains with: the checkpoint's, with the changes it allows.

    Args:
        ckpt: the loaded ``last.pt``.
        folder: the run folder (it becomes ``output``).
        given: a configuration asked for; it may differ from the run's only in ``epochs`` and
            :data:`RESUMABLE` (``output`` must be the run folder, ``recipe`` is ignored).
        explicit: the fields the user set (command-line flags); others are not compared. None: all.

    Raises:
        ConfigError: naming the first setting that would make the continuation not exact, or an
            ``epochs`` that leaves nothing to train.
    """
    run = make_config({**ckpt["config"], "output": str(folder)})
    given = given or run
    names = [f.name for f in fields(TrainConfig)] if explicit is None else sorted(explicit)
    if "output" in names and given.output not in (None, TrainConfig.output) and \
            os.path.realpath(given.output) != os.path.realpath(folder):
        raise ConfigError(f"--resume {folder} continues the run where it is; drop --output {given.output} "
                          "(copy the folder first to continue it elsewhere)")
    changes = {}
    for name in names:
        if name in ("output", "recipe"):
            continue
        old, new = getattr(run, name), getattr(given, name)
        if new == old:
            continue
        if name != "epochs" and name not in RESUMABLE:
            raise ConfigError(f"--resume {folder}: {_flag(name)} cannot change when resuming (the run has {old!r}, "
                              f"not {new!r}); a resumed run continues exactly as it started, only --epochs and "
                              f"{', '.join(_flag(n) for n in RESUMABLE)} may change")
        changes[name] = new
    cfg = make_config({**{f.name: getattr(run, f.name) for f in fields(TrainConfig)}, **changes})
    done = ckpt["epoch"]  # epochs finished (a checkpoint inside an epoch has begun the next one)
    if cfg.epochs <= done:
        if cfg.epochs == run.epochs:
            raise ConfigError(f"the run in {folder} has finished its {run.epochs} epochs; train it longer with "
                              f"--resume {folder} --epochs N (N > {run.epochs})")
        raise ConfigError(f"--epochs {cfg.epochs}: the run in {folder} has already trained {done} epochs; "
                          f"give more than {done}")
    return cfg


def restore(ckpt: dict, state: TrainState, dist: DistInfo) -> None:
    """Put a run back where ``ckpt`` left it: weights, optimiser, schedule, scaler, EMA, counters, RNGs."""
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.ema is not None and ckpt.get("ema") is not None:
            state.ema.load_state_dict(ckpt["ema"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"the checkpoint does not fit this model/configuration: {str(err).splitlines()[0]}") \
            from None
    # The schedule is rebuilt from the configuration (see the module docstring), not loaded: a restored
    # scheduler would keep the old epoch count, and --epochs N would train its extra epochs at lr 0.
    state.scaler.load_state_dict(ckpt["scaler"])
    for name in _COUNTERS:
        if name in ckpt or name not in _NEWER_COUNTERS:
            setattr(state, name, ckpt[name])
    state.scheduler.step_update(num_updates=state.global_step)
    rng = ckpt.get("rng") or []
    if len(rng) == dist.world_size:
        set_rng_state(rng[dist.rank])
    else:
        warnings.warn(f"the checkpoint has the RNG states of {len(rng)} processes, this run has {dist.world_size}: "
                      "the rest of the run will not be bit-identical to an uninterrupted one", stacklevel=2)
