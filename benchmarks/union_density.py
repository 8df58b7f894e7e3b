"""Thin wrapper: `python benchmarks/union_density.py ...` = `python -m blocksparse.bench.union_density ...`."""

import sys

from blocksparse.bench.union_density import main

if __name__ == "__main__":
    sys.exit(main())
