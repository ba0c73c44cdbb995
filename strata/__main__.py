"""``python -m strata``: the command line, as ``torchrun -m strata train ...`` starts it on every rank."""

import sys

from strata.cli import main

sys.exit(main())
