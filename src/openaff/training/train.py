"""``openaff train``: train a model from a recipe, resumably, on one or many processes.

Examples::

    openaff train --recipe fashion-mnist-cpu --output runs/demo
    openaff train --recipe cifar-study --data-dir ~/data/cifar-100-python --cifar100-labels coarse
    torchrun --nproc_per_node=4 -m openaff train --recipe imagenet-aff-resnet50 --data ~/imagenet
    openaff train --resume runs/demo            # continue an interrupted run exactly

Outputs (``--output DIR``): metrics.csv, curves.png, best.safetensors, last.pt, config.yaml.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.utils import distribute_bn
from tqdm import tqdm

from ..cpu_memory import apply_cpu_alloc
from . import distributed
from .checkpoint import atomic_write, save_weights
from .config import TrainConfig, add_config_arguments, config_from_args, make_config, recipe_names, to_yaml
from .data import DataBundle, build_data
from .engine import TrainState, evaluate, train_one_epoch
from .errors import ConfigError, NonFiniteLossError, run_command
from .factory import build_training
from .metrics import plot_curves, write_csv
from .resume import Checkpointer, load_resume_checkpoint, restore

__all__ = ["TrainResult", "add_parser", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; the files are written by rank 0)."""

    output: Path
    history: list[dict] = field(default_factory=list)  # the rows of metrics.csv
    best_top1: float = -1.0
    best_epoch: int = -1

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def weights(self) -> Path:
        return self.output / "best.safetensors"


def load_snippet(cfg: TrainConfig, data: DataBundle, weights: Path) -> str:
    """The timm call that loads ``best.safetensors`` with a pretrained config that fits it.

    ``num_classes`` must be in the overlay too: timm drops a classifier whose size differs from
    the pretrained config's (100 classes for the small-image models). ``input_size``, ``mean``
    and ``std`` make ``timm.data.resolve_model_data_config(model)`` describe this data set.
    """
    kwargs = "".join(f", {k}={v!r}" for k, v in cfg.model_kwargs.items())
    size = (data.in_chans, data.data.img_size, data.data.img_size)
    overlay = (f'file="{weights}", num_classes={data.num_classes}, input_size={size}, '
               f"mean={tuple(data.mean)}, std={tuple(data.std)}")
    return (f'timm.create_model("{cfg.model}", pretrained=True, num_classes={data.num_classes}, '
            f"in_chans={data.in_chans}{kwargs}, pretrained_cfg_overlay=dict({overlay}))")


def _setup_runtime(cfg: TrainConfig) -> distributed.DistInfo:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # a few CUDA kernels have no such variant
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    dist = distributed.setup(cfg.device)
    apply_cpu_alloc(cfg.cpu_alloc, dist.device.type)  # retain: ~9 % faster CPU training steps
    return dist


def train(config: TrainConfig | dict | str, resume: str | Path | None = None) -> TrainResult:
    """Train as ``config`` says; the Python API of ``openaff train``.

    Args:
        config: a :class:`TrainConfig`, a mapping of its fields, or a recipe name/path.
        resume: an output folder with ``last.pt`` to continue exactly where it stopped (its
            ``output`` replaces the config's).
    """
    cfg = config if isinstance(config, TrainConfig) else make_config(config)
    ckpt = None
    if resume is not None:
        ckpt = load_resume_checkpoint(resume)
        cfg = make_config({**asdict(cfg), "output": str(resume)})
    dist = _setup_runtime(cfg)
    try:
        return _train(cfg, dist, ckpt)
    finally:
        distributed.cleanup()


