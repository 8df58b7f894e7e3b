"""`blocksparse` command line: prune | finetune | eval | bench | demo.

Each subcommand lives in its own module, imported only when it runs, so
`blocksparse --help` stays fast and a missing optional dependency only breaks
the subcommand that needs it. A module registers itself with
`add_parser(subparsers)`, which returns its parser with `func=run` set.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that implements it
SUBCOMMANDS = {
    "prune": "blocksparse.integration.prune_cli",
    "finetune": "blocksparse.integration.finetune",
    "eval": "blocksparse.integration.evaluate",
    "bench": "blocksparse.integration.bench_cli",
    "demo": "blocksparse.integration.demo",
}


class CLIError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def add_flag(parser: argparse.ArgumentParser, *names: str, **kwargs):
    """Add a flag under both spellings, `--kebab-case` and `--snake_case`."""
    spellings: list[str] = []
    for name in names:
        body = name.lstrip("-")
        for spelling in ("--" + body.replace("_", "-"), "--" + body.replace("-", "_")):
            if spelling not in spellings:
                spellings.append(spelling)
    return parser.add_argument(*spellings, **kwargs)


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


if __name__ == "__main__":
    # Run as `python -m blocksparse.cli`: use the package's module, so that the
    # CLIError the subcommands raise is the class caught above.
    from blocksparse.cli import main as package_main

    sys.exit(package_main())
