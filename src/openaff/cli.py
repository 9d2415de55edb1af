"""The ``openaff`` command: one sub-command per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module with `add_parser(subparsers)`. Adding a command is one line here.
COMMANDS = {
    "models": "openaff.info",
    "convert": "openaff.mxnet.convert",
    "train": "openaff.training.train",
    "eval": "openaff.training.evaluate",
    "bench": "openaff.bench",
    "export": "openaff.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openaff", description="Attentional Feature Fusion in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import openaff  # noqa: F401  (registers the models with timm)

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
