"""``openaff eval``: top-1/top-5 accuracy of a weight file on a data set's validation split.

Examples::

    openaff eval --weights runs/demo/best.safetensors                  # model and data from the file
    openaff eval --model aff_resnet50 --weights aff_resnet50.safetensors --data ~/imagenet --json r.json
    openaff eval --model aff_cifar_resnet20 --weights ckpt.pth --data cifar100 --data-dir ~/cifar \\
        --model-kwargs in_chans=3

The weights may be safetensors (ours carry the model name and settings), a ``.pt``/``.pth`` state
dict, or a checkpoint holding one under ``state_dict``, ``model`` or ``state_dict_ema`` (timm).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cpu_memory import apply_cpu_alloc
from . import distributed
from .checkpoint import load_weights
from .config import make_config, parse_kv
from .data import build_data
from .engine import evaluate as evaluate_loop
from .errors import CheckpointError, ConfigError, DataError, run_command
from .factory import create_model

__all__ = ["add_parser", "evaluate"]


def _classifier_shape(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    weight = sd.get(f"{name}.weight") if isinstance(name, str) else None
    return (f"{name}.weight", weight.shape[0]) if weight is not None else None


def evaluate(weights: str | Path, model: str | None = None, data: str = "fashion-mnist", data_dir: str | None = None,
             *, model_kwargs: dict | None = None, use_ema: bool = False, batch_size: int = 256,
             workers: int | None = None, device: str = "auto", amp: str = "none", channels_last: bool = False,
             img_size: int | None = None, crop_pct: float = 0.875, cifar100_labels: str = "fine",
             limit: int | None = None, skip_corrupt: bool = False, threads: int | None = None,
             cpu_alloc: str = "retain", progress: bool = True) -> dict:
    """Evaluate ``weights`` on the validation/test split of ``data``; the Python API of ``openaff eval``.

    Args:
        weights: safetensors file or PyTorch/timm checkpoint.
        model: timm model name (default: the one recorded in our safetensors files).
        data: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder`` or a data directory.
        data_dir: the directory when ``data`` is a kind.
        model_kwargs: extra ``timm.create_model`` keywords (default: those recorded in the file).
        use_ema: prefer EMA weights of a checkpoint holding both.
        batch_size: images per step.
        workers: data loader worker processes (default: 0 for in-memory data, up to 8 for folders).
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: ``none``, ``bf16`` or ``fp16``.
        channels_last: NHWC memory layout.
        img_size: input size for image folders (default 224).
        crop_pct: centre-crop fraction for image folders.
        cifar100_labels: ``fine`` or ``coarse``.
        limit: evaluate only the first N images.
        skip_corrupt: skip and count unreadable images.
        threads: CPU threads (torch.set_num_threads; default: torch's).
        cpu_alloc: on the CPU, ``"retain"`` keeps freed memory in the process so that batches do not
            page-fault (:mod:`openaff.cpu_memory`, process-wide); ``"system"`` leaves malloc alone.
        progress: show a progress bar.

    Returns:
        ``top1``, ``top5`` (%), ``loss``, ``images``, ``skipped``, ``model`` and ``weights``.
    """
    sd, meta = load_weights(weights, use_ema=use_ema)
    model = model or meta.get("model")
    if not model:
        raise ConfigError(f"{weights} does not say which model it holds; pass --model NAME")
    kwargs = {**(meta.get("model_kwargs") or {}), **(model_kwargs or {})}
    cfg = make_config(model=model, model_kwargs=kwargs, data=data, data_dir=data_dir, batch_size=batch_size,
                      workers=workers, device=device, amp=amp, channels_last=channels_last, img_size=img_size,
                      crop_pct=crop_pct, cifar100_labels=cifar100_labels, limit_val=limit, skip_corrupt=skip_corrupt)
    if threads:
        torch.set_num_threads(threads)
    dist = distributed.setup(device)
    apply_cpu_alloc(cpu_alloc, dist.device.type)
    try:
        bundle = build_data(cfg, dist, train=False)
        net = create_model(cfg, bundle.num_classes, bundle.in_chans)
        head = _classifier_shape(net, sd)
        if head is not None and head[1] != bundle.num_classes:
            raise DataError(f"the weights in {weights} classify {head[1]} classes ({head[0]}) but the data set "
                            f"{cfg.data_dir or cfg.data} has {bundle.num_classes}"
                            + (" (CIFAR-100: try --cifar100-labels coarse/fine)" if bundle.kind == "cifar100" else ""))
        try:
            net.load_state_dict(sd)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise CheckpointError(f"the weights in {weights} do not fit {model} {kwargs or ''}: {detail[:300]}") \
                from None
        net.to(dist.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        res = evaluate_loop(net, bundle.val_loader, bundle.eval_pipeline, dist, amp=amp, progress=progress)
    finally:
        distributed.cleanup()
    return dict(model=model, weights=str(weights), data=bundle.kind, top1=res["val_top1"], top5=res["val_top5"],
                loss=res["val_loss"], images=res["images"], skipped=res["skipped"])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="top-1/top-5 accuracy of a weight file on a data set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="safetensors file or PyTorch/timm checkpoint")
    p.add_argument("--model", help="timm model name (default: recorded in our safetensors files)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keywords, e.g. width_mult=0.25")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist | cifar10 | cifar100 | imagefolder | DIR")
    p.add_argument("--data-dir", help="the data directory when --data names a kind")
    p.add_argument("--cifar100-labels", choices=("fine", "coarse"), default="fine")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint that has them")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="loader processes (default: 0 in-memory, min(8, cores) for folders)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--img-size", type=int, help="input size for image folders (default 224)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="centre-crop fraction for image folders")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count unreadable images")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--cpu-alloc", choices=("retain", "system"), default="retain",
                   help="CPU runs: keep freed memory in the process (no page faults) or leave malloc alone")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=lambda args: run_command("openaff eval", lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    try:
        model_kwargs = dict(parse_kv(t) for t in args.model_kwargs)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"--model-kwargs: {err}") from None
    res = evaluate(args.weights, args.model, args.data, args.data_dir, model_kwargs=model_kwargs, use_ema=args.ema,
                   batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                   channels_last=args.channels_last, img_size=args.img_size, crop_pct=args.crop_pct,
                   cifar100_labels=args.cifar100_labels, limit=args.limit, skip_corrupt=args.skip_corrupt,
                   threads=args.threads, cpu_alloc=args.cpu_alloc, progress=args.progress)
    skipped = f", {res['skipped']} unreadable images skipped" if res["skipped"] else ""
    print(f"{res['model']} on {res['data']} ({res['images']} images{skipped}): top-1 {res['top1']:.2f} %, "
          f"top-5 {res['top5']:.2f} %, loss {res['loss']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0
