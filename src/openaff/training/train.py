"""``openaff train``: train a model from a recipe, resumably, on one or many processes.

Examples::

    openaff train --recipe fashion-mnist-cpu --output runs/demo
    openaff train --recipe cifar-study --data-dir ~/data/cifar-100-python --cifar100-labels coarse
    torchrun --nproc_per_node=4 -m openaff train --recipe imagenet-aff-resnet50 --data ~/imagenet
    openaff train --resume runs/demo            # continue an interrupted run exactly
    openaff train --resume runs/demo --epochs 20   # train a run longer (schedule of a 20-epoch run)

Outputs (``--output DIR``; default: a fresh ``runs/<model>-<data>-<YYYYmmdd-HHMMSS>``): the best
weights in timm's hub layout (``config.json`` + ``model.safetensors``: ``timm.create_model(
"local-dir:DIR", pretrained=True)`` rebuilds the model), metrics.csv, curves.png, last.pt (resume
state) and config.yaml (the configuration used). A folder that holds a run is never replaced
without ``--overwrite``; continue it with ``--resume DIR`` instead.

Resuming continues exactly; only ``--epochs`` and run-time settings (threads, workers, where the
data lives, progress, checkpoint frequency, skipping unreadable images) may change. With another
``--epochs`` the learning-rate schedule is the one a run planned with that many epochs has, from
the step reached on (the lr jumps to it; see ``openaff.training.resume``). A diverged run (NaN/inf
loss, weights or BN statistics) stops with exit status 2 and keeps its last good files; Ctrl-C
stops with one line that gives the command to resume (exit status 130).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from timm.utils import distribute_bn
from tqdm import tqdm

from .. import hub
from ..cpu_memory import apply_cpu_alloc
from ..data.splits import HOLDOUT_SEED
from ..errors import ConfigError, NonFiniteLossError, run_command
from ..files import atomic_write, check_output_folder, load_weights
from ..model_card import CARD_NAME, write_run_card
from . import distributed
from .config import TrainConfig, add_config_arguments, config_from_args, make_config, recipe_names, to_yaml
from .data import DataBundle, build_data
from .engine import TrainState, train_one_epoch
from .factory import build_training
from .resume import Checkpointer, check_finite, load_resume_checkpoint, restore, resume_config
from .tasks import get_task

__all__ = ["OUTPUT_FILES", "RUN_FILES", "TrainResult", "add_parser", "fresh_run_folder", "train"]

# Any of these in a folder means it holds a run (ours, or weights someone saved there): never replaced unasked.
RUN_FILES = ("last.pt", hub.WEIGHTS_NAME, hub.CONFIG_NAME, "metrics.csv", "best.safetensors")
# Everything a run writes (best.safetensors: the weights file of earlier versions).
TEST_FILE = "test.json"  # the test split's scores, with a held-out validation split
OUTPUT_FILES = (*RUN_FILES, "curves.png", "config.yaml", "class_iou.csv", CARD_NAME, TEST_FILE)
# An output of None means "a fresh folder under runs/" (see _claim_output).


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; the files are written by rank 0)."""

    output: Path
    history: list[dict] = field(default_factory=list)  # the rows of metrics.csv
    best_top1: float = -1.0  # the best validation score: top-1, or mIoU for a segmentation model (``metric``)
    best_epoch: int = -1
    metric: str = "val_top1"  # the column the best epoch is chosen by (segmentation: val_miou)

    @property
    def best_score(self) -> float:
        """The best validation value of ``metric`` (%)."""
        return self.best_top1

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def weights(self) -> Path:
        """The best weights (``model.safetensors`` of the hub layout; ``config.json`` beside it)."""
        return self.output / hub.WEIGHTS_NAME


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


