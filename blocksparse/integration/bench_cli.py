"""`blocksparse bench`: run the kernel and/or model benchmark of the checkout.

    blocksparse bench --quick --out runs/bench            # both, ~2 min on 2 CPU cores
    blocksparse bench kernels --out runs/k --args "--shapes 4096x4096 --m 1,256"
    blocksparse bench model --out runs/m --args "--config llama2-7b --num-layers 8"

The benchmarks live in `benchmarks/` beside the package (they are scripts, not
part of the installed package), so this needs a source checkout (`pip install -e .`).
`--args` go to the benchmark script unchanged (see `python benchmarks/bench_kernels.py
--help`); with `all`, results land in OUT/kernels and OUT/model.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from ..cli import CLIError, add_flag

TARGETS = {"kernels": "bench_kernels.py", "model": "bench_model.py"}


def benchmarks_dir() -> Path:
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not all((folder / name).is_file() for name in TARGETS.values()):
        raise CLIError(f"benchmark scripts not found in {folder}: `blocksparse bench` needs a source "
                       f"checkout installed with `pip install -e .`")
    return folder


def _load(script: Path):
    spec = importlib.util.spec_from_file_location(f"blocksparse_bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "bench", help="benchmark block-sparse vs dense: kernels and/or the whole model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default="all", choices=("all",) + tuple(TARGETS),
                        help="which benchmark (default: all)")
    add_flag(parser, "--out", default="runs/bench", help="output folder (default runs/bench)")
    add_flag(parser, "--quick", action="store_true", help="the ~1 minute CPU settings of each benchmark")
    add_flag(parser, "--args", dest="extra", default="",
             help="arguments passed to the benchmark script, quoted, e.g. --args '--shapes 4096x4096 --m 1,256'")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    folder = benchmarks_dir()
    extra = shlex.split(args.extra)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    if len(targets) > 1 and extra:
        raise CLIError("--args go to one benchmark script: name it (kernels or model)")
    for target in targets:
        out = Path(args.out) / target if len(targets) > 1 else Path(args.out)
        argv = ["--out", str(out)] + (["--quick"] if args.quick else []) + extra
        module = _load(folder / TARGETS[target])
        try:
            code = module.main(argv)
        except SystemExit as exit_:  # argparse errors and bad values in the scripts
            if exit_.code not in (0, None):
                raise CLIError(f"bench {target}: {exit_.code if isinstance(exit_.code, str) else 'bad arguments'}")
            code = 0
        if code:
            return code
    return 0
