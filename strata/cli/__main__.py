"""``python -m strata.cli``: the command line (as ``python -m strata``)."""

import sys

from strata.cli import main

sys.exit(main())
