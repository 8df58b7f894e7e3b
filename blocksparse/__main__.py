"""`python -m blocksparse ...` is the `blocksparse` command."""

import sys

from blocksparse.commands import main

sys.exit(main())
