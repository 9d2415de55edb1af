"""``python -m openaff.cam ARGS``: ``openaff cam ARGS``."""

import sys

from ..errors import OneLineParser
from .cli import add_parser


def main(argv: list[str] | None = None) -> int:
    """``openaff cam`` without the ``openaff`` front end."""
    parser = OneLineParser(prog="openaff")
    parser.commands = parser.add_subparsers(dest="command")
    add_parser(parser.commands)
    args = parser.parse_args(["cam", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
