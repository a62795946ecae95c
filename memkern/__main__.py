"""`python -m memkern ...`: the `memkern` command."""

import sys

from memkern.cli import main

sys.exit(main())
