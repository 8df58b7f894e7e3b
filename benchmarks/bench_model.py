"""Thin wrapper: `python benchmarks/bench_model.py ...` = `python -m blocksparse.bench.model ...`."""

import sys

from blocksparse.bench.model import main

if __name__ == "__main__":
    sys.exit(main())