def train(config: TrainConfig | dict | str | None = None, resume: str | Path | None = None, *,
          overwrite: bool = False) -> TrainResult:
    """Train as ``config`` says; the Python API of ``openaff train``.

    Args:
        config: a :class:`TrainConfig`, a mapping of its fields, or a recipe name/path. With
            ``resume``: None for the run's own configuration, or one that differs from it only in
            ``epochs`` and the run-time settings of :data:`openaff.training.resume.RESUMABLE`.
        resume: a run folder with ``last.pt`` to continue exactly where it stopped; more
            ``epochs`` extend the run with the schedule of a run of that length (the lr jumps).
        overwrite: replace the run in ``config.output`` (its files are deleted when the new run
            starts writing); without it a folder holding a run is refused.

    Raises:
        ConfigError: a bad setting, a folder that holds a run, an unwritable output folder, or a
            change on resume that would make the continuation not exact.
        NonFiniteLossError: the run diverged; its last good checkpoint and best weights are kept.
        KeyboardInterrupt: Ctrl-C; its note says how to resume.
    """
    if config is None and resume is None:
        raise ConfigError("train() needs a configuration or a run folder to resume")
    cfg = None if config is None else config if isinstance(config, TrainConfig) else make_config(config)
    ckpt = None
    if resume is not None:
        if overwrite:
            raise ConfigError(f"--resume {resume} continues a run and --overwrite replaces one; drop one of them")
        ckpt = load_resume_checkpoint(resume)
        cfg = resume_config(ckpt, resume, cfg)
    return _run_training(cfg, ckpt, overwrite)


