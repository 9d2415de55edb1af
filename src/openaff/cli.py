"""The ``openaff`` command: one sub-command per job, each defined next to the code it runs.

Exit status: 0 on success; 2 for anything the user can fix (a bad flag or value, a missing or
unreadable file), reported on one line ``openaff COMMAND: error: ...`` (argparse's usage errors
and the commands' :class:`~openaff.errors.OpenAFFError` alike, the latter through
:func:`~openaff.errors.run_command`); 130 after Ctrl-C. ``openaff bench`` exits 1 when
some of its models failed to run (the others' numbers are still written).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import OneLineParser

# sub-command -> module with `add_parser(subparsers)`. Adding a command is one line here.
COMMANDS = {
    "models": "openaff.catalog",
    "convert": "openaff.mxnet.convert",
    "train": "openaff.training.train",
    "eval": "openaff.training.evaluate",
    "bench": "openaff.bench",
    "export": "openaff.export",
    "study": "openaff.study.cli",
    "cam": "openaff.cam",
    "attention": "openaff.cam",
    "segment": "openaff.segmentation.cli",
    "push": "openaff.push",
}

__all__ = ["COMMANDS", "OneLineParser", "build_parser", "main", "version"]


def version() -> str:
    """The installed distribution's version (``open-aff``), else the package's ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("open-aff")
    except PackageNotFoundError:  # run from a source tree that was never installed
        import openaff

        return openaff.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="openaff", description="Attentional Feature Fusion in PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # sub-parsers inherit OneLineParser
    parser.commands = sub
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``openaff ARGS``; returns the exit status (argparse's own exits raise ``SystemExit``).

    Args:
        argv: the arguments after ``openaff`` (default: ``sys.argv[1:]``).
    """
    import openaff  # noqa: F401  (registers the models with timm)

    args = build_parser().parse_args(argv)
    prog = f"openaff {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        # A command that can say more (train: how to resume) adds it as the exception's note.
        note = (getattr(err, "__notes__", None) or ["interrupted"])[-1]
        print(f"{prog}: {note}", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        # `openaff models | head`: the reader is gone; stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
