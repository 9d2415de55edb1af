"""The training and evaluation loops."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.loader import BatchPipeline
from ..data.scenes import side_bins
from ..errors import NonFiniteLossError
from .distributed import DistInfo, all_reduce_sum

__all__ = ["TrainState", "autocast", "evaluate", "train_one_epoch"]

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``amp`` in ``none | bf16 | fp16``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP[amp])


@dataclass
class TrainState:
    """What changes while training; with the config, everything a resumed run needs."""

    model: nn.Module  # the plain model (what is saved)
    forward: nn.Module  # what is called: the model, its DDP wrapper and/or its compiled version
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler, stepped per update
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None
    epoch: int = 0  # current epoch
    step: int = 0  # batches done in the current epoch
    global_step: int = 0  # optimizer updates done
    loss_sum: float = 0.0  # sum of per-image training losses so far in this epoch (this rank)
    seen: int = 0  # images trained on so far in this epoch (this rank)
    skipped: int = 0  # unreadable images skipped so far in this epoch (this rank)
    lr_sum: float = 0.0  # sum of the learning rates this epoch's updates so far trained with (metrics.csv lr_mean)
    updates: int = 0  # optimizer updates done so far in this epoch
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    best_top1: float = -1.0
    best_epoch: int = -1


def _check_finite(loss_sum: torch.Tensor, state: TrainState, lr: float) -> None:
    # Every rank checks at the same steps and all agree, so they stop together.
    bad = all_reduce_sum((~torch.isfinite(loss_sum)).float().reshape(1))
    if bad.item() > 0:
        raise NonFiniteLossError(f"the training loss became NaN/inf at epoch {state.epoch} step {state.step} "
                                 f"(lr {lr:.3g}); training stopped")


def train_one_epoch(state: TrainState, loader, pipeline: BatchPipeline, loss_fn: nn.Module, dist: DistInfo, *,
                    amp: str = "none", mixup: Callable | None = None, grad_clip: float | None = None,
                    check_every: int = 1, checkpoint_every: int = 0,
                    save: Callable[[TrainState], None] | None = None, progress: bool = True) -> dict:
    """Train for the rest of ``state.epoch`` (from ``state.step``; the sampler must start there too).

    Args:
        state: model, optimiser and counters; updated in place.
        loader: yields ``(uint8 images, labels, skipped)`` (segmentation: masks for labels).
        pipeline: moves, augments and normalises the batches (``pipeline.batch``).
        loss_fn: criterion (soft-target when ``mixup`` is set).
        dist: process-group facts.
        amp: ``none | bf16 | fp16``.
        mixup: timm ``Mixup`` (or None).
        grad_clip: gradient-norm clipping threshold.
        check_every: test the loss for NaN/inf every N steps (and always before a checkpoint).
        checkpoint_every: call ``save(state)`` every N updates within the epoch (0: never).
        save: writes the resume checkpoint.
        progress: show a progress bar (rank 0).

    Returns:
        ``train_loss`` (mean over all ranks' images), ``img_per_s``, ``skipped`` and ``lr_mean`` (the mean
        learning rate of the epoch's updates) of this epoch.
    """
    model, dev = state.forward, dist.device
    model.train()
    loss_sum = torch.tensor(state.loss_sum, dtype=torch.float64, device=dev)
    seen_here, t0 = 0, time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    total = len(loader) + state.step
    bar = tqdm(loader, total=total, initial=state.step, desc=f"epoch {state.epoch}",
               disable=not (progress and dist.is_main), dynamic_ncols=True, mininterval=1.0, leave=False)
    for images, labels, skipped in bar:
        state.skipped += skipped
        if len(labels) == 0:  # every image of the batch was unreadable (--skip-corrupt)
            state.step += 1
            continue
        # Images and targets together: a segmentation pipeline moves masks with their images.
        x, y = pipeline.batch(images, labels, key=(state.epoch, state.step, dist.rank))
        if mixup is not None:
            if len(y) % 2:  # timm's Mixup pairs images; an odd batch only after skipped files
                x, y = x[:-1], y[:-1]
            x, y = mixup(x, y)
        with autocast(dev, amp):
            loss = loss_fn(model(x), y)
        lr = state.optimizer.param_groups[0]["lr"]  # this step's (for messages; the schedule moves on below)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if grad_clip:
            state.scaler.unscale_(state.optimizer)
            nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.step += 1
        state.global_step += 1
        state.lr_sum += lr
        state.updates += 1
        state.scheduler.step_update(num_updates=state.global_step)
        if state.ema is not None:
            state.ema.update(state.model, step=state.global_step)
        loss_sum += loss.detach().double() * len(y)
        state.seen += len(y)
        seen_here += len(y)
        # The epoch's end has its own checkpoint (with the evaluation), so skip the last step here.
        due = bool(save and checkpoint_every and state.global_step % checkpoint_every == 0 and state.step < total)
        if due or state.step % check_every == 0:
            _check_finite(loss_sum, state, lr)  # never checkpoint diverged weights
        if due:
            state.loss_sum = float(loss_sum)
            save(state)
        if bar.n % 20 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{state.optimizer.param_groups[0]['lr']:.3g}",
                            refresh=False)
    _check_finite(loss_sum, state, lr)
    state.loss_sum = float(loss_sum)
    seconds = time.perf_counter() - t0
    totals = all_reduce_sum(torch.tensor([state.loss_sum, state.seen, seen_here, state.skipped],
                                         dtype=torch.float64, device=dev))
    bar.close()
    # What the epoch trained with, as timm's train.py logs for its per-epoch schedules; ours steps per update, so
    # the mean over the epoch's updates. The rate left in the optimizer is the next update's (0 after a cosine run).
    lr_mean = state.lr_sum / state.updates if state.updates else float("nan")
    return dict(train_loss=(totals[0] / max(totals[1], 1)).item(), img_per_s=totals[2].item() / max(seconds, 1e-9),
                skipped=int(totals[3].item()), lr_mean=lr_mean)


@torch.no_grad()
def evaluate(model: nn.Module, loader, pipeline: BatchPipeline, dist: DistInfo, *, amp: str = "none",
             progress: bool = True, desc: str = "eval") -> dict:
    """Loss, top-1 and top-5 accuracy (%) of a classifier over the whole loader, summed over all ranks.

    Other tasks evaluate with their own :meth:`openaff.training.tasks.Task.evaluate`.

    Returns:
        ``val_loss``, ``val_top1``, ``val_top5``, ``images``, ``skipped`` and, where the data set knows its
        items' sides, ``by_size``.
    """
    model.eval()
    dev = dist.device
    sums = torch.zeros(5, dtype=torch.float64, device=dev)  # loss, top-1, top-5, images, skipped
    sized = _SideTally(loader, dev)
    for images, labels, skipped in tqdm(loader, desc=desc, disable=not (progress and dist.is_main),
                                        dynamic_ncols=True, mininterval=1.0, leave=False):
        sums[4] += skipped
        if len(labels) == 0:
            continue
        x, y = pipeline(images), labels.to(dev, non_blocking=True)
        with autocast(dev, amp):
            out = model(x)
        out = out.float()
        correct = out.topk(min(5, out.shape[1]), dim=1).indices == y[:, None]
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += correct[:, 0].sum()
        sums[2] += correct.any(dim=1).sum()
        sums[3] += len(y)
        sized.add(correct[:, 0])
    all_reduce_sum(sums)
    n = max(sums[3].item(), 1)
    res = dict(val_loss=sums[0].item() / n, val_top1=100 * sums[1].item() / n, val_top5=100 * sums[2].item() / n,
               images=int(sums[3].item()), skipped=int(sums[4].item()))
    if sized.bins:
        res["by_size"] = sized.results()
    return res


class _SideTally:
    """Top-1 by side bin of the pasted item, where the data set knows its items' sides (``item_sides()``,
    ``side_range``: fashion-mnist-scenes); each :meth:`add` takes the loader's next index batch."""

    def __init__(self, loader, device: torch.device, n_bins: int = 4) -> None:  # noqa: ANN001  (a DataLoader)
        ds = getattr(loader, "dataset", None)
        known = hasattr(ds, "item_sides") and getattr(loader, "batch_sampler", None) is not None
        self.bins = side_bins(*ds.side_range, n_bins) if known else []
        self.sides = ds.item_sides() if known else None
        self._batches = iter(loader.batch_sampler) if known else None
        self.counts = torch.zeros(len(self.bins), 2, dtype=torch.float64, device=device)  # correct, images

    def add(self, correct: torch.Tensor) -> None:
        if not self.bins:
            return
        sides = self.sides[torch.as_tensor(next(self._batches), dtype=torch.long)].to(correct.device)
        for k, (lo, hi) in enumerate(self.bins):
            inside = (sides >= lo) & (sides <= hi)
            self.counts[k, 0] += correct[inside].sum()
            self.counts[k, 1] += inside.sum()

    def results(self) -> list[dict]:
        all_reduce_sum(self.counts)
        return [dict(sides=bin_, images=int(n), top1=100 * c / n if n else float("nan"))
                for bin_, (c, n) in zip(self.bins, self.counts.tolist(), strict=True)]
