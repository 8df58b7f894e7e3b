"""What every command shares: the one-line error, flags under both spellings, common flags and checks."""

from __future__ import annotations

import argparse
import math
import os

import torch

from ..bench.common import write_json  # noqa: F401  (the commands' JSON writer)
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


def check_finite(args: argparse.Namespace, separator: str = "-") -> None:
    """Refuse NaN and infinity in every float flag: they pass every `<` / `<=` range check.

    separator: how the command's messages spell flags (`--sink-weight` or `--lora_alpha`).
    """
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise CLIError(f"--{name.replace('_', separator)} must be a finite number, got {value}")


def resolve_device(requested: str | None) -> str:
    """The --device to run on (default: cuda if available, else cpu), refused if this machine lacks it."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise CLIError(f"--device {requested!r} is not a torch device (expected e.g. cpu, cuda or cuda:1)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    try:
        torch.empty(0, device=device)
    except RuntimeError as err:  # e.g. cuda:7 on a machine with fewer devices
        raise CLIError(f"--device {requested}: {(str(err).splitlines() or ['unavailable'])[0]}") from err
    return requested


def check_output_file(flag: str, path: str) -> None:
    """Refuse an output file that cannot be written, before the work whose result it is to hold."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a directory; expected a file path")
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{flag} {path!r}: directory {parent!r} is not writable")
