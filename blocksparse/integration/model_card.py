"""Model cards (README.md, as the Hugging Face hub shows them) for what the project saves:
sparse checkpoints (from the prune report) and LoRA adapters (from the training run).
Every number in a card is one the run that wrote it measured or chose; nothing is filled in."""

from __future__ import annotations

from pathlib import Path

CARD_NAME = "README.md"


def _front_matter(base_model: str | None, tags: list[str]) -> str:
    lines = ["---", "library_name: blocksparse" if "adapter" not in tags else "library_name: peft"]
    if base_model and not base_model.startswith(("/", ".")) and base_model != "default":
        lines.append(f"base_model: {base_model}")  # hub ids only: a local path means nothing on the hub
    lines += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    return "\n".join(lines)


def _version() -> str:
    from .. import __version__

    return __version__


def _recipe(report: dict) -> list[str]:
    lines = [f"- method: `{report.get('method', '?')}`, comparison group `{report.get('comparison_group', '?')}`"]
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
        lines.append(f"- layer refinement: {refine['steps']} steps per decoder layer (lr {refine['lr']:g})")
    calibration = report.get("calibration") or {}
    if calibration:
        lines.append(f"- calibration: {calibration.get('nsamples', '?')} windows x {calibration.get('seqlen', '?')} "
                     f"tokens of `{calibration.get('dataset', '?')}` (seed {calibration.get('seed', '?')})")
    if "prune_seconds" in report:
        lines.append(f"- pruning took {report['prune_seconds']:.0f} s")
    return lines


def sparse_checkpoint_card(report: dict, path: str | Path) -> str:
    """The card of a sparse checkpoint, from its prune report (what `prune_model` returned,
    plus what `blocksparse prune` adds: model, times, perplexity)."""
    base = report.get("model") or report.get("source")
    group, union = report.get("row_group", 1), report.get("union_density")
    grouping = ("free 16x16 masks" if group == 1 else
                f"{group} block rows per group share " + ("their block columns (the union is the density)"
                                                          if union is None else f"at most {union:g} of the block columns"))
    lines = [_front_matter(base, ["block-sparse", "pruned", "blocksparse"]),
             f"# {Path(path).name}: block-sparse pruned from `{base}`" if base else f"# {Path(path).name}",
             "",
             f"Every decoder projection listed in `blocksparse_config.json` is stored as "
             f"{report.get('block_size', '?')}x{report.get('block_size', '?')} blocks (BSR, only the kept "
             f"blocks); total density **{report.get('total_density', float('nan')):.4f}** of the pruned "
             f"linears (target sparsity {report.get('target_sparsity', report.get('sparsity', '?'))}); {grouping}.",
             "", "## How it was pruned", ""] + _recipe(report)
    ppl = report.get("perplexity")
    lines += ["", "## Perplexity", ""]
    if ppl:
        lines += ["| model | perplexity |", "| --- | ---: |", f"| dense | {ppl['dense']:.2f} |",
                  f"| this checkpoint | {ppl['pruned']:.2f} ({ppl['ratio']:.2f}x dense) |", "",
                  f"`{ppl['dataset']}` eval split, {ppl['windows']} windows of {ppl['seqlen']} tokens "
                  "(non-overlapping, Wanda's convention)."]
    else:
        lines.append("Not measured when this checkpoint was written (`blocksparse eval --model THIS_DIR`).")
    lines += _how_to_load(str(path), adapter=None)
    return "\n".join(lines) + "\n"


def adapter_card(base_model: str, lora: dict, training: dict, evaluation: dict | None, path: str | Path) -> str:
    """The card of a LoRA adapter trained on `base_model` (a sparse checkpoint or a dense model):
    lora = r, alpha, dropout, targets; training = tokens, steps, learning rate, dataset, seconds;
    evaluation = eval_results.json's dict, if it was measured."""
    lines = [_front_matter(base_model, ["adapter", "lora", "block-sparse", "blocksparse"]),
             f"# {Path(path).name}: LoRA adapter for `{base_model}`", "",
             f"LoRA r={lora['r']}, alpha={lora['alpha']:g}, dropout {lora['dropout']:g} on "
             f"`{', '.join(lora['targets'])}`, trained through blocksparse's fused block-sparse op and kept "
             "unmerged (merging into a block-sparse weight would densify it).", "", "## Training", "",
             f"- {training['tokens']} tokens of `{training['dataset']}` ({training['steps']} steps, learning rate "
             f"{training['learning_rate']:g})"]
    if training.get("seconds") is not None:
        lines.append(f"- took {training['seconds'] / 60:.1f} min")
    lines += ["", "## Perplexity", ""]
    if evaluation:
        lines += ["| model | perplexity |", "| --- | ---: |"]
        if "base" in evaluation:
            lines.append(f"| base alone | {evaluation['base']['ppl']:.2f} |")
        lines += [f"| base + this adapter | {evaluation['lora']['ppl']:.2f} |", "",
                  f"`{evaluation['dataset']}` eval split, {evaluation['lora']['windows']} windows of "
                  f"{evaluation['seqlen']} tokens."]
    else:
        lines.append("Not measured by the training run (`blocksparse eval --model BASE --adapter THIS_DIR`).")
    lines += _how_to_load(base_model, adapter=str(path))
    return "\n".join(lines) + "\n"


def _how_to_load(model: str, adapter: str | None) -> list[str]:
    extra = f" --adapter {adapter}" if adapter else ""
    python = [f'model, tokenizer = load_model("{model}")']
    if adapter:
        python = ["from blocksparse.integration.peft import load_adapter", *python,
                  f'model = load_adapter(model, "{adapter}")']
    return ["", "## Use it", "", "```bash", f"blocksparse eval --model {model}{extra} --dataset default",
            f'blocksparse generate --model {model}{extra} --prompt "The history of the city"', "```", "",
            "```python", "from blocksparse.integration.model import load_model", *python, "```", "",
            f"Written by blocksparse {_version()}."]


def write_card(directory: str | Path, text: str) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path

