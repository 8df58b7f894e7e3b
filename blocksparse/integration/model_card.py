"""Model cards (README.md, as the Hugging Face hub shows them) for what the project saves:
sparse checkpoints (from the prune report) and LoRA adapters (from the training run).
Every number in a card is one the run that wrote it measured or chose; what a run did not
record is left out, never guessed."""

from __future__ import annotations

import os
from pathlib import Path

CARD_NAME = "README.md"


def _front_matter(base_model: str | None, tags: list[str]) -> str:
    lines = ["---", "library_name: blocksparse" if "adapter" not in tags else "library_name: peft"]
    if base_model and base_model != "default" and not os.path.exists(base_model):
        lines.append(f"base_model: {base_model}")  # hub ids only: a local path means nothing on the hub
    lines += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    return "\n".join(lines)


def _version() -> str:
    from .. import __version__

    return __version__


def _recipe(report: dict) -> list[str]:
    """The recipe lines of the keys the report holds (a `finetune --sparsity` base has few)."""
    lines = []
    permutation = report.get("channel_permutation")
    if isinstance(permutation, dict) and permutation.get("hidden") is not None:
        lines.append("- channels reordered by importance first (hidden, MLP, value): the same function as the "
                     "source model in another channel order; a hidden-state teacher follows "
                     "`channel_permutation.hidden` of prune_report.json")
    if "method" in report:
        lines.append(f"- method: `{report['method']}`" + (f", comparison group `{report['comparison_group']}`"
                                                          if "comparison_group" in report else ""))
    if report.get("reconstruct"):
        lines.append(f"- reconstruction: least squares toward the {report.get('reconstruct_target', 'dense')} "
                     "layer outputs")
    allocation = report.get("allocation")
    if isinstance(allocation, dict) and "explicit" in allocation:
        fixed = ", ".join(f"`{name}` = {density:g}" for name, density in allocation["explicit"].items())
        lines.append(f"- per-module densities: {fixed}; the rest meet the budget")
    elif allocation:
        lines.append(f"- allocation: `{allocation}`")
    refine = report.get("refine")
    if refine:
        precision = (", bf16 autocast but the last fifth" if refine.get("precision") == "bfloat16" else "")
        lines.append(f"- layer refinement: {refine['steps']} steps per decoder layer (lr {refine['lr']:g}{precision})")
    calibration = report.get("calibration") or {}
    if {"nsamples", "seqlen"} <= set(calibration):
        lines.append(f"- calibration: {calibration['nsamples']} windows x {calibration['seqlen']} tokens"
                     + (f" of `{calibration['dataset']}` (seed {calibration.get('seed', 0)})"
                        if "dataset" in calibration else ""))
    if "prune_seconds" in report:
        lines.append(f"- pruning took {report['prune_seconds']:.0f} s")
    return lines


def sparse_checkpoint_card(report: dict, path: str | Path) -> str:
    """The card of a sparse checkpoint, from its prune report (what `prune_model` returned,
    plus what `blocksparse prune` adds: model, times, perplexity)."""
    base = report.get("model") or report.get("source")
    b, group, union = report["block_size"], report.get("row_group", 1), report.get("union_density")
    grouping = (f"free {b}x{b} masks" if group == 1 else
                f"{group} block rows per group share " + ("their block columns (the union is the density)"
                                                          if union is None else f"at most {union:g} of the block columns"))
    target = report.get("target_sparsity", report.get("sparsity"))
    lines = [_front_matter(base, ["block-sparse", "pruned", "blocksparse"]),
             f"# {Path(path).name}: block-sparse pruned from `{base}`" if base else f"# {Path(path).name}",
             "",
             f"Every decoder projection listed in `blocksparse_config.json` is stored as {b}x{b} blocks (BSR, "
             f"only the kept blocks); total density **{report['total_density']:.4f}** of the block-sparse "
             f"linears" + (f" (target sparsity {target:g})" if target is not None else "") + f"; {grouping}.",
             "", "## How it was pruned", ""] + (_recipe(report) or ["- not recorded (no prune report)"])
    trained = report.get("trained_values")
    if trained:
        lines += ["", "## Sparse fine-tuning", "",
                  f"The kept block values were then trained (structure fixed): {trained['tokens']} tokens of "
                  f"`{trained['dataset']}`, {trained['steps']} steps, learning rate {trained['learning_rate']:g}"
                  + (" beside a LoRA adapter (saved separately)" if trained.get("with_lora") else "") + "."]
        if "ppl" in trained:
            lines += ["", f"Perplexity of this checkpoint after it: **{trained['ppl']:.2f}** (`{trained['eval_dataset']}` "
                      f"eval split, {trained['windows']} windows of {trained['seqlen']} tokens)."]
    ppl = report.get("perplexity")
    lines += ["", "## Perplexity" + (" (one-shot, before fine-tuning)" if trained and ppl else ""), ""]
    if ppl:
        lines += ["| model | perplexity |", "| --- | ---: |", f"| dense | {ppl['dense']:.2f} |",
                  f"| this checkpoint | {ppl['pruned']:.2f} ({ppl['ratio']:.2f}x dense) |", "",
                  f"`{ppl['dataset']}` eval split, {ppl['windows']} windows of {ppl['seqlen']} tokens "
                  "(non-overlapping, Wanda's convention)."]
    else:
        lines.append(f"Not measured when this checkpoint was written (`blocksparse eval --model {path}`).")
    lines += _how_to_load(str(path), None, ppl["dataset"] if ppl else "default", ppl["seqlen"] if ppl else 512)
    return "\n".join(lines) + "\n"


