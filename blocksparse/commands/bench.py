"""`blocksparse bench`: the kernel and/or whole-model benchmark (`blocksparse.bench`),
and the long measurements of quality: the grouped-mask trade-off, the recovery curves and
the one-shot cost of each sparsity structure (with the Llama-2-7B projection).

    blocksparse bench --quick --out runs/bench            # kernels and model, ~2 min on 2 CPU cores
    blocksparse bench kernels --out runs/k --args "--shapes 4096x4096 --m 1,256"
    blocksparse bench model --out runs/m --args "--config llama2-7b --num-layers 8"
    blocksparse bench recovery --out runs/recovery --args "--budgets 10000,40000"    # hours
    blocksparse bench structures --out runs/structures --args "--curves runs/recovery"

`--args` go to the benchmark unchanged (see `python -m blocksparse.bench.kernels
--help`, or `python benchmarks/bench_kernels.py --help`, the same); with `all`,
results land in OUT/kernels and OUT/model.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
from pathlib import Path

from .args import CLIError, add_flag

TARGETS = {"kernels": "blocksparse.bench.kernels", "model": "blocksparse.bench.model",
           "tradeoff": "blocksparse.bench.tradeoff", "recovery": "blocksparse.bench.recovery",
           "structures": "blocksparse.bench.structures"}
ALL = ("kernels", "model")  # what `all` runs; the quality measurements take hours and have no --quick


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "bench", help="benchmark block-sparse vs dense: kernels and/or the whole model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default="all", choices=("all",) + tuple(TARGETS),
                        help="which benchmark (default: all = kernels and model)")
    add_flag(parser, "--out", default="runs/bench", help="output folder (default runs/bench)")
    add_flag(parser, "--quick", action="store_true", help="the ~1 minute CPU settings of each benchmark")
    add_flag(parser, "--args", dest="extra", default="",
             help="arguments passed to the benchmark, quoted, e.g. --args '--shapes 4096x4096 --m 1,256'")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    extra = shlex.split(args.extra)
    targets = list(ALL) if args.target == "all" else [args.target]
    if len(targets) > 1 and extra:
        raise CLIError("--args go to one benchmark: name it (kernels or model)")
    if args.quick and args.target not in ALL + ("all",):
        raise CLIError(f"bench {args.target} has no --quick settings; choose its size with --args")
    for target in targets:
        out = Path(args.out) / target if len(targets) > 1 else Path(args.out)
        argv = ["--out", str(out)] + (["--quick"] if args.quick else []) + extra
        module = importlib.import_module(TARGETS[target])
        try:
            code = module.main(argv)
        except SystemExit as exit_:  # argparse errors and bad values in the benchmarks
            if exit_.code not in (0, None):
                raise CLIError(f"bench {target}: {exit_.code if isinstance(exit_.code, str) else 'bad arguments'}")
            code = 0
        if code:
            return code
    return 0
