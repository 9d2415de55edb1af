"""``python -m openaff.cam ARGS``: ``openaff cam ARGS``."""

import sys

from ..cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(["cam", *sys.argv[1:]]))