def _run_training(cfg: TrainConfig, ckpt: dict | None, overwrite: bool) -> TrainResult:
    """Join the processes, claim the output folder, train; a Ctrl-C gets a note with the resume command."""
    interrupted = threading.Event()
    previous = _catch_interrupts(interrupted)
    dist, save = None, None
    try:
        dist = _setup_runtime(cfg)
        out = _claim_output(cfg, dist, resuming=ckpt is not None, overwrite=overwrite)
        cfg = replace(cfg, output=str(out))  # config.yaml and last.pt record the folder actually used
        save = Checkpointer(cfg, dist, out)
        return _train(cfg, dist, ckpt, save, overwrite)
    except BaseException as err:
        if not (interrupted.is_set() or isinstance(err, KeyboardInterrupt)):
            raise
        # Under torchrun a rank may fail with a broken collective when another one stopped first: the cause is
        # the Ctrl-C all the same. A second Ctrl-C must not turn the clean exit into a traceback.
        _catch_interrupts(None)
        stop = err if isinstance(err, KeyboardInterrupt) else KeyboardInterrupt()
        stop.add_note(_interrupted(save, dist))
        raise stop from None
    finally:
        distributed.cleanup()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _catch_interrupts(flag: threading.Event | None) -> signal.Handlers | None:
    """Route SIGINT to ``flag`` + KeyboardInterrupt (None: ignore it); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers; Python's default then applies

    def on_sigint(signum: int, frame: object) -> None:
        flag.set()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, on_sigint if flag is not None else signal.SIG_IGN)


def _interrupted(save: Checkpointer | None, dist: distributed.DistInfo | None) -> str:
    """The line that tells how to continue an interrupted run."""
    if save is None or save.last is None:
        where = f" in {save.path.parent}" if save is not None else ""
        return f"interrupted before the first checkpoint{where}; nothing to resume (run the same command again)"
    folder = shlex.quote(str(save.path.parent))
    if dist is not None and dist.distributed:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        nodes = "" if local == dist.world_size else " on every node, with your other torchrun options"
        cmd = f"torchrun --nproc_per_node={local} -m openaff train --resume {folder}{nodes}"
    else:
        cmd = f"openaff train --resume {folder}"
    return f"interrupted; continue from the last checkpoint (epoch {save.last[0]}, step {save.last[1]}) with: {cmd}"


def _data_name(cfg: TrainConfig) -> str:
    source = cfg.data_dir if cfg.data == "imagefolder" and cfg.data_dir else cfg.data
    return Path(source.rstrip("/")).name or "data"


def fresh_run_folder(root: str | Path, stem: str, stamp: str | None = None) -> Path:
    """Create and return ``root/<stem>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when taken).

    The folder is claimed with an exclusive ``mkdir``, so two runs started in the same second get
    two folders.
    """
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "run"
    for i in range(1, 10_000):
        folder = Path(root) / (f"{stem}-{stamp}" if i == 1 else f"{stem}-{stamp}-{i}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
        except OSError as err:
            raise ConfigError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
    raise ConfigError(f"cannot find a free run folder name {root}/{stem}-{stamp}-N")


def _output_folder(cfg: TrainConfig, resuming: bool, overwrite: bool) -> Path:
    if resuming:
        out = Path(cfg.output)
    elif cfg.output is None:
        return fresh_run_folder("runs", f"{cfg.model}-{_data_name(cfg)}")
    else:
        out = Path(cfg.output)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file, not a folder")
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held and not overwrite:
            raise ConfigError(f"{out} holds a run ({', '.join(held)}); continue it with --resume {out} "
                              "or replace it with --overwrite")
    check_output_folder(out)
    return out


def _claim_output(cfg: TrainConfig, dist: distributed.DistInfo, resuming: bool, overwrite: bool) -> Path:
    """The output folder, decided (and checked writable) by rank 0 and broadcast, so that all ranks agree.

    Every rank gets rank 0's verdict, an error included, and stops with it rather than waiting.
    """
    verdict: list[str | None] = [None, None]  # folder, error
    if dist.is_main:
        try:
            verdict[0] = str(_output_folder(cfg, resuming, overwrite))
        except ConfigError as err:
            verdict[1] = str(err)
        except OSError as err:  # anything else the file system says: the other ranks must hear of it too
            verdict[1] = f"cannot use the output folder {cfg.output}: {err.strerror or err}"
    if dist.distributed:
        tdist.broadcast_object_list(verdict, src=0)
    if verdict[1] is not None:
        raise ConfigError(verdict[1])
    return Path(verdict[0])


def _train(cfg: TrainConfig, dist: distributed.DistInfo, ckpt: dict | None, save: Checkpointer,
           overwrite: bool) -> TrainResult:
    out = Path(cfg.output)
    say = tqdm.write if dist.is_main else (lambda *a, **k: None)
    data = build_data(cfg, dist)
    task = get_task(data.task)
    state, criterion = build_training(cfg, data, dist)
    seed = cfg.seed + 1000 * dist.rank  # dropout, drop-path, mixup: different on every rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if ckpt is not None:
        restore(ckpt, state, dist)
        save.last = (state.epoch, state.step)
        say(f"resuming {out} at epoch {state.epoch}, step {state.step}")
        before = ckpt["config"].get("epochs")
        if before != cfg.epochs:
            was = ckpt["optimizer"]["param_groups"][0]["lr"]
            say(f"epochs {before} -> {cfg.epochs}: the learning rate now follows the {cfg.epochs}-epoch schedule "
                f"from update {state.global_step} on ({was:.4g} -> {state.optimizer.param_groups[0]['lr']:.4g})")
    if dist.is_main:
        for name in OUTPUT_FILES:
            if overwrite and ckpt is None:
                (out / name).unlink(missing_ok=True)  # the old run goes as the new one starts writing
            for tmp in out.glob(f".{name}.*.tmp"):  # left by a run killed while writing
                tmp.unlink(missing_ok=True)
        atomic_write(out / "config.yaml", lambda f: f.write(to_yaml(cfg).encode()))
        n_params = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
        held = (f" (held out of training), {len(data.data.test)} test" if data.test_loader is not None else "")
        say(f"{cfg.model} ({n_params:,} params) on {data.kind}: {data.train_size} train / {data.val_size} val{held} "
            f"images, {data.num_classes} classes; {cfg.epochs} epochs of {data.batches_per_epoch} steps, "
            f"batch {cfg.batch_size} on {dist.world_size} x {dist.device.type}; output {out}")
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
            row = _end_epoch(cfg, state, data, dist, stats, t0)
            save(state)
        except NonFiniteLossError as err:
            hint = "Lower --lr" + ("" if cfg.grad_clip else " or set --grad-clip")
            raise NonFiniteLossError(f"{err}; {save.describe_last()}. {hint}") from None
        if dist.is_main:
            _write_metrics(state.history, out, f"{cfg.model} on {data.kind}", data)
            if state.best_epoch >= 0:  # the model card of the best weights so far, with the run's numbers
                write_run_card(out, cfg, data, state.history, state.best_epoch, dist.world_size, task=task)
            skipped = f", {row['skipped']} unreadable images skipped" if "skipped" in row else ""
            say(f"epoch {row['epoch'] + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss "
                f"{row['val_loss']:.4f}, {task.epoch_summary(row)}, {row['img_per_s']:.0f} img/s, "
                f"{row['seconds']:.0f} s{skipped}")
    metric = task.metric
    result = TrainResult(out, state.history, state.best_top1, state.best_epoch, metric)
    test = _score_test(cfg, state, data, dist) if state.history else None
    if dist.is_main and state.history:
        name = task.metric_label
        table = task.final_table(result.final, data.data.classes, out)
        say(f"{table}done in {time.perf_counter() - t_start:.0f} s: final {name} {result.final[metric]:.2f} % "
            f"(best {state.best_top1:.2f} % after epoch {state.best_epoch + 1})\n"
            f"  metrics: {out / 'metrics.csv'}\n  plot:    {out / 'curves.png'}\n"
            f"  weights: {result.weights} (timm hub layout, with {out / hub.CONFIG_NAME})\n"
            f"  resume:  {out / 'last.pt'}, config: {out / 'config.yaml'}\n"
            f"  load with: {hub.load_line(out)}")
        if test is not None:
            key = metric.replace("val_", "test_", 1)
            say(f"test split ({test['images']} images, scored once): {name} {test['selected'][key]:.2f} % with the "
                f"weights of epoch {test['selected_epoch'] + 1} (chosen on {test['selected_on']}), "
                f"{test['final'][key]:.2f} % with the final weights; {out / TEST_FILE}")
    return result


def _score_test(cfg: TrainConfig, state: TrainState, data: DataBundle, dist: distributed.DistInfo) -> dict | None:
    """Score the test split once with the selected (best validation) weights and once with the final ones.

    Only runs whose validation images are held out of the training split have a test split apart from
    validation (``--holdout``); the scores go to ``test.json`` (never used to choose anything).
    """
    if data.test_loader is None or state.best_epoch < 0:
        return None
    if dist.distributed:
        tdist.barrier()  # rank 0 wrote the selected weights
    selected = copy.deepcopy(state.model)
    selected.load_state_dict(load_weights(Path(cfg.output) / hub.WEIGHTS_NAME)[0])
    task = get_task(data.task)
    scores = {}
    for which, model in (("selected", selected), ("final", state.model)):
        res = task.evaluate(model, data.test_loader, data.eval_pipeline, dist, amp=cfg.amp, progress=cfg.progress,
                            desc=f"test ({which})", num_classes=data.num_classes)
        scores[which] = {k.replace("val_", "test_", 1): v for k, v in res.items()
                         if k not in ("confusion", "images", "skipped")}
        images = res["images"]
    held = data.data.holdout
    report = dict(selected_epoch=state.best_epoch, final_epoch=len(state.history) - 1,
                  selected_on=f"{task.metric} of {data.val_size} training "
                              f"images held out (--holdout {held}, permutation seed {HOLDOUT_SEED})",
                  images=images, **scores)
    if dist.is_main:
        atomic_write(Path(cfg.output) / TEST_FILE, lambda f: f.write(json.dumps(report, indent=1).encode()))
    return report


def _write_metrics(history: list[dict], out: Path, title: str, data: DataBundle) -> None:
    """metrics.csv and curves.png (and the task's own files, e.g. class_iou.csv), rewritten after every epoch."""
    get_task(data.task).write_metrics(history, out, title, data.data.classes)


def _end_epoch(cfg: TrainConfig, state: TrainState, data: DataBundle, dist: distributed.DistInfo, stats: dict,
               t0: float) -> dict:
    """Evaluate (and the EMA), append the metrics row, keep the best weights, advance to the next epoch."""
    if dist.distributed and not cfg.sync_bn:
        distribute_bn(state.model, dist.world_size, reduce=False)  # evaluate and save rank 0's BN statistics
    task = get_task(data.task)
    kw = dict(amp=cfg.amp, progress=cfg.progress, num_classes=data.num_classes)
    val = task.evaluate(state.model, data.val_loader, data.eval_pipeline, dist, **kw)
    # Checked before anything is kept: diverged weights or BN statistics (the training loss can stay finite
    # while a running_var overflows), and a NaN validation loss, which must never count as a best epoch.
    check_finite(state, dist, f"at the end of epoch {state.epoch}")
    _check_val_loss(val, state.epoch, "")
    metric = task.metric
    row = dict(epoch=state.epoch, lr_mean=stats["lr_mean"], train_loss=stats["train_loss"],
               val_loss=val["val_loss"], **{k: val[k] for k in task.scores}, img_per_s=stats["img_per_s"],
               seconds=0.0, **task.row(val))
    score, best_model = val[metric], state.model
    if state.ema is not None:  # then the EMA weights are the ones kept
        ema_val = task.evaluate(state.ema.module, data.val_loader, data.eval_pipeline, dist, desc="eval EMA", **kw)
        _check_val_loss(ema_val, state.epoch, "EMA ")
        row.update({f"ema_{k}": v for k, v in ema_val.items() if k.startswith("val_")})
        score, best_model = ema_val[metric], state.ema.module
    if stats["skipped"] or val["skipped"]:
        row["skipped"] = stats["skipped"] + val["skipped"]
    row["seconds"] = time.perf_counter() - t0
    state.history.append(row)
    if score > state.best_top1:  # NaN (a segmentation set without labelled pixels) is never the best
        state.best_top1, state.best_epoch = score, state.epoch
        if dist.is_main:
            meta = dict(epoch=state.epoch, **{metric: score}, data=data.kind, data_dir=data.root,
                        ema=state.ema is not None, **task.weights_meta())
            _save_best(cfg, data, best_model, meta)
    state.epoch, state.step, state.loss_sum, state.seen, state.skipped = state.epoch + 1, 0, 0.0, 0, 0
    state.lr_sum, state.updates = 0.0, 0
    return row


def _check_val_loss(val: dict, epoch: int, what: str) -> None:
    if not math.isfinite(val["val_loss"]):
        raise NonFiniteLossError(f"the {what}validation loss became NaN/inf at the end of epoch {epoch}; "
                                 "training stopped")


def _save_best(cfg: TrainConfig, data: DataBundle, model: torch.nn.Module, metadata: dict) -> None:
    """The best weights as timm's hub layout in the output folder (``config.json`` + ``model.safetensors``)."""
    classes = list(data.data.classes or [])
    folder = data.kind == "imagefolder"  # the evaluation transform of image folders: resize, centre crop
    # (VOC folders are segmented whole, at their own size: no resize, no crop)
    hub.save_pretrained(model, cfg.output, architecture=cfg.model, model_args=cfg.model_kwargs,
                        input_size=(data.in_chans, data.data.img_size, data.data.img_size), mean=data.mean,
                        std=data.std, crop_pct=cfg.crop_pct if folder else None,
                        interpolation="bilinear" if folder else None,
                        label_names=classes if len(classes) == data.num_classes else None, metadata=metadata)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a recipe (resumable, DDP via torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe name (see --list-recipes) or path to a .yaml file")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt (only --epochs and "
                   "run-time settings may change; more epochs follow the schedule of a run that long)")
    p.add_argument("--overwrite", action="store_true", help="replace the run the --output folder holds")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    add_config_arguments(p)
    p.set_defaults(func=lambda args: run_command("openaff train", lambda: run_from_args(args)))


def run_from_args(args: argparse.Namespace) -> int:
    """``openaff train``'s work from its parsed arguments (also ``openaff segment train``'s); the exit status."""
    try:
        return _command(args)
    except KeyboardInterrupt as err:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the other ranks stay quiet
            note = (getattr(err, "__notes__", None) or ["interrupted"])[-1]
            print(f"openaff train: {note}", file=sys.stderr, flush=True)
        return 130


def _command(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print("\n".join(recipe_names()))
        return 0
    ckpt = None
    if args.resume:
        if args.recipe:
            raise ConfigError("--resume takes the configuration of the run it continues; drop --recipe")
        if args.overwrite:
            raise ConfigError(f"--resume {args.resume} continues a run and --overwrite replaces one; drop one of them")
        ckpt = load_resume_checkpoint(args.resume)
        explicit = {f.name for f in fields(TrainConfig) if hasattr(args, f.name)}
        given = config_from_args(args, base={**ckpt["config"], "output": args.resume})
        cfg = resume_config(ckpt, args.resume, given, explicit)
    else:
        cfg = config_from_args(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    _run_training(cfg, ckpt, args.overwrite)
    return 0
