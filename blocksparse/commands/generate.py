"""`blocksparse generate`: read what a (pruned, recovered) model writes, streamed as it comes.

    blocksparse generate --model runs/pruned50 --adapter runs/lora50 --prompt "The history of the city"
    blocksparse generate --model runs/pruned50 --prompts prompts.txt --compare      # + the dense model

Greedy by default (`--temperature 0`); `--compare` runs the same prompts on the dense
model the checkpoint was pruned from (its prune_report.json names it; `--dense`
overrides). Chat models get their chat template unless `--no-chat-template`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..dtypes import DTYPES
from .args import CLIError, add_dtype_flag, add_flag, check_finite, resolve_device


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "generate", help="generate text with a dense or sparse model (optionally + a LoRA adapter)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--model", default="default",
             help="'default', a model directory (dense or a blocksparse sparse checkpoint) or a hub id")
    add_flag(parser, "--adapter", default=None, metavar="DIR", help="PEFT (LoRA) adapter, applied unmerged")
    add_flag(parser, "--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable)")
    add_flag(parser, "--prompts", default=None, metavar="FILE", help="a text file, one prompt per line")
    add_flag(parser, "--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    add_flag(parser, "--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    add_flag(parser, "--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0")
    add_flag(parser, "--seed", type=int, default=None, help="sampling seed (default: 0)")
    add_flag(parser, "--compare", action="store_true",
             help="also run the prompts on the dense model the checkpoint was pruned from (or --dense)")
    add_flag(parser, "--dense", default=None, metavar="MODEL", help="the dense model for --compare")
    add_flag(parser, "--no-chat-template", action="store_true", help="feed the prompts as plain text")
    add_dtype_flag(parser)
    add_flag(parser, "--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)
    return parser


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise CLIError(f"--prompts {args.prompts!r} is not a file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CLIError("give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _dense_source(args) -> str:
    from ..integration.checkpoint import pruned_from

    source = args.dense or pruned_from(args.model)
    if source is None:
        raise CLIError(f"--compare: {args.model!r} records no dense model it was pruned from (prune_report.json); "
                       "give --dense")
    return source


def run(args) -> int:
    from transformers import TextStreamer

    from ..integration.generation import Sampling, generate
    from ..integration.model import ModelNotFoundError, load_model

    check_finite(args, "-")
    prompts = _prompts(args)
    if args.dense is not None and not args.compare:
        raise CLIError("--dense names the model for --compare: give --compare with it")
    if args.temperature == 0 and (args.top_p != 1.0 or args.seed is not None):
        raise CLIError("--top-p and --seed shape sampling: give --temperature > 0 with them (0 = greedy)")
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed or 0)
    except ValueError as err:
        raise CLIError(str(err).replace("max_new_tokens", "--max-new-tokens").replace("top_p", "--top-p")
                       .replace("temperature must", "--temperature must")) from err
    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise CLIError(f"--adapter {args.adapter!r} is not a PEFT adapter directory (no adapter_config.json)")
    device = resolve_device(args.device)
    names = [("model", args.model)] + ([("dense", _dense_source(args))] if args.compare else [])
    models = {}
    try:
        for role, name in names:
            models[role] = load_model(name, dtype=DTYPES[args.dtype], device=device)
        if args.adapter is not None:
            from ..integration.peft import load_adapter

            model, tokenizer = models["model"]
            models["model"] = (load_adapter(model, args.adapter).eval(), tokenizer)
    except (ModelNotFoundError, ValueError, OSError) as err:  # OSError: an adapter that does not fit
        raise CLIError(str(err)) from err
    label = {"model": args.model + (f" + {args.adapter}" if args.adapter else ""), "dense": names[-1][1]}
    totals = {role: [0, 0.0] for role in models}
    for i, prompt in enumerate(prompts):
        print(f"\n=== prompt {i + 1}: {prompt}")
        for role, (model, tokenizer) in models.items():
            print(f"--- {label[role]}:", flush=True)
            try:
                result = generate(model, tokenizer, prompt, sampling, chat_template=not args.no_chat_template,
                                  streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
            except ValueError as err:
                raise CLIError(str(err)) from err
            totals[role][0] += result["new_tokens"]
            totals[role][1] += result["seconds"]
    print()
    for role, (tokens, seconds) in totals.items():
        print(f"{label[role]}: {tokens} tokens in {seconds:.1f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s")
    return 0
