"""`blocksparse eval`: perplexity of a dense or sparse model, optionally with a PEFT adapter unmerged."""

from __future__ import annotations

import os
import time

from ..dtypes import DTYPES
from .args import CLIError, add_dataset_flag, add_dtype_flag, add_flag, check_output_file, resolve_device, write_json


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="perplexity of a dense or sparse model (optionally with a PEFT adapter)",
        description="Perplexity with the Wanda convention: non-overlapping windows of --seqlen "
                    "tokens over the dataset's eval text, tail dropped.")
    add_flag(parser, "--model", default="default",
             help="'default' (embedded SmolLM2-135M-Instruct), a local model directory "
                  "(dense or a blocksparse sparse checkpoint) or a hub id (default: %(default)s)")
    add_dataset_flag(parser, "--dataset", what="text whose eval split is scored")
    add_flag(parser, "--seqlen", type=int, default=512,
             help="window length in tokens (default: %(default)s; Wanda used the model's "
                  "context, e.g. 4096 for Llama-2)")
    add_flag(parser, "--max-windows", type=int, default=None,
             help="score at most this many windows (default: all; for c4 256, as in Wanda)")
    add_flag(parser, "--batch-size", type=int, default=1, help="windows per forward pass (default: %(default)s)")
    add_flag(parser, "--adapter", default=None, metavar="DIR",
             help="PEFT (LoRA) adapter directory, applied unmerged")
    add_dtype_flag(parser)
    add_flag(parser, "--device", default=None,
             help="torch device (default: cuda if available, else cpu)")
    add_flag(parser, "--json", default=None, metavar="FILE", help="also write the result as JSON here")
    add_flag(parser, "--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from ..integration.data import C4_EVAL_WINDOWS, DatasetError, load_text, tokenize_text
    from ..integration.evaluate import count_windows, perplexity
    from ..integration.model import ModelNotFoundError, load_model

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise CLIError(f"--adapter {args.adapter!r} is not a PEFT adapter directory (no adapter_config.json)")
    device = resolve_device(args.device)
    if args.json:
        check_output_file("--json", args.json)  # before the evaluation whose result it holds
    max_windows = args.max_windows
    if max_windows is None and args.dataset == "c4":
        max_windows = C4_EVAL_WINDOWS
    started = time.perf_counter()
    try:
        text = load_text(args.dataset, "eval")  # before the model: bad input fails fast
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
        tokens = tokenize_text(tokenizer, text)
        count_windows(tokens.shape[1], args.seqlen, max_windows)
    except (ModelNotFoundError, DatasetError, ValueError) as err:
        raise CLIError(str(err)) from err
    if args.adapter is not None:
        from ..integration.peft import load_adapter

        model = load_adapter(model, args.adapter).eval()
    result = perplexity(model, tokens, args.seqlen, max_windows=max_windows,
                        batch_size=args.batch_size, progress=not args.no_progress)
    result.update(model=args.model, dataset=args.dataset, split="eval", seqlen=args.seqlen,
                  adapter=args.adapter, dtype=args.dtype, device=device,
                  seconds=round(time.perf_counter() - started, 2))
    print(f"ppl {result['ppl']:.4f} | model {args.model}"
          + (f" + adapter {args.adapter}" if args.adapter else "")
          + f" | dataset {args.dataset} (eval) | seqlen {args.seqlen} | {result['windows']} windows"
          f" | {result['tokens']} tokens | {result['seconds']:.1f} s")
    if args.json:
        write_json(args.json, result)
    return 0
