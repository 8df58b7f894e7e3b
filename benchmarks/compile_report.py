"""Thin wrapper: `python benchmarks/compile_report.py ...` = `python -m blocksparse.kernels.aot ...`.

Run it as a script: it clears TRITON_INTERPRET before the kernels are imported.
"""

import sys

from blocksparse.kernels.aot import main

if __name__ == "__main__":
    sys.exit(main())