def adapter_card(base_model: str, lora: dict, training: dict, evaluation: dict | None, path: str | Path) -> str:
    """The card of a LoRA adapter trained on `base_model` (a sparse checkpoint or a dense model):
    lora = r, alpha, dropout, targets; training = tokens, steps, learning rate, dataset, seconds;
    evaluation = eval_results.json's dict, if it was measured."""
    from .checkpoint import is_sparse_checkpoint

    on_sparse = is_sparse_checkpoint(base_model)
    how = ("trained through blocksparse's fused block-sparse op; keep it unmerged (a masked merge into the "
           "block-sparse weights drops the part of the update outside the kept blocks)" if on_sparse
           else "trained as plain LoRA on a dense model")
    lines = [_front_matter(base_model, ["adapter", "lora"] + (["block-sparse"] if on_sparse else []) + ["blocksparse"]),
             f"# {Path(path).name}: LoRA adapter for `{base_model}`", "",
             f"LoRA r={lora['r']}, alpha={lora['alpha']:g}, dropout {lora['dropout']:g} on "
             f"`{', '.join(lora['targets'])}`, {how}.", "", "## Training", "",
             f"- {training['tokens']} tokens of `{training['dataset']}` ({training['steps']} steps, learning rate "
             f"{training['learning_rate']:g})"]
    if training.get("seconds") is not None:
        lines.append(f"- training took {training['seconds'] / 60:.1f} min (this run's Trainer runtime)")
    lines += ["", "## Perplexity", ""]
    if evaluation:
        lines += ["| model | perplexity |", "| --- | ---: |"]
        if "base" in evaluation:
            lines.append(f"| base alone | {evaluation['base']['ppl']:.2f} |")
        lines += [f"| base + this adapter | {evaluation['lora']['ppl']:.2f} |", "",
                  f"`{evaluation['dataset']}` eval split, {evaluation['lora']['windows']} windows of "
                  f"{evaluation['seqlen']} tokens."]
    else:
        lines.append(f"Not measured by the training run (`blocksparse eval --model {base_model} --adapter {path}`).")
    lines += _how_to_load(base_model, str(path), evaluation["dataset"] if evaluation else training["dataset"],
                          evaluation["seqlen"] if evaluation else 512)
    return "\n".join(lines) + "\n"


def _how_to_load(model: str, adapter: str | None, dataset: str, seqlen: int) -> list[str]:
    extra = f" --adapter {adapter}" if adapter else ""
    python = [f'model, tokenizer = load_model("{model}")']
    if adapter:
        python = ["from blocksparse.integration.peft import load_adapter", *python,
                  f'model = load_adapter(model, "{adapter}")']
    return ["", "## Use it", "", "```bash", f"blocksparse eval --model {model}{extra} --dataset {dataset} --seqlen {seqlen}",
            f'blocksparse generate --model {model}{extra} --prompt "The history of the city"', "```", "",
            "```python", "from blocksparse.integration.model import load_model", *python, "```", "",
            f"Written by blocksparse {_version()}."]


def write_card(directory: str | Path, text: str) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path

