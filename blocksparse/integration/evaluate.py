"""Perplexity with the Wanda convention, and the `blocksparse eval` subcommand.

Convention: the eval text is one token sequence cut into non-overlapping windows
of `seqlen` tokens (stride = seqlen, the tail shorter than a window is dropped).
Each window is scored on its own; every token after the first of its window is
predicted, and perplexity = exp(total NLL / number of predicted tokens). This
equals Wanda's exp(sum of per-window mean losses * seqlen / (windows * seqlen)).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn.functional as F

from ..cli import CLIError, add_flag


def count_windows(num_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """Number of full windows of `seqlen` in `num_tokens`, at most `max_windows`."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (a window predicts seqlen - 1 tokens), got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    windows = num_tokens // seqlen
    if windows == 0:
        raise ValueError(f"text has {num_tokens} tokens, fewer than one window of seqlen {seqlen}")
    return windows if max_windows is None else min(windows, max_windows)


def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of `model` on `tokens` (LongTensor [1, T] or [T]).

    Returns {"ppl", "windows", "tokens", "nll"}: windows scored, tokens predicted
    (windows * (seqlen - 1)) and their summed negative log-likelihood in nats.
    The model is scored in eval mode (restored afterwards) under inference_mode.
    """
    from tqdm.auto import tqdm

    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a LongTensor [1, T] or [T], got {tokens.dtype} {list(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = count_windows(tokens.numel(), seqlen, max_windows)
    device = model.get_input_embeddings().weight.device
    all_windows = tokens[:windows * seqlen].reshape(windows, seqlen)

    was_training = model.training
    model.eval()
    nll = 0.0
    try:
        with torch.inference_mode(), tqdm(total=windows, desc=f"perplexity (seqlen {seqlen})",
                                          unit="window", disable=not progress) as bar:
            for start in range(0, windows, batch_size):
                batch = all_windows[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       batch[:, 1:].reshape(-1), reduction="sum")
                nll += loss.item()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    predicted = windows * (seqlen - 1)
    return {"ppl": math.exp(nll / predicted), "windows": windows, "tokens": predicted, "nll": nll}


# ------------------------------------------------------------------------- CLI

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="perplexity of a dense or sparse model (optionally with a PEFT adapter)",
        description="Perplexity with the Wanda convention: non-overlapping windows of --seqlen "
                    "tokens over the dataset's eval text, tail dropped.")
    add_flag(parser, "--model", default="default",
             help="'default' (embedded SmolLM2-135M-Instruct), a local model directory "
                  "(dense or a blocksparse sparse checkpoint) or a hub id (default: %(default)s)")
    add_flag(parser, "--dataset", default="default",
             help="default (held-out embedded Wikipedia), default-news, c4, wikitext2, "
                  "or a local .txt/.jsonl path (default: %(default)s)")
    add_flag(parser, "--seqlen", type=int, default=512,
             help="window length in tokens (default: %(default)s; Wanda used the model's "
                  "context, e.g. 4096 for Llama-2)")
    add_flag(parser, "--max-windows", type=int, default=None,
             help="score at most this many windows (default: all; for c4 256, as in Wanda)")
    add_flag(parser, "--batch-size", type=int, default=1, help="windows per forward pass (default: %(default)s)")
    add_flag(parser, "--adapter", default=None, metavar="DIR",
             help="PEFT (LoRA) adapter directory, applied unmerged")
    add_flag(parser, "--dtype", choices=sorted(DTYPES), default="float32",
             help="compute dtype (default: %(default)s)")
    add_flag(parser, "--device", default=None,
             help="torch device (default: cuda if available, else cpu)")
    add_flag(parser, "--json", default=None, metavar="FILE", help="also write the result as JSON here")
    add_flag(parser, "--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def load_adapter(model, adapter_dir: str):
    """Wrap `model` in the PEFT adapter at `adapter_dir`, unmerged."""
    from peft import PeftModel

    # LoRA on BlockSparseLinear is registered on the LoraConfig instance (PEFT does not
    # save it with the adapter), so the loaded config is registered and passed in.
    from .peft import register_peft

    return PeftModel.from_pretrained(model, adapter_dir, config=register_peft(adapter_dir),
                                     is_trainable=False).eval()


def run(args) -> int:
    from .data import C4_EVAL_WINDOWS, DatasetError, load_text, tokenize_text
    from .model import ModelNotFoundError, load_model

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise CLIError(f"--adapter {args.adapter!r} is not a PEFT adapter directory (no adapter_config.json)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
        model = load_adapter(model, args.adapter)
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
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0
