"""What ``last.pt`` holds, how it is written (by all ranks together) and how a run picks it up again."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as tdist

from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import DistInfo
from .engine import TrainState
from .errors import CheckpointError, NonFiniteLossError

__all__ = ["CHECKPOINT_FORMAT", "Checkpointer", "load_resume_checkpoint", "restore"]

CHECKPOINT_FORMAT = "openaff-train-1"
_COUNTERS = ("epoch", "step", "global_step", "loss_sum", "seen", "skipped", "history", "best_top1", "best_epoch")


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
        # Never replace a good checkpoint with diverged weights (every rank holds the same ones).
        if not torch.stack([torch.isfinite(p).all() for p in state.model.parameters()]).all():
            raise NonFiniteLossError(f"the weights became NaN/inf at epoch {state.epoch} step {state.step}")
        rng = [get_rng_state()]
        if self.dist.distributed:
            rng = [None] * self.dist.world_size
            tdist.all_gather_object(rng, get_rng_state())
        if self.dist.is_main:
            save_checkpoint(self.path, dict(
                format=CHECKPOINT_FORMAT, config=asdict(self.cfg), model=state.model.state_dict(),
                optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
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
    ckpt = load_checkpoint(Path(folder) / "last.pt")
    if ckpt.get("format") != CHECKPOINT_FORMAT or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{folder}/last.pt is not an openaff training checkpoint")
    return ckpt


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
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    for name in _COUNTERS:
        setattr(state, name, ckpt[name])
    state.scheduler.step_update(num_updates=state.global_step)
    rng = ckpt.get("rng") or []
    if len(rng) == dist.world_size:
        set_rng_state(rng[dist.rank])
    else:
        warnings.warn(f"the checkpoint has the RNG states of {len(rng)} processes, this run has {dist.world_size}: "
                      "the rest of the run will not be bit-identical to an uninterrupted one", stacklevel=2)
