"""Thin wrapper: `python benchmarks/bench_kernels.py ...` = `python -m blocksparse.bench.kernels ...`."""

import sys

from blocksparse.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
