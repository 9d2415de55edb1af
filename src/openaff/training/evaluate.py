"""``openaff eval``: top-1/top-5 accuracy of a weight file on a data set's validation split.

Examples::

    openaff eval --weights runs/demo                                   # model and data from the run
    openaff eval --weights runs/demo --data-dir ~/fmnist
    openaff eval --model aff_resnet50 --weights aff_resnet50.safetensors --data ~/imagenet --json r.json
    openaff eval --model aff_cifar_resnet20 --weights ckpt.pth --data cifar100 --data-dir ~/cifar \\
        --model-kwargs in_chans=3

The weights may be a training run's folder, a model folder in timm's hub layout (``config.json``
and ``model.safetensors``), our safetensors files (training and ``openaff convert`` record the
model and its settings), a ``.pt``/``.pth`` state dict, or a checkpoint holding one under
``state_dict``, ``model`` or ``state_dict_ema`` (timm, our ``last.pt``).

What the weights record is used unless a flag says otherwise: the model and its settings, the
data set (``--data``), the input size (``--img-size``), the normalisation mean/std and the
centre-crop fraction. The command prints what it evaluates with and where each setting came
from; a flag that contradicts the weights gets a one-line note, and a data set that cannot fit
them (other class or channel counts) is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from ..cpu_memory import apply_cpu_alloc
from ..data.datasets import DATA_KINDS, DATASET_STATS, SCENES_CANVAS, check_limit, resolve_source
from ..errors import CheckpointError, ConfigError, DataError, check_int, is_integer, is_number, run_command
from ..files import check_output_file, write_output_file
from ..hub import read_source
from . import distributed
from .config import make_config, parse_model_kwargs
from .data import build_data
from .factory import create_model
from .tasks import get_task

__all__ = ["add_parser", "evaluate"]

# Native image size and channels of the in-memory data sets (image folders: any size, RGB).
_NATIVE = {"fashion-mnist": (28, 1), "fashion-mnist-scenes": (SCENES_CANVAS, 1), "cifar10": (32, 3),
           "cifar100": (32, 3)}


@dataclass
class _Recorded:
    """What a weight source says about itself (None: not recorded)."""

    source: Path
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    num_classes: int | None = None
    in_chans: int | None = None
    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    data: str | None = None
    data_dir: str | None = None
    label_names: list[str] | None = None

    @classmethod
    def from_metadata(cls, source: Path, meta: dict[str, Any]) -> _Recorded:
        kwargs = dict(meta.get("model_kwargs") or {}) if isinstance(meta.get("model_kwargs"), dict) else {}
        rec = cls(source, model=meta.get("model") if isinstance(meta.get("model"), str) else None)
        rec.num_classes = _int(kwargs.pop("num_classes", None)) or _int(meta.get("num_classes"))
        rec.in_chans = _int(kwargs.pop("in_chans", None)) or _int(meta.get("in_chans"))
        rec.model_kwargs = kwargs
        size = meta.get("img_size")
        if size is None and isinstance(meta.get("input_size"), (list, tuple)) and meta["input_size"]:
            size = meta["input_size"][-1]
            rec.in_chans = rec.in_chans or _int(meta["input_size"][0])
        rec.img_size = _int(size[-1] if isinstance(size, (list, tuple)) and size else size)
        rec.mean, rec.std = _floats(meta.get("mean")), _floats(meta.get("std"))
        crop = meta.get("crop_pct")
        rec.crop_pct = float(crop) if is_number(crop) else None
        rec.data = meta.get("data") if isinstance(meta.get("data"), str) else None
        rec.data_dir = meta.get("data_dir") if isinstance(meta.get("data_dir"), str) else None
        labels = meta.get("label_names")
        rec.label_names = [str(n) for n in labels] if isinstance(labels, list) else None
        return rec


def _int(value: Any) -> int | None:
    return value if is_integer(value) and value > 0 else None


def _floats(value: Any) -> tuple[float, ...] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    return None


def _load_source(weights: str | Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], _Recorded]:
    """The state dict and the record of a weight file, a run folder or a hub-layout model folder.

    The model is built here rather than by :func:`openaff.hub.load_pretrained`: the data set decides its classes.
    """
    src = read_source(weights, use_ema)
    return src.state_dict, _Recorded.from_metadata(src.path if src.config is not None else src.weights, src.record())


def _classifier_shape(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    weight = sd.get(f"{name}.weight") if isinstance(name, str) else None
    return (f"{name}.weight", weight.shape[0]) if weight is not None else None


def _choose_data(data: str | None, data_dir: str | None, rec: _Recorded) -> tuple[str, str | None, str]:
    """``(data, data_dir, where from)``: the flags, else what the weights record, else Fashion-MNIST."""
    if data is not None:
        return data, data_dir, "given"
    if data_dir is not None:
        # A folder alone: its kind is what the folder holds, or the recorded kind where it cannot tell.
        try:
            kind, _ = resolve_source(data_dir, None)
            return kind, data_dir, "given"
        except DataError:
            if rec.data in DATA_KINDS:
                return rec.data, data_dir, "given; kind from the weights"
            raise
    if rec.data is not None:
        rec_dir = rec.data_dir if rec.data in DATA_KINDS else None
        return rec.data, rec_dir, "from the weights"
    return "fashion-mnist", None, "the default; the weights do not record a data set"


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def evaluate(weights: str | Path, model: str | None = None, data: str | None = None, data_dir: str | None = None,
             *, model_kwargs: dict | None = None, use_ema: bool = False, batch_size: int = 256,
             workers: int | None = None, device: str = "auto", amp: str = "none", channels_last: bool = False,
             img_size: int | None = None, crop_pct: float | None = None, cifar100_labels: str = "fine",
             limit: int | None = None, skip_corrupt: bool = False, threads: int | None = None,
             cpu_alloc: str = "retain", progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Evaluate ``weights`` on the validation/test split of a data set; the Python API of ``openaff eval``.

    Settings left at None come from what the weights record (see the module docstring).

    Args:
        weights: weight file, training run folder, or model folder with ``config.json``.
        model: timm model name (default: the one the weights record).
        data: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder`` or a data directory
            (default: the recorded data set, else the kind of ``data_dir``, else Fashion-MNIST).
        data_dir: the directory when ``data`` is a kind.
        model_kwargs: extra ``timm.create_model`` keywords (added to the recorded ones).
        use_ema: prefer EMA weights of a checkpoint holding both.
        batch_size: images per step.
        workers: data loader worker processes (default: 0 for in-memory data, up to 8 for folders).
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: ``none``, ``bf16`` or ``fp16``.
        channels_last: NHWC memory layout.
        img_size: input size for image folders (default: the recorded one, else the model's).
        crop_pct: centre-crop fraction for image folders (default: the recorded one, else 0.875).
        cifar100_labels: ``fine`` or ``coarse``.
        limit: evaluate only the first N images.
        skip_corrupt: skip and count unreadable images.
        threads: CPU threads (torch.set_num_threads; default: torch's).
        cpu_alloc: on the CPU, ``"retain"`` keeps freed memory in the process so that batches do not
            page-fault (:mod:`openaff.cpu_memory`, process-wide); ``"system"`` leaves malloc alone.
        progress: show a progress bar.
        log: called with the line that says what is evaluated with, and with each note (a flag that
            contradicts the weights); without it the notes are issued as warnings.

    Returns:
        ``top1``, ``top5`` (%), ``loss``, ``images``, ``skipped``, ``model``, ``weights``, ``data``,
        ``data_dir``, ``img_size``, ``mean``, ``std``, ``notes`` and ``task`` (``classify``). A segmentation
        model (``task`` ``segment``; top-1/top-5 None) adds ``miou``, ``pixel_acc``, ``mean_acc``, ``fg_iou``,
        ``item_acc``, ``scene_acc`` (%, :mod:`openaff.segmentation.object_scores`), ``by_size`` (per item-side
        bin: ``sides``, ``scenes``, ``fg_iou``, ``item_acc``, ``scene_acc``; empty where the sides are unknown),
        ``class_iou`` (class name -> IoU %, NaN for a class absent from targets and predictions) and
        ``confusion`` (rows: true class, columns: predicted).
    """
    check_limit(limit, "limit")
    if threads is not None:
        check_int(threads, "threads must be a positive number")
    sd, rec = _load_source(weights, use_ema)
    notes: list[str] = []
    name = model or rec.model
    if not name:
        raise ConfigError(f"{weights} does not say which model it holds; pass --model NAME")
    if model and rec.model and model != rec.model:
        notes.append(f"the weights record the model {rec.model}; building {model} as asked")
    given_kwargs = dict(model_kwargs or {})
    for key, value in given_kwargs.items():
        if key in rec.model_kwargs and rec.model_kwargs[key] != value:
            notes.append(f"the weights record {key}={rec.model_kwargs[key]!r}; using {key}={value!r} as asked")
    kwargs = {**rec.model_kwargs, **given_kwargs}

    data, data_dir, data_how = _choose_data(data, data_dir, rec)
    try:
        kind, root = resolve_source(data, data_dir)
    except DataError as err:
        if data_how == "from the weights":
            raise DataError(f"the weights were trained on {data} (recorded in {rec.source}), which is not here: "
                            f"pass --data/--data-dir ({err})") from None
        raise
    if data_how == "given" and rec.data and rec.data in DATA_KINDS and rec.data != kind:
        notes.append(f"the weights were trained on {rec.data}; evaluating on {kind} as asked")
    native, chans = _NATIVE.get(kind, (None, 3))
    if rec.in_chans is not None and rec.in_chans != chans:
        why = "the weights do not record their data set" if data_how.startswith("the default") else ""
        raise DataError(f"the weights in {rec.source} take {rec.in_chans}-channel images but {kind} ({root}) has "
                        f"{chans}-channel images" + (f" ({kind} is the default: {why})" if why else "")
                        + "; pass the --data they were trained on")

    # Input size: for image folders the transform makes it; in-memory images have their own.
    size_how = "given"
    if kind == "imagefolder":
        if img_size is None:
            if rec.img_size:
                img_size, size_how = rec.img_size, "from the weights"
            else:
                default = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
                img_size = int((getattr(default, "input_size", None) or (3, 224, 224))[-1])
                size_how = "the model's default; the weights do not record one"
        elif rec.img_size and img_size != rec.img_size:
            notes.append(f"evaluating at {img_size} px as asked; the weights were trained at {rec.img_size} px")
        eval_size = img_size
    elif kind == "fashion-mnist-scenes":  # the canvas side is a setting of the scenes: the trained one by default
        if img_size is None:
            img_size, size_how = (rec.img_size, "from the weights") if rec.img_size else (native, "the data set's")
        elif rec.img_size and img_size != rec.img_size:
            notes.append(f"evaluating on {img_size} px scenes as asked; the weights were trained on {rec.img_size} px")
        eval_size = img_size
    elif kind == "voc":  # segmentation folders are evaluated on whole images, whatever the training crop
        eval_size, size_how = "any", "whole images"
    else:
        eval_size, size_how = native, "the data set's"
        if img_size is None and rec.img_size and rec.img_size != native:
            notes.append(f"the weights were trained at {rec.img_size} px; {kind} images are {native} px "
                         "and are evaluated at that size")
    if crop_pct is None:
        crop_pct = rec.crop_pct if rec.crop_pct is not None else 0.875
    elif kind == "imagefolder" and rec.crop_pct is not None and crop_pct != rec.crop_pct:
        notes.append(f"centre crop {crop_pct} as asked; the weights record crop_pct {rec.crop_pct}")
    if rec.mean is not None and rec.std is not None:
        mean, std, norm_how = rec.mean, rec.std, "from the weights"
    else:
        (mean, std), norm_how = DATASET_STATS[kind], "the data set's; the weights do not record theirs"
    if len(mean) != chans or len(std) != chans:
        raise DataError(f"the weights in {rec.source} record a normalisation for {len(mean)}-channel images, "
                        f"but {kind} has {chans}-channel images")

    cfg = make_config(model=name, model_kwargs=kwargs, data=data, data_dir=data_dir, batch_size=batch_size,
                      workers=workers, device=device, amp=amp, channels_last=channels_last,
                      img_size=img_size, crop_pct=crop_pct, cifar100_labels=cifar100_labels, limit_val=limit,
                      skip_corrupt=skip_corrupt)
    if threads:
        torch.set_num_threads(threads)
    dist = distributed.setup(device)
    apply_cpu_alloc(cpu_alloc, dist.device.type)
    try:
        bundle = build_data(cfg, dist, train=False, mean=mean, std=std)
        where = f"{kind} ({root})"
        hint = " (CIFAR-100: try --cifar100-labels coarse/fine)" if kind == "cifar100" else ""
        if rec.num_classes is not None and rec.num_classes != bundle.num_classes:
            raise DataError(f"the weights in {rec.source} classify {rec.num_classes} classes but the data set "
                            f"{where} has {bundle.num_classes}{hint}")
        net = create_model(cfg, bundle.num_classes, bundle.in_chans)
        head = _classifier_shape(net, sd)
        if head is not None and head[1] != bundle.num_classes:
            raise DataError(f"the weights in {rec.source} classify {head[1]} classes ({head[0]}) but the data set "
                            f"{where} has {bundle.num_classes}{hint}")
        classes = bundle.data.classes
        if rec.label_names and classes and len(classes) == len(rec.label_names) and classes != rec.label_names:
            first = next(i for i, (a, b) in enumerate(zip(classes, rec.label_names, strict=True)) if a != b)
            notes.append(f"the class folders are not the classes the weights record (class {first}: folder "
                         f"{classes[first]!r}, recorded {rec.label_names[first]!r}); labels follow folder order")
        try:
            net.load_state_dict(sd)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise CheckpointError(f"the weights in {rec.source} do not fit {name} {kwargs or ''}: {detail[:300]}") \
                from None
        net.to(dist.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        settings = f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else ""
        uses = (f"evaluating {name}{settings} from {rec.source}: data {kind} at {root} ({data_how}), "
                f"{eval_size}x{eval_size} px ({size_how}), mean {_fmt(mean)}, std {_fmt(std)} ({norm_how})")
        if log is not None:
            log(uses)
            for note in notes:
                log(f"note: {note}")
        else:
            for note in notes:
                warnings.warn(note, stacklevel=2)
        task = get_task(bundle.task)
        res = task.evaluate(net, bundle.val_loader, bundle.eval_pipeline, dist, amp=amp, progress=progress,
                            num_classes=bundle.num_classes)
    finally:
        distributed.cleanup()
    out = dict(model=name, weights=str(rec.source), data=bundle.kind, data_dir=str(root), task=bundle.task,
               top1=None, top5=None, loss=res["val_loss"], images=res["images"], skipped=res["skipped"],
               img_size=eval_size, mean=list(mean), std=list(std), notes=notes)
    out.update(task.eval_fields(res, bundle.data.classes))
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="top-1/top-5 accuracy of a weight file on a data set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True,
                   help="weight file (safetensors, PyTorch/timm checkpoint), training run folder or model folder")
    p.add_argument("--model", help="timm model name (default: recorded with the weights)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keywords, e.g. width_mult=0.25")
    p.add_argument("--data", help="fashion-mnist | cifar10 | cifar100 | imagefolder | DIR (default: recorded with "
                                  "the weights, else the kind of --data-dir, else fashion-mnist)")
    p.add_argument("--data-dir", help="the data directory when --data names a kind")
    p.add_argument("--cifar100-labels", choices=("fine", "coarse"), default="fine")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint that has them")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="loader processes (default: 0 in-memory, min(8, cores) for folders)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--img-size", type=int, help="input size for image folders (default: recorded with the weights, "
                                                "else the model's)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction for image folders (default: recorded with "
                                                  "the weights, else 0.875)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count unreadable images")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--cpu-alloc", choices=("retain", "system"), default="retain",
                   help="CPU runs: keep freed memory in the process (no page faults) or leave malloc alone")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=lambda args: run_command("openaff eval", lambda: run_from_args(args)))


def run_from_args(args: argparse.Namespace) -> int:
    """``openaff eval``'s work from its parsed arguments (also ``openaff segment eval``'s); the exit status."""
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    if args.json is not None:  # before the evaluation spends any time
        check_output_file(args.json, "--json", example="eval.json")

    def log(line: str) -> None:
        if line.startswith("note: "):
            print(f"openaff eval: {line}", file=sys.stderr, flush=True)
        else:
            print(line, flush=True)

    res = evaluate(args.weights, args.model, args.data, args.data_dir, model_kwargs=model_kwargs, use_ema=args.ema,
                   batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                   channels_last=args.channels_last, img_size=args.img_size, crop_pct=args.crop_pct,
                   cifar100_labels=args.cifar100_labels, limit=args.limit, skip_corrupt=args.skip_corrupt,
                   threads=args.threads, cpu_alloc=args.cpu_alloc, progress=args.progress, log=log)
    skipped = f", {res['skipped']} unreadable images skipped" if res["skipped"] else ""
    for line in get_task(res["task"]).eval_lines(res, skipped):
        print(line)
    if args.json:
        write_output_file(args.json, json.dumps(res, indent=1) + "\n", "--json")
    return 0
