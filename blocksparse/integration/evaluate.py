"""Perplexity with the Wanda convention.

Convention: the eval text is one token sequence cut into non-overlapping windows
of `seqlen` tokens (stride = seqlen, the tail shorter than a window is dropped).
Each window is scored on its own; every token after the first of its window is
predicted, and perplexity = exp(total NLL / number of predicted tokens). This
equals Wanda's exp(sum of per-window mean losses * seqlen / (windows * seqlen)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
