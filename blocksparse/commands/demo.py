"""`blocksparse demo`: the whole story on the embedded default model, offline.

dense perplexity -> 16x16 block pruning (the best one-shot recipe) -> perplexity
-> LoRA fine-tune through the fused op -> perplexity with the adapter unmerged
-> latency dense vs block-sparse -> a table, greedy text samples of each stage,
`report.md`, `results.json` and `demo.png` in the output folder.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..format import SUPPORTED_BLOCK_SIZES
from ..integration.recipes import DEMO_ROW_GROUP, latency, lora_step, prune_recipe
from .args import CLIError, add_dataset_flag, add_flag, check_finite


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo", help="prune, recover with LoRA, evaluate and time the embedded default model",
        description="The whole story on the embedded SmolLM2-135M and Wikipedia sample, offline: "
                    "dense -> block-pruned -> LoRA-recovered perplexity, and latency dense vs sparse.")
    add_flag(parser, "--out", default="runs/demo", help="report folder (default: %(default)s)")
    add_flag(parser, "--model", default="default", help="model name or directory (default: %(default)s)")
    add_dataset_flag(parser, "--dataset", what="text for calibration, training and evaluation")
    add_flag(parser, "--sparsity", type=float, default=0.5, help="block sparsity (default: %(default)s)")
    add_flag(parser, "--sparse_block_size", type=int, default=16, choices=SUPPORTED_BLOCK_SIZES,
             help="sparse block edge (default: %(default)s)")
    add_flag(parser, "--row_group", type=int, default=DEMO_ROW_GROUP, metavar="G",
             help="grouped masks: every G block rows share their block columns (1 = free masks; "
                  "default: %(default)s)")
    add_flag(parser, "--union_density", type=float, default=None, metavar="U",
             help="with --row_group G > 1: the share of block columns a group may use (default: "
                  "1 - sparsity, fully shared)")
    add_flag(parser, "--seqlen", type=int, default=512,
             help="tokens per calibration and evaluation window (default: %(default)s)")
    add_flag(parser, "--nsamples", type=int, default=16,
             help="calibration windows for pruning (default: %(default)s)")
    add_flag(parser, "--eval_windows", type=int, default=12,
             help="held-out windows per perplexity, 0 = all 154 (default: %(default)s)")
    add_flag(parser, "--steps", type=int, default=40, help="LoRA training steps (default: %(default)s)")
    add_flag(parser, "--batch_size", type=int, default=1, help="sequences per step (default: %(default)s)")
    add_flag(parser, "--train_seqlen", type=int, default=256,
             help="tokens per training sequence (default: %(default)s)")
    add_flag(parser, "--learning_rate", type=float, default=1e-3, help="(default: %(default)s)")
    add_flag(parser, "--lora_r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    add_flag(parser, "--target_modules", default=None,
             help="modules LoRA adapts, comma-separated (default: all seven projections of the family)")
    add_flag(parser, "--sample_tokens", type=int, default=32,
             help="new tokens per greedy text sample of each model (default: %(default)s)")
    add_flag(parser, "--decode_tokens", type=int, default=32,
             help="tokens generated in the latency check (default: %(default)s)")
    parser.set_defaults(func=run)
    return parser


# Held-out style prompts (none is in the calibration or training text): what the models write.
SAMPLE_PROMPTS = ("Write one sentence about the history of a river city.",
                  "What is a library for?",
                  "Describe a winter morning in the mountains.")


def samples(model, tokenizer, new_tokens: int) -> list[str]:
    """Greedy continuations of SAMPLE_PROMPTS, generated as one batch (chat template where the
    tokenizer has one)."""
    from ..integration.generation import Sampling, generate_batch

    texts = generate_batch(model, tokenizer, list(SAMPLE_PROMPTS), Sampling(max_new_tokens=new_tokens))
    for prompt, text in zip(SAMPLE_PROMPTS, texts):
        print(f"   {prompt!r} -> {text!r}")
    return texts


def _samples_table(found: dict) -> str:
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|") or "(nothing)"

    lines = ["| prompt | dense | block-sparse (one-shot) | + LoRA |", "| --- | --- | --- | --- |"]
    for i, prompt in enumerate(found["prompts"]):
        lines.append(f"| {cell(prompt)} | " + " | ".join(cell(found[k][i]) for k in ("dense", "pruned", "lora")) + " |")
    return "\n".join(lines)


def _plot(stages: list[tuple[str, float]], timing: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    names, values = zip(*stages)
    bars = ax_ppl.bar(names, values, color=["#4c72b0", "#c44e52", "#55a868"][: len(values)])
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("held-out perplexity (log)")
    ax_ppl.set_title("perplexity per stage")
    ax_ppl.bar_label(bars, fmt="%.1f")
    kinds = ["prefill (ms)", "decode (ms/token)"]
    variants = (("dense", "dense"), ("sparse", "block-sparse"), ("dense_lora", "dense + LoRA"),
                ("sparse_lora", "block-sparse + LoRA"))
    xs = range(len(kinds))
    for i, (key, label) in enumerate(variants):
        values = [timing[key]["prefill_s"] * 1e3, 1e3 / timing[key]["decode_tokens_per_s"]]
        ax_lat.bar([x + (i - 1.5) * 0.2 for x in xs], values, 0.2, label=label)
    ax_lat.set_xticks(list(xs), kinds)
    ax_lat.set_title(f"latency on {timing['device']}")
    ax_lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: str | os.PathLike, model_name: str = "default", dataset: str = "default",
             sparsity: float = 0.5, block_size: int = 16, row_group: int = DEMO_ROW_GROUP,
             union_density: float | None = None, seqlen: int = 512, nsamples: int = 16,
             eval_windows: int | None = 12, steps: int = 40, batch_size: int = 1,
             train_seqlen: int = 256, learning_rate: float = 1e-3, lora_r: int = 16,
             target_modules: tuple[str, ...] | None = None, decode_tokens: int = 32,
             sample_tokens: int = 32) -> dict:
    """Run every stage and write the report folder; returns the results dict.

    target_modules: what LoRA adapts (default: every projection of the model's family).
    """
    from ..families import family_of
    from ..integration.data import calibration_samples, eval_tokens
    from ..integration.evaluate import perplexity
    from ..integration.model import load_model
    from ..integration.peft import load_adapter
    from ..prune import prune_model

    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}

    def timed(stage: str, fn, *args, **kwargs):
        """Run one stage of the demo, record and print its wall time."""
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - t0
        print(f"   [{stage}: {time.perf_counter() - t0:.1f} s]")
        return result

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = timed("load", load_model, model_name)
    family = family_of(model)
    recipe = prune_recipe(family)
    target_modules = tuple(target_modules or family.projections)
    held_out = eval_tokens(tokenizer, dataset)

    def ppl(m, stage):
        print(f"\n== {stage}")
        result = timed("perplexity", perplexity, m, held_out, seqlen, max_windows=eval_windows)
        print(f"   perplexity {result['ppl']:.2f} ({result['windows']} windows x {seqlen} tokens)")
        return result

    results: dict = {"settings": dict(model=model_name, dataset=dataset, sparsity=sparsity,
                                      block_size=block_size, row_group=row_group,
                                      union_density=union_density, seqlen=seqlen, nsamples=nsamples,
                                      eval_windows=eval_windows, steps=steps, batch_size=batch_size,
                                      train_seqlen=train_seqlen, learning_rate=learning_rate, lora_r=lora_r,
                                      target_modules=list(target_modules), prune_recipe=recipe)}
    results["dense"] = ppl(model, "dense model")
    results["samples"] = {"prompts": list(SAMPLE_PROMPTS), "dense": timed("samples", samples, model, tokenizer,
                                                                           sample_tokens)}
    dense_model = copy.deepcopy(model)

    print(f"\n== pruning {block_size}x{block_size} blocks to {sparsity:.0%} sparsity ({nsamples} calibration windows)")
    calib = calibration_samples(tokenizer, dataset, nsamples, seqlen)
    report = timed("prune", prune_model, model, calib, sparsity=sparsity, block_size=block_size,
                   row_group=row_group, union_density=union_density, **recipe)
    results["prune"] = {"total_density": report["total_density"], "seconds": stage_seconds["prune"]}
    results["pruned"] = ppl(model, "block-sparse model")
    results["samples"]["pruned"] = timed("samples", samples, model, tokenizer, sample_tokens)
    sparse_model = copy.deepcopy(model)  # timed as it is: LoRA wraps `model` in PEFT's layers

    print(f"\n== LoRA fine-tuning: {steps} steps x {batch_size} x {train_seqlen} tokens, fused block-sparse op")
    peft_model, results["finetune"] = timed("LoRA", lora_step, model, tokenizer, dataset, out / "lora",
                                            target_modules, steps, batch_size, train_seqlen, learning_rate, lora_r)
    peft_model.save_pretrained(out / "adapter")
    results["lora"] = ppl(peft_model, "block-sparse model + LoRA (adapter unmerged)")
    results["samples"]["lora"] = timed("samples", samples, peft_model, tokenizer, sample_tokens)

    print("\n== latency: dense vs block-sparse, each alone and with the same LoRA adapter (unmerged), interleaved")
    prompt = held_out[:, :seqlen]
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    dense_lora = load_adapter(copy.deepcopy(dense_model), out / "adapter")
    # Each pair alike: the plain models, then both wrapped by PEFT with the same adapter.
    models = {"dense": dense_model, "sparse": sparse_model, "dense_lora": dense_lora, "sparse_lora": peft_model}
    results["latency"] = {"device": device, **timed("latency", latency, models, prompt, decode_tokens)}
    results["seconds"] = time.perf_counter() - started
    results["stage_seconds"] = stage_seconds
    results["versions"] = {"torch": torch.__version__, "python": platform.python_version()}

    table = _table(results)
    print("\n" + table + "\n\n" + _samples_table(results["samples"]) + "\n\n" + _stage_table(results))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    stages = [("dense", results["dense"]["ppl"]), (f"pruned {sparsity:.0%}", results["pruned"]["ppl"]),
              ("+ LoRA", results["lora"]["ppl"])]
    _plot(stages, results["latency"], out / "demo.png")
    (out / "report.md").write_text(
        f"# blocksparse demo\n\n{table}\n\n![perplexity and latency](demo.png)\n\n"
        f"Greedy samples ({sample_tokens} new tokens):\n\n{_samples_table(results['samples'])}\n\n"
        f"Settings: `{json.dumps(results['settings'])}`\n\n{_stage_table(results)}\n")
    print(f"\nreport: {out / 'report.md'}")
    return results


def _table(results: dict) -> str:
    dense_ppl = results["dense"]["ppl"]
    lat = results["latency"]
    rows = [
        ("dense", results["dense"]["ppl"], ""),
        (f"block-sparse {results['settings']['sparsity']:.0%} (one-shot)", results["pruned"]["ppl"],
         f"pruned in {results['prune']['seconds']:.0f} s, density {results['prune']['total_density']:.3f}"
         + _grouping_note(results["settings"])),
        ("block-sparse + LoRA (unmerged)", results["lora"]["ppl"],
         f"{results['finetune']['train_tokens']} tokens in {results['finetune']['seconds'] / 60:.1f} min"),
    ]
    lines = ["| stage | perplexity | x dense | notes |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {p:.2f} | {p / dense_ppl:.2f} | {note} |" for name, p, note in rows]
    lines += ["", f"Latency on {lat['device']}, measured in one interleaved run (medians):", "",
              "| | dense | block-sparse | speedup |", "| --- | ---: | ---: | ---: |"]
    for suffix, label in (("", ""), ("_lora", ", both + LoRA")):
        d, s = lat["dense" + suffix], lat["sparse" + suffix]
        lines += [f"| prefill {d['prefill_tokens']} tokens (ms){label} | {d['prefill_s'] * 1e3:.1f} | "
                  f"{s['prefill_s'] * 1e3:.1f} | {d['prefill_s'] / s['prefill_s']:.2f}x |",
                  f"| decode (tokens/s){label} | {d['decode_tokens_per_s']:.1f} | {s['decode_tokens_per_s']:.1f} | "
                  f"{s['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x |"]
    return "\n".join(lines)


def _stage_table(results: dict) -> str:
    """Where the demo's time went (wall seconds per stage; perplexity and samples summed)."""
    lines = ["| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in results["stage_seconds"].items()]
    lines.append(f"| total (with setup between stages) | {results['seconds']:.1f} |")
    return "\n".join(lines)


def _grouping_note(settings: dict) -> str:
    group, union = settings.get("row_group", 1), settings.get("union_density")
    if group == 1:
        return ", free masks"
    return f", {group} block rows per group " + ("sharing their columns" if union is None else
                                                   f"within {union:g} of the columns")


def run(args) -> int:
    check_finite(args, "_")
    if not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    for name in ("steps", "seqlen", "train_seqlen", "nsamples", "batch_size", "lora_r", "decode_tokens",
                 "sample_tokens"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.row_group < 1:
        raise CLIError(f"--row_group must be >= 1 (1 = free masks), got {args.row_group}")
    if args.union_density is not None and (args.row_group == 1 or not 1 - args.sparsity <= args.union_density <= 1):
        raise CLIError(f"--union_density needs --row_group > 1 and a value in [1 - sparsity, 1] = "
                       f"[{1 - args.sparsity:g}, 1], got {args.union_density} with --row_group {args.row_group}")
    targets = tuple(t.strip() for t in (args.target_modules or "").split(",") if t.strip()) or None
    try:
        run_demo(args.out, args.model, args.dataset, args.sparsity, args.sparse_block_size, args.row_group,
                 args.union_density, args.seqlen,
                 args.nsamples, args.eval_windows or None, args.steps, args.batch_size,
                 args.train_seqlen, args.learning_rate, args.lora_r, targets, args.decode_tokens,
                 args.sample_tokens)
    except (OSError, ValueError) as err:
        raise CLIError(str(err)) from err
    return 0
