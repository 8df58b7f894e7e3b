"""`blocksparse` command line: prune | finetune | eval | bench | demo | generate | memory.

Each subcommand lives in its own module here, imported only when it runs, so
`blocksparse --help` stays fast and a missing optional dependency only breaks
the subcommand that needs it. A module registers itself with
`add_parser(subparsers)`, which returns its parser with `func=run` set; the
modules parse flags and call the libraries (`blocksparse.prune`,
`blocksparse.integration`, `blocksparse.bench`), nothing more.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .args import CLIError

# subcommand -> module that implements it
SUBCOMMANDS = {
    "prune": "blocksparse.commands.prune",
    "finetune": "blocksparse.commands.finetune",
    "eval": "blocksparse.commands.eval",
    "bench": "blocksparse.commands.bench",
    "demo": "blocksparse.commands.demo",
    "generate": "blocksparse.commands.generate",
    "memory": "blocksparse.commands.memory",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blocksparse",
        description="16x16 block-sparse Llama: prune, fine-tune with LoRA, evaluate, benchmark.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, help=f"(run `blocksparse {name} --help`)")
            continue
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the subcommand being run.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"blocksparse {args.command}: error: {err}", file=sys.stderr)
        return 2
