"""Text generation from a dense or block-sparse model (optionally with a LoRA adapter, unmerged):
what `blocksparse generate` and the demo's samples call."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Sampling:
    """Generation settings: greedy when temperature is 0 (the default), else sampled with
    top-p after `torch.manual_seed(seed)` (torch's global RNG), so a run is reproducible."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """Token ids [1, T] of `prompt`: as a user turn of the tokenizer's chat template when it
    has one (and `chat_template`), else the plain text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization")
    return ids


def _generate_options(tokenizer, sampling: Sampling) -> dict:
    """`model.generate` keyword arguments for `sampling` (seeding torch's RNG when it samples)."""
    options = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                   else tokenizer.eos_token_id)
    if sampling.temperature > 0:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        torch.manual_seed(sampling.seed)
    else:  # a model's generation_config may ask for sampling: greedy means greedy
        options.update(temperature=None, top_p=None, top_k=None)
    return options


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: str, sampling: Sampling = Sampling(), chat_template: bool = True,
             streamer=None) -> dict:
    """Continue `prompt`; returns {"text", "new_tokens", "seconds", "tokens_per_s"}.
    `streamer` (e.g. transformers' TextStreamer) receives the tokens as they come."""
    model.eval()
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, chat_template).to(device)
    options = _generate_options(tokenizer, sampling)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **options)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "seconds": seconds, "tokens_per_s": new.numel() / seconds if seconds > 0 else float("nan")}


@torch.inference_mode()
def generate_batch(model: nn.Module, tokenizer, prompts: list[str], sampling: Sampling = Sampling(),
                   chat_template: bool = True) -> list[str]:
    """Continue every prompt in one batched `generate`, the prompts padded on the left (decoding
    a batch costs about what one sequence does where the weights' bandwidth bounds it); the
    new text of each, in order."""
    model.eval()
    device = next(model.parameters()).device
    options = _generate_options(tokenizer, sampling)
    ids = [prompt_ids(tokenizer, prompt, chat_template)[0] for prompt in prompts]
    width = max(len(row) for row in ids)
    pad = options["pad_token_id"] if options["pad_token_id"] is not None else 0  # masked: any id does
    batch = torch.full((len(ids), width), pad, dtype=ids[0].dtype)
    mask = torch.zeros_like(batch)
    for r, row in enumerate(ids):
        batch[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    out = model.generate(input_ids=batch.to(device), attention_mask=mask.to(device), **options)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
