"""`blocksparse demo`: the whole story on the embedded default model, offline.

dense perplexity -> 16x16 block pruning (the best one-shot recipe) -> perplexity
-> recovery through the fused op (the demo's recipe, and the seed's LoRA recipe at the
same token budget beside it: on a CPU in a second process, side by side) -> perplexity with the adapter unmerged -> latency dense vs
block-sparse -> a table, greedy text samples of each stage, `report.md`, `results.json`
and `demo.png` in the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..format import SUPPORTED_BLOCK_SIZES
from ..dtypes import native_bf16
from ..integration.recipes import (DEMO_RECIPE, DEMO_ROW_GROUP, DEMO_STEPS, PRECISIONS, RECOVERY_RECIPES,
                                   SEED_RECIPE, check_overrides, latency, prune_recipe, recover)
from .args import CLIError, add_dataset_flag, add_flag, check_finite


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo", help="prune, recover, evaluate and time the embedded default model",
        description="The whole story on the embedded SmolLM2-135M and Wikipedia sample, offline: "
                    "dense -> block-pruned -> recovered perplexity, and latency dense vs sparse.")
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
    add_flag(parser, "--recipe", default=DEMO_RECIPE, choices=sorted(RECOVERY_RECIPES),
             help="recovery recipe (`blocksparse bench recovery` compares them; default: %(default)s)")
    add_flag(parser, "--seed_recipe", action=argparse.BooleanOptionalAction, default=True,
             help=f"also train the seed's recipe ({RECOVERY_RECIPES[SEED_RECIPE]['about']}) at the same "
                  "budget, for comparison (default: on)")
    add_flag(parser, "--side_by_side", action=argparse.BooleanOptionalAction, default=None,
             help="train the seed's recipe in a second process beside the demo's, the CPU threads split "
                  "between them (default: on a CPU with 2 or more threads)")
    add_flag(parser, "--steps", type=int, default=DEMO_STEPS, help="training steps (default: %(default)s)")
    add_flag(parser, "--batch_size", type=int, default=1, help="sequences per step (default: %(default)s)")
    add_flag(parser, "--train_seqlen", type=int, default=256,
             help="tokens per training sequence (default: %(default)s)")
    add_flag(parser, "--learning_rate", type=float, default=None, help="(default: the recipe's)")
    add_flag(parser, "--precision", default="auto", choices=("auto",) + PRECISIONS,
             help="what the recovery steps compute in: bf16 autocast (weights and optimizer fp32) or fp32; "
                  "auto = bf16 where the training device computes it natively (default: %(default)s)")
    add_flag(parser, "--lora_r", type=int, default=None, help="LoRA rank, alpha = 2r (default: the recipe's)")
    add_flag(parser, "--target_modules", default=None,
             help="modules LoRA adapts, comma-separated (default: the recipe's)")
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

    lines = ["| prompt | dense | block-sparse (one-shot) | recovered |", "| --- | --- | --- | --- |"]
    for i, prompt in enumerate(found["prompts"]):
        lines.append(f"| {cell(prompt)} | " + " | ".join(cell(found[k][i]) for k in ("dense", "pruned", "recovered"))
                     + " |")
    return "\n".join(lines)


def _plot(stages: list[tuple[str, float]], timing: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    names, values = zip(*stages)
    colors = ["#4c72b0", "#c44e52"] + ["#dd8452"] * (len(values) - 3) + ["#55a868"]  # the seed's bar orange
    bars = ax_ppl.bar(names, values, color=colors)
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("held-out perplexity (log)")
    ax_ppl.set_title("perplexity per stage")
    ax_ppl.bar_label(bars, fmt="%.1f")
    kinds = ["prefill (ms)", "decode (ms/token)"]
    variants = (("dense", "dense"), ("sparse", "block-sparse"), ("dense_lora", "dense + LoRA"),
                ("sparse_lora", "block-sparse + LoRA"))
    xs = range(len(kinds))
    variants = [(key, label) for key, label in variants if key in timing]
    for i, (key, label) in enumerate(variants):
        values = [timing[key]["prefill_s"] * 1e3, 1e3 / timing[key]["decode_tokens_per_s"]]
        ax_lat.bar([x + (i - (len(variants) - 1) / 2) * 0.2 for x in xs], values, 0.2, label=label)
    ax_lat.set_xticks(list(xs), kinds)
    ax_lat.set_title(f"latency on {timing['device']}")
    ax_lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train_seed_recipe(checkpoint: str, dataset: str, folder: str, adapter_dir: str, steps: int, batch_size: int,
                      train_seqlen: int, precision: str, threads: int) -> dict:
    """The seed's recipe from the one-shot `checkpoint`, in a process of its own with
    `threads` threads (the demo's side-by-side run); saves the adapter to `adapter_dir` and
    returns recover()'s record."""
    from ..integration.model import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(checkpoint)
    trained, info = recover(model, tokenizer, dataset, folder, SEED_RECIPE, steps, batch_size, train_seqlen,
                            precision=precision, progress=False)
    trained.save_pretrained(adapter_dir)
    return {**info, "threads": threads}


def _threads_back(pending, threads: int):
    """A TrainerCallback that gives the training process `threads` threads again once the
    side-by-side run (`pending`, an AsyncResult) has finished."""
    from transformers import TrainerCallback

    class ThreadsBack(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if pending.ready() and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
                print(f"   [the seed's run has finished: {threads} threads from step {state.global_step + 1}]")

    return ThreadsBack()


def run_demo(out: str | os.PathLike, model_name: str = "default", dataset: str = "default",
             sparsity: float = 0.5, block_size: int = 16, row_group: int = DEMO_ROW_GROUP,
             union_density: float | None = None, seqlen: int = 512, nsamples: int = 16,
             eval_windows: int | None = 12, recipe: str = DEMO_RECIPE, seed_recipe: bool = True,
             steps: int = DEMO_STEPS, batch_size: int = 1, train_seqlen: int = 256,
             learning_rate: float | None = None, lora_r: int | None = None,
             target_modules: tuple[str, ...] | None = None, decode_tokens: int = 32,
             sample_tokens: int = 32, precision: str = "auto", side_by_side: bool | None = None) -> dict:
    """Run every stage and write the report folder; returns the results dict.

    recipe: the recovery recipe (`recipes.RECOVERY_RECIPES`; learning_rate, lora_r and
    target_modules override its own); seed_recipe: also train the seed's recipe at the same
    budget, from the same one-shot model, for the table. precision: the recovery steps'
    ("auto": bf16 autocast where the training device computes bf16 natively, else fp32).
    side_by_side: train the seed's recipe in a second process while this one trains the
    recipe, the CPU threads split between them until the seed's run ends (None: where
    training runs on a CPU with 2 or more threads). Small models' steps use 2 threads
    poorly, so two runs on 1 thread each finish sooner than one after the other.
    """
    from ..families import family_of
    from ..integration.data import calibration_samples, eval_tokens
    from ..integration.evaluate import perplexity
    from ..integration.model import load_model
    from ..integration.peft import load_adapter
    from ..integration.train import VALUES_FILE, trained_block_values
    from ..prune import prune_model

    check_overrides(recipe, lora_r, target_modules)  # before anything is loaded or pruned
    if precision == "auto":
        precision = "bf16" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    seed_recipe = seed_recipe and recipe != SEED_RECIPE
    if side_by_side is None:
        side_by_side = not torch.cuda.is_available() and torch.get_num_threads() >= 2
    side_by_side = side_by_side and seed_recipe
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
    if target_modules is not None:  # checked before pruning and the seed's recovery, not after them
        known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in target_modules if t not in known]
        if unknown:
            raise ValueError(f"--target_modules: {', '.join(unknown)} name no module of {model_name!r} "
                             f"(its projections: {', '.join(family.projections)})")
    prune_settings = prune_recipe(family)
    held_out = eval_tokens(tokenizer, dataset)

    def ppl(m, stage):
        print(f"\n== {stage}")
        result = timed("perplexity", perplexity, m, held_out, seqlen, max_windows=eval_windows)
        print(f"   perplexity {result['ppl']:.2f} ({result['windows']} windows x {seqlen} tokens)")
        return result

    results: dict = {"settings": dict(model=model_name, dataset=dataset, sparsity=sparsity,
                                      block_size=block_size, row_group=row_group,
                                      union_density=union_density, seqlen=seqlen, nsamples=nsamples,
                                      eval_windows=eval_windows, recipe=recipe, seed_recipe=seed_recipe,
                                      side_by_side=side_by_side,
                                      steps=steps, batch_size=batch_size, train_seqlen=train_seqlen,
                                      learning_rate=learning_rate, lora_r=lora_r, precision=precision,
                                      target_modules=None if target_modules is None else list(target_modules),
                                      prune_recipe=prune_settings)}
    results["dense"] = ppl(model, "dense model")
    results["samples"] = {"prompts": list(SAMPLE_PROMPTS), "dense": timed("samples", samples, model, tokenizer,
                                                                           sample_tokens)}
    dense_model = copy.deepcopy(model)

    print(f"\n== pruning {block_size}x{block_size} blocks to {sparsity:.0%} sparsity ({nsamples} calibration windows)")
    calib = calibration_samples(tokenizer, dataset, nsamples, seqlen)
    report = timed("prune", prune_model, model, calib, sparsity=sparsity, block_size=block_size,
                   row_group=row_group, union_density=union_density, **prune_settings)
    results["prune"] = {"total_density": report["total_density"], "seconds": stage_seconds["prune"]}
    results["pruned"] = ppl(model, "block-sparse model")
    results["samples"]["pruned"] = timed("samples", samples, model, tokenizer, sample_tokens)
    sparse_model = copy.deepcopy(model)  # timed as it is: recovery trains `model` in place
    order = (report.get("channel_permutation") or {}).get("hidden")
    hidden_order = None if order is None else torch.tensor(order)

    def recovery(name: str, student, folder: Path, **overrides):
        print(f"\n== recovery, {name}: {RECOVERY_RECIPES[name]['about']}; {steps} steps x {batch_size} x "
              f"{train_seqlen} tokens, fused block-sparse op")
        return recover(student, tokenizer, dataset, folder, name, steps, batch_size, train_seqlen,
                       teacher=dense_model, hidden_order=hidden_order, precision=precision, **overrides)

    def side_by_side_runs(threads: int) -> tuple:
        from multiprocessing import get_context

        from ..integration.checkpoint import save_sparse_pretrained

        # The child reads the one-shot model from disk (spawned: no forked thread pools).
        one_shot = save_sparse_pretrained(model, tokenizer, out / "one_shot", report=report)
        theirs = max(1, threads // 2)
        mine = max(1, threads - theirs)
        print(f"\n== the seed's recipe ({SEED_RECIPE}) in a second process on {theirs} of {threads} threads, "
              f"beside the demo's recipe on {mine}")
        with get_context("spawn").Pool(1) as pool:
            pending = pool.apply_async(_train_seed_recipe, (str(one_shot), dataset, str(out / "seed"),
                                                            str(out / "seed_adapter"), steps, batch_size,
                                                            train_seqlen, precision, theirs))
            torch.set_num_threads(mine)
            try:
                trained, info = recovery(recipe, model, out / "recovery", callbacks=[_threads_back(pending, threads)],
                                         **overrides)
                return trained, info, pending.get()  # raises the child's error
            finally:
                torch.set_num_threads(threads)

    overrides = dict(learning_rate=learning_rate, lora_r=lora_r, target_modules=target_modules)
    seed_model = None
    if side_by_side:
        recovered, results["recovery"], results["seed_recovery"] = timed(
            f"recovery ({SEED_RECIPE} and {recipe}, side by side)", side_by_side_runs, torch.get_num_threads())
        seed_model = load_adapter(copy.deepcopy(sparse_model), out / "seed_adapter")
        results["seed_recovered"] = ppl(seed_model, f"block-sparse model + the seed's recipe ({SEED_RECIPE})")
    else:
        if seed_recipe:
            seed_model, results["seed_recovery"] = timed(f"recovery ({SEED_RECIPE})", recovery, SEED_RECIPE,
                                                         copy.deepcopy(model), out / "seed")
            seed_model.save_pretrained(out / "seed_adapter")
            results["seed_recovered"] = ppl(seed_model, f"block-sparse model + the seed's recipe ({SEED_RECIPE})")
        recovered, results["recovery"] = timed(f"recovery ({recipe})", recovery, recipe, model, out / "recovery",
                                               **overrides)
    has_lora = "lora" in RECOVERY_RECIPES[recipe]
    if has_lora:
        recovered.save_pretrained(out / "adapter")
    if RECOVERY_RECIPES[recipe].get("values"):
        from safetensors.torch import save_file

        (out / "adapter").mkdir(exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in trained_block_values(recovered).items()},
                  str(out / "adapter" / VALUES_FILE))
    results["recovered"] = ppl(recovered, f"block-sparse model + {recipe} (adapter unmerged)")
    results["samples"]["recovered"] = timed("samples", samples, recovered, tokenizer, sample_tokens)

    prompt = held_out[:, :seqlen]
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    models = {"dense": dense_model, "sparse": sparse_model}
    # Each pair alike: the plain models, then both wrapped by PEFT with the same adapter (the
    # recipe's, or the seed recipe's when the recipe trains none).
    adapter_model = recovered if has_lora else seed_model
    if adapter_model is not None:
        adapter_dir = out / ("adapter" if has_lora else "seed_adapter")
        models.update(dense_lora=load_adapter(copy.deepcopy(dense_model), adapter_dir), sparse_lora=adapter_model)
    print("\n== latency: dense vs block-sparse" + (", each alone and with the same LoRA adapter (unmerged)"
                                                   if adapter_model is not None else "") + ", interleaved")
    results["latency"] = {"device": device, **timed("latency", latency, models, prompt, decode_tokens)}
    results["seconds"] = time.perf_counter() - started
    results["stage_seconds"] = stage_seconds
    results["versions"] = {"torch": torch.__version__, "python": platform.python_version()}

    table = _table(results)
    print("\n" + table + "\n\n" + _samples_table(results["samples"]) + "\n\n" + _stage_table(results))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    stages = [("dense", results["dense"]["ppl"]), (f"pruned {sparsity:.0%}", results["pruned"]["ppl"])]
    if seed_recipe:
        stages.append((f"+ {SEED_RECIPE}", results["seed_recovered"]["ppl"]))
    stages.append((f"+ {recipe}", results["recovered"]["ppl"]))
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

    def trained(info: dict) -> str:
        return (f"{info['about']}; lr {info['learning_rate']:g}; {info['train_tokens']:,} tokens in "
                f"{info['seconds'] / 60:.1f} min" + (", bf16 autocast" if info.get("precision") == "bf16" else "")
                + (", side by side" if results["settings"].get("side_by_side") else ""))

    rows = [
        ("dense", results["dense"]["ppl"], ""),
        (f"block-sparse {results['settings']['sparsity']:.0%} (one-shot)", results["pruned"]["ppl"],
         f"pruned in {results['prune']['seconds']:.0f} s, density {results['prune']['total_density']:.3f}"
         + _grouping_note(results["settings"])),
    ]
    if "seed_recovered" in results:
        rows.append((f"+ the seed's recipe, `{results['seed_recovery']['recipe']}` (unmerged)",
                     results["seed_recovered"]["ppl"], trained(results["seed_recovery"])))
    rows.append((f"+ recovery, `{results['recovery']['recipe']}` (unmerged)", results["recovered"]["ppl"],
                 trained(results["recovery"])))
    lines = ["| stage | perplexity | x dense | notes |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {p:.2f} | {p / dense_ppl:.2f} | {note} |" for name, p, note in rows]
    lines += ["", f"Latency on {lat['device']}, measured in one interleaved run (medians):", "",
              "| | dense | block-sparse | speedup |", "| --- | ---: | ---: | ---: |"]
    for suffix, label in (("", ""), ("_lora", ", both + LoRA")):
        if "dense" + suffix not in lat:
            continue
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
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.row_group < 1:
        raise CLIError(f"--row_group must be >= 1 (1 = free masks), got {args.row_group}")
    if args.union_density is not None and (args.row_group == 1 or not 1 - args.sparsity <= args.union_density <= 1):
        raise CLIError(f"--union_density needs --row_group > 1 and a value in [1 - sparsity, 1] = "
                       f"[{1 - args.sparsity:g}, 1], got {args.union_density} with --row_group {args.row_group}")
    targets = tuple(t.strip() for t in (args.target_modules or "").split(",") if t.strip()) or None
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise CLIError(f"--learning_rate must be > 0, got {args.learning_rate}")
    try:
        run_demo(args.out, args.model, args.dataset, args.sparsity, args.sparse_block_size, args.row_group,
                 args.union_density, args.seqlen, args.nsamples, args.eval_windows or None, args.recipe,
                 args.seed_recipe, args.steps, args.batch_size, args.train_seqlen, args.learning_rate,
                 args.lora_r, targets, args.decode_tokens, args.sample_tokens, args.precision, args.side_by_side)
    except (OSError, ValueError) as err:
        raise CLIError(str(err)) from err
    return 0
