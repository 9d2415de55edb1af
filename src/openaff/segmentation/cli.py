"""``openaff segment``: segmentation models, training, evaluation and pictures.

Examples::

    openaff segment models                                   # the registered segmenters
    openaff segment train --recipe segment-cpu --output runs/seg
    openaff segment eval --weights runs/seg
    openaff segment predict --weights runs/seg --output runs/seg/pictures
    openaff segment predict --weights runs/seg --images photos/ --output pics
    openaff segment rescore results/segment-cpu --limit 2000     # foreground IoU, item-class accuracy, by size

``segment train`` and ``segment eval`` are ``openaff train`` and ``openaff eval`` (the same engine,
flags and files) that insist on a segmentation model; ``openaff train`` with a segmentation model
trains it the same way. ``openaff study --scenario long-skip`` runs the paper's FPN study.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..data.datasets import check_limit
from ..errors import ConfigError, check_int, run_command
from ..training import evaluate as evaluate_mod
from ..training import train as train_mod
from ..training.config import config_from_args
from .fpn import SEGMENTERS, is_segmenter
from .predict import predict
from .rescore import rescore

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("segment", help="segmentation (AFF-FPN): models, train, eval, predict pictures",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="segment_command", metavar="SUBCOMMAND")
    sub.required = True
    m = sub.add_parser("models", help="list the registered segmenters")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=lambda args: run_command("openaff segment models", lambda: _models(args)))

    train_mod.add_parser(sub)
    sub.choices["train"].set_defaults(func=lambda args: run_command(
        "openaff segment train", lambda: _train(args)))
    evaluate_mod.add_parser(sub)
    sub.choices["eval"].set_defaults(func=lambda args: run_command(
        "openaff segment eval", lambda: evaluate_mod.run_from_args(args)))

    q = sub.add_parser("predict", help="colour overlays and an image | truth | prediction grid")
    q.add_argument("--weights", required=True, help="a segmentation run or model folder")
    q.add_argument("--output", required=True, metavar="DIR", help="folder for grid.png and overlays/")
    q.add_argument("--images", metavar="DIR", help="segment these images (default: the recorded validation set)")
    q.add_argument("--data", help="validation data instead of the recorded one (fashion-mnist-scenes, voc, DIR)")
    q.add_argument("--data-dir", help="its directory")
    q.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    q.add_argument("--start", type=int, default=0, help="first validation image")
    q.add_argument("--cols", type=int, default=4, help="samples per grid row")
    q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    q.add_argument("--threads", type=int, help="CPU threads")
    q.set_defaults(func=lambda args: run_command("openaff segment predict", lambda: _predict(args)))

    s = sub.add_parser("rescore", help="score a study's saved segmenters again: foreground IoU, item-class and "
                                       "scene accuracy, by item size, paired contrasts over seeds")
    s.add_argument("study", help="a study folder whose runs/*/ hold segmentation weights (fashion-mnist-scenes)")
    s.add_argument("--output", metavar="DIR", help="folder for rescore.{csv,json,md} (default: the study folder)")
    s.add_argument("--split", choices=("test", "val"), default="test", help="the scenes' split (default test)")
    s.add_argument("--limit", type=int, help="the first N scenes (default: all of the split)")
    s.add_argument("--baseline", default="add", help="the fusion type the others are contrasted with (default add)")
    s.add_argument("--batch-size", type=int, default=250)
    s.add_argument("--amp", choices=("none", "bf16"), default="none")
    s.add_argument("--threads", type=int, help="CPU threads")
    s.set_defaults(func=lambda args: run_command("openaff segment rescore", lambda: _rescore(args)))


def _models(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(SEGMENTERS, indent=1))
    else:
        print("\n".join(["| model | what |", "|---|---|", *(f"| `{k}` | {v} |" for k, v in SEGMENTERS.items())]))
    return 0


def _train(args: argparse.Namespace) -> int:
    if not args.resume and not args.list_recipes and not (args.recipe or hasattr(args, "model")):
        args.recipe = "segment-cpu"
    if not args.resume and not args.list_recipes:
        model = config_from_args(args).model  # the whole configuration, checked once
        if not is_segmenter(model):
            raise ConfigError(f"{model} is a classifier; openaff segment train trains "
                              "segmentation models (openaff segment models lists them)")
    return train_mod.run_from_args(args)


def _rescore(args: argparse.Namespace) -> int:
    check_limit(args.limit, "--limit")
    check_int(args.batch_size, "--batch-size must be positive")
    command = "openaff segment rescore " + shlex.join(sys.argv[sys.argv.index("rescore") + 1:]) \
        if "rescore" in sys.argv else ""
    res = rescore(args.study, args.output, split=args.split, limit=args.limit, baseline=args.baseline,
                  batch_size=args.batch_size, amp=args.amp, threads=args.threads, command=command)
    out = args.output or args.study
    print(f"{len(res['runs'])} runs re-scored in {res['seconds']:.0f} s\n  table: {out}/rescore.md\n"
          f"  runs:  {out}/rescore.csv")
    return 0


def _predict(args: argparse.Namespace) -> int:
    res = predict(args.weights, args.output, images=args.images, data=args.data, data_dir=args.data_dir, n=args.n,
                  start=args.start, cols=args.cols, device=args.device, threads=args.threads)
    extra = f"; mIoU {res['miou']:.2f} %, pixel accuracy {res['pixel_acc']:.2f} % on them" if "miou" in res else ""
    print(f"{res['images']} images{extra}\n  grid:     {res['grid']}\n  overlays: {args.output}/overlays/")
    return 0
