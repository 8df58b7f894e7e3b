"""The measured recipes the demo runs and the benchmarks compare: the pruning recipe and the
recovery recipes (README, "Pruning", "Recovery, measured" and "What `make demo` shows", says
what each buys)."""

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


# Recovery recipes: what trains and with which loss, compared by `blocksparse bench recovery`
# (README, "Recovery, measured"). LoRA targets "seed" = the family's default (q_proj, v_proj),
# "all" = its seven projections; dropout on the LoRA input. lr: the base rate the benchmark's
# sweep multiplies (where a 0.3 / 1 / 3x sweep at 10k tokens chose its top multiple, the base
# moved up to it). `lora16` trains without dropout: one pass over unseen text leaves it
# nothing to regularise, and its keep masks cost 1.1-1.3x in step time (docs/DESIGN.md, 6b').
RECOVERY_RECIPES = {
    "seed": dict(lora=dict(r=8, alpha=16, dropout=0.05, targets="seed"), lr=3e-4,
                 about="the seed's adapter: LoRA r=8 on q/v, dropout 0.05, LM loss (its rate swept)"),
    "lora16": dict(lora=dict(r=16, alpha=32, dropout=0.0, targets="all"), lr=1e-3,
                   about="LoRA r=16 on all seven projections, no dropout, LM loss"),
    "lora16_kd": dict(lora=dict(r=16, alpha=32, dropout=0.05, targets="all"), lr=1e-3, distill=dict(kl_weight=0.5),
                      about="+ logit KD (KL to the dense teacher, weight 0.5), LoRA dropout 0.05"),
    "lora16_kd_hidden": dict(lora=dict(r=16, alpha=32, dropout=0.05, targets="all"), lr=1e-3,
                             distill=dict(kl_weight=0.5, hidden_weight=1.0),
                             about="+ logit KD and SquareHead hidden-state distillation, LoRA dropout 0.05"),
    "values_kd_hidden": dict(values=True, lr=3e-4, distill=dict(kl_weight=0.5, hidden_weight=1.0),
                             about="the kept blocks trained, KD + hidden-state distillation"),
    "values_lora16_kd_hidden": dict(values=True, lora=dict(r=16, alpha=32, dropout=0.05, targets="all"), lr=1e-3,
                                    values_lr_ratio=0.1, distill=dict(kl_weight=0.5, hidden_weight=1.0),
                                    about="kept blocks + LoRA r=16 (dropout 0.05), KD + hidden-state distillation"),
}
# The seed's recipe, which the demo trains beside its own at the same budget.
SEED_RECIPE = "seed"
# The demo's recovery step. Per minute of training, LoRA r=16 on all seven projections and
# the kept blocks trained with distillation were level at the demo's budget on the 160k-token
# curves; the kept blocks with LoRA and distillation recover more per token but cost 2x
# lora16's steps, and at the demo's budget fell behind it (README, "What `make demo` shows").
# The LoRA recipe also leaves a PEFT adapter and needs no teacher in memory.
DEMO_RECIPE = "lora16"
# Its steps of 1 x 256 tokens (and the seed recipe's beside it): ~92k tokens each, what
# the whole demo's ~12-13 minutes on 2 CPU cores hold with bf16 autocast, as long as the
# previous demo's 208 steps one run after the other took in the same hour (README).
DEMO_STEPS = 360


# What recover() trains in: fp32, or bf16 autocast (fp32 weights and optimizer).
PRECISIONS = ("fp32", "bf16")


def check_overrides(recipe: str, lora_r: int | None, target_modules: tuple[str, ...] | None) -> None:
    """Refuse LoRA overrides for a recipe that trains no adapter (ValueError, one line)."""
    if (lora_r is not None or target_modules is not None) and "lora" not in RECOVERY_RECIPES[recipe]:
        raise ValueError(f"recipe {recipe!r} trains no LoRA adapter: lora_r / target_modules do not apply")


def recover(model: nn.Module, tokenizer, dataset: str, out: str | Path, recipe: str, steps: int,
            batch_size: int = 1, train_seqlen: int = 256, learning_rate: float | None = None,
            teacher: nn.Module | None = None, hidden_order: torch.Tensor | None = None,
            lr_scheduler_type: str = "linear", lora_r: int | None = None,
            target_modules: tuple[str, ...] | None = None, callbacks=None,
            progress: bool = True, precision: str = "fp32") -> tuple[nn.Module, dict]:
    """Train `recipe` (a RECOVERY_RECIPES name) on `model` for `steps` x `batch_size` x
    `train_seqlen` tokens of the train split, warm-up 5% of the steps (at most 20), then
    `lr_scheduler_type`; no checkpoints. learning_rate: default the recipe's; lora_r
    (alpha = 2r) and target_modules override its LoRA; progress: a tqdm bar; precision:
    "fp32", or "bf16" (autocast; the weights, adapter and optimizer stay fp32). teacher: the
    dense model the recipe distils from, if it does (hidden_order: its hidden channels'
    order in the student, `checkpoint.hidden_channel_order`). Returns the trained model (the
    PeftModel, adapter unmerged, when the recipe has LoRA) and {"recipe", "about",
    "learning_rate", "precision", "seconds", "train_tokens", "train_loss"}."""
    from ..families import family_of
    from .data import train_token_blocks
    from .peft import lora_config
    from .train import Distillation, train, training_arguments

    spec = RECOVERY_RECIPES[recipe]
    if "distill" in spec and teacher is None:
        raise ValueError(f"recipe {recipe!r} distils from the dense model: pass its teacher")
    check_overrides(recipe, lora_r, target_modules)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    lr = spec["lr"] if learning_rate is None else learning_rate
    lora = None
    if "lora" in spec:
        family, r = family_of(model), lora_r or spec["lora"]["r"]
        targets = target_modules or (family.lora_targets if spec["lora"]["targets"] == "seed" else family.projections)
        alpha = spec["lora"]["alpha"] if lora_r is None else 2 * lora_r
        lora = lora_config(r=r, lora_alpha=alpha, lora_dropout=spec["lora"]["dropout"], target_modules=tuple(targets))
    distillation = Distillation(teacher, hidden_order=hidden_order, **spec["distill"]) if "distill" in spec else None
    blocks = train_token_blocks(tokenizer, dataset, train_seqlen, max_samples=steps * batch_size)
    args = training_arguments(str(out), max_steps=steps, per_device_train_batch_size=batch_size,
                              learning_rate=lr, lr_scheduler_type=lr_scheduler_type,
                              warmup_steps=max(1, min(20, steps // 20)), logging_steps=max(1, steps // 20),
                              save_strategy="no", seed=0, disable_tqdm=not progress, bf16=precision == "bf16")
    start = time.perf_counter()
    trained, trainer, train_output = train(model, blocks, args, lora, train_sparse_values=bool(spec.get("values")),
                                           values_learning_rate=(lr * spec.get("values_lr_ratio", 1.0)
                                                                 if spec.get("values") else None),
                                           distillation=distillation, callbacks=callbacks)
    # Tokens the steps consumed (a corpus with fewer blocks than steps x batch is repeated).
    return trained, {"recipe": recipe, "about": spec["about"], "learning_rate": lr, "precision": precision,
                     "seconds": time.perf_counter() - start,
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
