"""``python -m headpag`` (and ``torchrun -m headpag``): the command line."""

import sys

from .apps.cli import main

sys.exit(main())