def _train(cfg: TrainConfig, dist: distributed.DistInfo, ckpt: dict | None) -> TrainResult:
    out = Path(cfg.output)
    say = tqdm.write if dist.is_main else (lambda *a, **k: None)
    data = build_data(cfg, dist)
    state, criterion = build_training(cfg, data, dist)
    seed = cfg.seed + 1000 * dist.rank  # dropout, drop-path, mixup: different on every rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    save = Checkpointer(cfg, dist, out)
    if ckpt is not None:
        restore(ckpt, state, dist)
        save.last = (state.epoch, state.step)
        say(f"resuming {out} at epoch {state.epoch}, step {state.step}")
    elif dist.is_main and (out / "last.pt").exists():
        say(f"note: {out} holds an earlier run; starting afresh (continue one with --resume {out})")
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the output folder {out}: {err.strerror}") from None
        for name in ("last.pt", "best.safetensors", "metrics.csv", "curves.png"):
            for tmp in out.glob(f".{name}.*.tmp"):  # left by a run killed while writing
                tmp.unlink(missing_ok=True)
        atomic_write(out / "config.yaml", lambda f: f.write(to_yaml(cfg).encode()))
        n_params = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
        say(f"{cfg.model} ({n_params:,} params) on {data.kind}: {data.train_size} train / {data.val_size} val "
            f"images, {data.num_classes} classes; {cfg.epochs} epochs of {data.batches_per_epoch} steps, "
            f"batch {cfg.batch_size} on {dist.world_size} x {dist.device.type}")
    t_start = time.perf_counter()
    while state.epoch < cfg.epochs:
        t0 = time.perf_counter()
        if criterion.mixup is not None:
            criterion.mixup.mixup_enabled = state.epoch < cfg.epochs - cfg.mixup_off_epochs
        try:
            stats = train_one_epoch(state, data.train_loader(state.epoch, state.step), data.train_pipeline,
                                    criterion.loss_fn, dist, amp=cfg.amp, mixup=criterion.mixup,
                                    grad_clip=cfg.grad_clip, check_every=1 if dist.device.type == "cpu" else 50,
                                    checkpoint_every=cfg.checkpoint_every, save=save, progress=cfg.progress)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err}; {save.describe_last()}. Lower --lr or set --grad-clip") from None
        row = _end_epoch(cfg, state, data, dist, stats, t0)
        save(state)
        if dist.is_main:
            write_csv(state.history, out / "metrics.csv")
            plot_curves(state.history, out / "curves.png", title=f"{cfg.model} on {data.kind}")
            skipped = f", {row['skipped']} unreadable images skipped" if "skipped" in row else ""
            say(f"epoch {row['epoch'] + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss "
                f"{row['val_loss']:.4f}, top-1 {row['val_top1']:.2f} %, top-5 {row['val_top5']:.2f} %, "
                f"{row['img_per_s']:.0f} img/s, {row['seconds']:.0f} s{skipped}")
    result = TrainResult(out, state.history, state.best_top1, state.best_epoch)
    if dist.is_main and state.history:
        say(f"done in {time.perf_counter() - t_start:.0f} s: final top-1 {result.final['val_top1']:.2f} % "
            f"(best {state.best_top1:.2f} % after epoch {state.best_epoch + 1})\n"
            f"  metrics: {out / 'metrics.csv'}\n  plot:    {out / 'curves.png'}\n"
            f"  weights: {out / 'best.safetensors'}\n  resume:  {out / 'last.pt'}, config: {out / 'config.yaml'}\n"
            f"  load with: {load_snippet(cfg, data, out / 'best.safetensors')}")
    return result


def _end_epoch(cfg: TrainConfig, state: TrainState, data: DataBundle, dist: distributed.DistInfo, stats: dict,
               t0: float) -> dict:
    """Evaluate (and the EMA), append the metrics row, keep the best weights, advance to the next epoch."""
    if dist.distributed and not cfg.sync_bn:
        distribute_bn(state.model, dist.world_size, reduce=False)  # evaluate and save rank 0's BN statistics
    val = evaluate(state.model, data.val_loader, data.eval_pipeline, dist, amp=cfg.amp, progress=cfg.progress)
    row = dict(epoch=state.epoch, lr=state.optimizer.param_groups[0]["lr"], train_loss=stats["train_loss"],
               val_loss=val["val_loss"], val_top1=val["val_top1"], val_top5=val["val_top5"],
               img_per_s=stats["img_per_s"], seconds=0.0)
    score, best_model = val["val_top1"], state.model
    if state.ema is not None:  # then the EMA weights are the ones kept
        ema_val = evaluate(state.ema.module, data.val_loader, data.eval_pipeline, dist, amp=cfg.amp,
                           progress=cfg.progress, desc="eval EMA")
        row.update({f"ema_{k}": v for k, v in ema_val.items() if k.startswith("val_")})
        score, best_model = ema_val["val_top1"], state.ema.module
    if stats["skipped"] or val["skipped"]:
        row["skipped"] = stats["skipped"] + val["skipped"]
    row["seconds"] = time.perf_counter() - t0
    state.history.append(row)
    if score > state.best_top1:
        state.best_top1, state.best_epoch = score, state.epoch
        if dist.is_main:
            save_weights(Path(cfg.output) / "best.safetensors", best_model.state_dict(),
                         dict(model=cfg.model, model_kwargs=cfg.model_kwargs, num_classes=data.num_classes,
                              in_chans=data.in_chans, img_size=data.data.img_size, mean=list(data.mean),
                              std=list(data.std), epoch=state.epoch, val_top1=score, data=data.kind))
    state.epoch, state.step, state.loss_sum, state.seen, state.skipped = state.epoch + 1, 0, 0.0, 0, 0
    return row


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a recipe (resumable, DDP via torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe name (see --list-recipes) or path to a .yaml file")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    add_config_arguments(p)
    p.set_defaults(func=lambda args: run_command("openaff train", lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print("\n".join(recipe_names()))
        return 0
    if args.resume:
        if args.recipe:
            raise ConfigError("--resume takes the configuration of the run it continues; drop --recipe")
        cfg = config_from_args(args, base=load_resume_checkpoint(args.resume)["config"])
    else:
        cfg = config_from_args(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    train(cfg, resume=args.resume)
    return 0
