"""``python -m openaff ...`` (what ``torchrun -m openaff train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
