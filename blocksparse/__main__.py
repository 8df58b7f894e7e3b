"""`python -m blocksparse ...` is the `blocksparse` command."""

import sys

from blocksparse.cli import main

sys.exit(main())
