"""What every command shares: the one-line error, flags under both spellings, common flags."""

from __future__ import annotations

import argparse

import torch

from ..dtypes import DTYPES


class CLIError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str, **kwargs):
    """Add a flag under both spellings, `--kebab-case` and `--snake_case`."""
    spellings: list[str] = []
    for name in names:
        body = name.lstrip("-")
        for spelling in ("--" + body.replace("_", "-"), "--" + body.replace("-", "_")):
            if spelling not in spellings:
                spellings.append(spelling)
    return parser.add_argument(*spellings, **kwargs)


def add_dataset_flag(parser, *names: str, what: str, default: str = "default"):
    """A dataset flag whose help lists every named dataset (`blocksparse.integration.data`)."""
    from ..integration.data import dataset_help

    return add_flag(parser, *names, default=default, help=f"{what}: {dataset_help(default)}")


def add_dtype_flag(parser, what: str = "compute dtype"):
    return add_flag(parser, "--dtype", choices=sorted(DTYPES), default="float32",
                    help=f"{what} (default: %(default)s)")


def resolve_device(requested: str | None) -> str:
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")
