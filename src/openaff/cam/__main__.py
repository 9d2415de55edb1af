"""``python -m openaff.cam ARGS``: ``openaff cam ARGS``."""

import sys

from ..errors import run_alone
from .cli import add_parser


def main(argv: list[str] | None = None) -> int:
    """``openaff cam`` without the ``openaff`` front end."""
    return run_alone("cam", add_parser, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
