"""``openaff study``: the command line of :mod:`openaff.study`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..errors import flag_type, run_command
from . import __doc__ as STUDY_DOC  # the package's docstring is the command's description (set before this loads)
from .grid import run_study
from .paper import TABLE_FUSIONS
from .report import study_markdown_best, summarize
from .scenarios import StudyError

_int = flag_type(int, what="an integer")


def _positive(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    return flag_type(cast, what="a number > 0", gt=0)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="the paper's fusion study: a grid of training runs and its tables",
                              description=STUDY_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=None, help="where the fusion sits: same-layer | short-skip "
                   "| long-skip (FPN, mIoU; with a segmentation recipe); default short-skip")
    p.add_argument("--family", default=None, help="model family of the scenario (short-skip: resnet, resnext)")
    p.add_argument("--fusions", default=None, help="comma-separated fusion types (default: the seven of Table 4: "
                   "add,concat,ms_gau,ms_se,ms_sa,aff,iaff)")
    p.add_argument("--table", type=_int, default=None, choices=sorted(TABLE_FUSIONS), metavar="{3,4,6}",
                   help="the fusion types of a paper table: 3 (context scale), 4 (fusion types), 6 (AFF variants)")
    p.add_argument("--depths", default=None, help="blocks per stage b, comma-separated (default 1,2,3,4)")
    p.add_argument("--seeds", type=_positive(int), default=None, help="seeds per cell: 0 .. N-1 (default 3)")
    p.add_argument("--data", default=None, help="fashion-mnist | fashion-mnist-scenes | cifar10:DIR | cifar100:DIR "
                   "(coarse labels, as the paper) (default: the recipe's)")
    p.add_argument("--cifar100-labels", choices=("coarse", "fine"), default=None,
                   help="CIFAR-100 labels (default coarse: the paper's 20 superclasses)")
    p.add_argument("--recipe", default=None, help="base training recipe, a name or a .yaml path (default study-cpu; "
                   "study-gpu follows the authors' study training)")
    p.add_argument("--epochs", type=_positive(int), default=None, help="override the recipe's epochs")
    p.add_argument("--limit-train", type=_positive(int), default=None, help="train on the first N images only")
    p.add_argument("--limit-val", type=_positive(int), default=None, help="validate on the first N images only")
    p.add_argument("--width-mult", type=_positive(float), default=None, help="model width multiplier")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads per run (default: 1 with --jobs > 1, else the recipe's)")
    p.add_argument("--jobs", type=_positive(int), default=1, help="runs trained at a time, each its own process")
    p.add_argument("--launcher", choices=("local", "submitit-local", "slurm"), default=None,
                   help="local: this machine's process pool (default); slurm: each run a Slurm job through submitit; "
                   "submitit-local: submitit's jobs on this machine (see docs/study.md)")
    p.add_argument("--launcher-config", metavar="YAML|K=V,...", default=None,
                   help="the launcher's options: a YAML file or KEY=VALUE,... (slurm: partition, time (minutes), "
                   "gpus_per_task, cpus_per_task, mem, array_parallelism, setup, ...)")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="study folder (default: runs/study-<scenario>-<data>-<time>); an existing one continues")
    p.add_argument("--contrasts", metavar="A-B,...", default=None,
                   help="paired contrasts over seeds in table.md, e.g. aff-add,iaff-aff (default: those of "
                        "aff-add, iaff-add, iaff-aff, aff-ms_gau, iaff-ms_gau, aff@r2-aff, aff@r2-ms_gau, add_bn-add, "
                        "aff-add_bn, concat-add whose types are in the grid); Holm-corrected; also with --summarize")
    p.add_argument("--summarize", metavar="DIR", default=None, help="re-aggregate the study in DIR, train nothing")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the grid")
    p.set_defaults(func=lambda args: run_command("openaff study", lambda: _run(args)))


_STUDY_FLAGS = ("scenario", "family", "fusions", "table", "depths", "seeds", "data", "cifar100_labels", "recipe",
                "epochs", "limit_train", "limit_val", "width_mult", "threads", "output", "launcher", "launcher_config")


def _run(args: argparse.Namespace) -> int:
    if args.summarize is not None:
        given = [f"--{k.replace('_', '-')}" for k in _STUDY_FLAGS if getattr(args, k) is not None]
        if given or args.jobs != 1:
            raise StudyError(f"--summarize re-aggregates a study as it was run; drop {' '.join(given) or '--jobs'}")
        summarize(args.summarize, contrasts=args.contrasts)
        return 0
    kwargs = {k: getattr(args, k) for k in _STUDY_FLAGS if getattr(args, k) is not None}
    result = run_study(**kwargs, jobs=args.jobs, progress=args.progress, contrasts=args.contrasts)
    print(study_markdown_best(result))
    return 0
