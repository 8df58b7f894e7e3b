"""The measured recipes the demo runs and the trade-off benchmark compares: one pruning
recipe, one LoRA recovery step (README, "Pruning" and "The demo", says what each buys)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..families import Family


# The demo's row grouping: every 8 block rows share their block columns (fully shared), so
# the CPU's row-group GEMMs and the grouped kernels compute only the density. With greedy
# block OBS choosing whole group-columns it matched the earlier demo recipe (Wanda, free
# masks) after the LoRA step, and prefill runs faster than dense (README, "The trade-off,
# measured").
DEMO_ROW_GROUP = 8


def prune_recipe(family: Family) -> dict:
    """The demo's pruning recipe (PruneOptions fields; the row grouping is the caller's, the
    demo's DEMO_ROW_GROUP): channels reordered by importance first, greedy block OBS masks
    (`method="obc"`, which drops whole group-columns of a grouped mask by their summed
    reconstruction cost), the first layer's MLP and every value projection dense, the other
    linears paying for them, and each layer
    refined for 45 steps, the first 36 under bf16 autocast (`refine_precision`; the
    measurements behind these choices are in docs/DESIGN.md, section 6)."""
    return dict(permute_channels=True, method="obc", comparison_group="block-row", reconstruct=True,
                reconstruct_target="dense", allocation={family.mlp_path(0): 1.0, family.value_path("*"): 1.0},
                refine_steps=45, refine_precision="bfloat16")


def lora_step(model: nn.Module, tokenizer, dataset: str, out: str | Path, target_modules: tuple[str, ...],
              steps: int = 40, batch_size: int = 1, train_seqlen: int = 256, learning_rate: float = 1e-3,
              lora_r: int = 16) -> tuple[nn.Module, dict]:
    """The demo's LoRA recovery: r = lora_r, alpha = 2r, dropout 0.05 on `target_modules`,
    `steps` x `batch_size` x `train_seqlen` tokens of the train split, no checkpoints.
    Returns the PEFT model (adapter unmerged) and {"seconds", "train_tokens", "train_loss"}."""
    from .data import train_token_blocks
    from .peft import lora_config
    from .train import train, training_arguments

    blocks = train_token_blocks(tokenizer, dataset, train_seqlen, max_samples=steps * batch_size)
    args = training_arguments(str(out), max_steps=steps, per_device_train_batch_size=batch_size,
                              learning_rate=learning_rate, warmup_steps=max(1, steps // 20),
                              logging_steps=max(1, steps // 10), save_strategy="no", seed=0)
    config = lora_config(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05, target_modules=target_modules)
    start = time.perf_counter()
    peft_model, trainer, train_output = train(model, blocks, args, config)
    # Tokens the steps consumed (a corpus with fewer blocks than steps x batch is repeated).
    return peft_model, {"seconds": time.perf_counter() - start,
                        "train_tokens": round(blocks.numel() * (trainer.state.epoch or 0)),
                        "train_loss": train_output.training_loss}


def latency(models: dict[str, nn.Module], prompt: torch.Tensor, decode_tokens: int,
            repeats: int = 3) -> dict[str, dict]:
    """Prefill seconds for `prompt` [1, T] and greedy decode tokens/s with the KV cache (a
    `generate` of `decode_tokens` after a 16-token prompt, its prefill included), per
    model: medians of `repeats` rounds that visit every model in turn (interleaved, so a
    slow moment of the machine hits them all), after a warm-up that runs every shape
    once (prefill, the short prompt, one decode step). Prefill is the
    prompt pass that yields the first new token: the last position's logits only, as
    `generate` computes them (all T positions' would add a vocabulary-wide GEMM that no
    backend sparsifies)."""
    short = prompt[:, :16]
    times = {name: {"prefill": [], "decode": []} for name in models}

    def once(model, record, new_tokens):
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids=prompt, use_cache=False, logits_to_keep=1)
            record["prefill"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(input_ids=short, attention_mask=torch.ones_like(short), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True, pad_token_id=0)
            record["decode"].append(time.perf_counter() - start)

    for model in models.values():  # a warm-up: every layout built, the allocator settled
        model.eval()
        once(model, {"prefill": [], "decode": []}, 2)
    for _ in range(repeats):
        for name, model in models.items():
            once(model, times[name], decode_tokens)
    return {name: {"prefill_s": _median(t["prefill"]), "prefill_tokens": prompt.shape[1],
                   "decode_tokens_per_s": decode_tokens / _median(t["decode"])} for name, t in times.items()}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
