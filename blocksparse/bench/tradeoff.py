"""Grouped masks on a real model: quality against speed, one row per mask configuration.

A configuration is G (fully shared row groups: every group of G block rows keeps the
same block columns, union = density), G:u (a group's rows choose among u x K/b shared
columns) or 1 (free masks). Three phases, each rerunnable on its own:

- quality: prune the model with the demo's recipe at the configuration, perplexity
  one-shot and after a LoRA step (the `lora16` recovery recipe, 40 x 256 tokens by
  default; adapter unmerged), the pruned modules'
  union densities (forward W and transposed W^T, which dX = dY W walks); each
  configuration's block structure is saved (structure.safetensors) for the speed phase,
  and finished configurations are skipped when the phase is rerun;
- speed: the dense model against each configuration's structure, prefill and greedy
  decode interleaved in one run (`recipes.latency`: medians; run it on an idle machine);
- plot: the Pareto picture, perplexity after LoRA against the measured speedups.

    python -m blocksparse.bench.tradeoff --out runs/tradeoff                    # all phases
    python -m blocksparse.bench.tradeoff --out runs/tradeoff --phase speed --reps 7
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from . import common

PHASES = ("quality", "speed", "plot")
DEFAULT_CONFIGS = "1,4,4:0.6,8,8:0.6,16,16:0.6"


def parse_configs(text: str, sparsity: float) -> list[tuple[int, float | None]]:
    """"1,8,8:0.6" -> [(1, None), (8, None), (8, 0.6)]; u must leave room for the rows' blocks."""
    configs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        group, _, union = item.partition(":")
        try:
            g, u = int(group), (float(union) if union else None)
        except ValueError:
            raise ValueError(f"--configs: expected G or G:u (e.g. 8 or 8:0.6), got {item!r}") from None
        if g < 1 or (u is not None and not (1.0 - sparsity <= u <= 1.0)) or (g == 1 and u is not None):
            raise ValueError(f"--configs: {item!r} needs G >= 1 and, with G > 1, 1 - sparsity <= u <= 1")
        configs.append((g, u))
    if not configs:
        raise ValueError("--configs: give at least one configuration")
    return configs


def quality_settings(args) -> dict:
    """What a configuration's numbers depend on besides (G, u): a rerun reuses a result
    only when these match."""
    return {name: getattr(args, name) for name in ("model", "dataset", "sparsity", "seqlen", "nsamples",
                                                   "eval_windows", "steps", "train_seqlen")}


def _read(path: Path, required: bool = True, settings: dict | None = None) -> dict | None:
    """A JSON file of this benchmark; None when absent (or written with other settings) and
    not required; a missing required file is one error line naming the phase to run."""
    if path.is_file():
        found = json.loads(path.read_text())
        if settings is None or found.get("settings") == settings:
            return found
    if required:
        raise SystemExit(f"{path} is missing: run --phase quality first (with the same --configs)")
    return None


def config_name(group: int, union: float | None) -> str:
    return "free" if group == 1 else f"G{group}" + ("" if union is None else f"_u{union:g}")


# --------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------
def run_quality(args, configs) -> None:
    from ..families import family_of
    from ..integration.data import calibration_samples, eval_tokens
    from ..integration.evaluate import perplexity
    from ..integration.model import load_model
    from ..integration.recipes import prune_recipe, recover
    from ..prune import prune_model

    dense_model, tokenizer = load_model(args.model)
    held_out = eval_tokens(tokenizer, args.dataset)
    settings = quality_settings(args)
    dense_file = args.out / "dense.json"
    if _read(dense_file, required=False, settings=settings) is None:
        result = perplexity(dense_model, held_out, args.seqlen, max_windows=args.eval_windows)
        common.write_json(dense_file, {"ppl": result["ppl"], "windows": result["windows"], "settings": settings})
    calib = calibration_samples(tokenizer, args.dataset, args.nsamples, args.seqlen)
    family = family_of(dense_model)
    settings = settings | {"prune_recipe": prune_recipe(family)}  # a result of another recipe is not reused
    for group, union in configs:
        folder = args.out / config_name(group, union)
        if _read(folder / "result.json", required=False, settings=settings) is not None:
            print(f"{folder.name}: done earlier with the same settings, skipped")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        print(f"\n== {folder.name}: pruning")
        model = copy.deepcopy(dense_model)
        start = time.perf_counter()
        report = prune_model(model, calib, sparsity=args.sparsity, row_group=group, union_density=union,
                             **prune_recipe(family))
        prune_s = time.perf_counter() - start
        save_structure(model, folder / "structure.safetensors", group)
        one_shot = perplexity(model, held_out, args.seqlen, max_windows=args.eval_windows)
        peft_model, finetune = recover(model, tokenizer, args.dataset, folder / "lora", "lora16", steps=args.steps,
                                       train_seqlen=args.train_seqlen)
        after = perplexity(peft_model, held_out, args.seqlen, max_windows=args.eval_windows)
        forward, transposed = union_means(model, group)
        common.write_json(folder / "result.json", {
            "config": folder.name, "row_group": group, "union_density_budget": union,
            "total_density": report["total_density"], "prune_s": prune_s,
            "ppl_one_shot": one_shot["ppl"], "ppl_lora": after["ppl"], "windows": after["windows"],
            "union_forward": forward, "union_transposed": transposed, "finetune": finetune, "settings": settings})
        print(f"{folder.name}: one-shot {one_shot['ppl']:.2f}, LoRA {after['ppl']:.2f}, "
              f"union forward {forward:.3f} / transposed {transposed:.3f}")


def union_means(model, group: int) -> tuple[float, float]:
    """The pruned modules' mean union densities, forward and transposed, weighted by their
    dense FLOPs (N x K); modules the recipe keeps whole are left out. Free masks are
    measured at the kernels' G = 8 after clustering, as the grouped kernel would run them."""
    from ..grouping import cluster_block_rows, union_density
    from ..nn import BlockSparseLinear

    size = forward = transposed = 0.0
    for module in model.modules():
        if not isinstance(module, BlockSparseLinear) or module.density == 1.0:
            continue
        mask, g = module.block_mask.cpu(), group if group > 1 else 8
        perm = module.sparse_weight.row_perm.long().cpu() if group > 1 else cluster_block_rows(mask, g)
        flops = module.out_features * module.in_features
        forward += flops * union_density(mask, g, perm)
        mask_t = mask.t().contiguous()
        transposed += flops * union_density(mask_t, g, cluster_block_rows(mask_t, g))
        size += flops
    return (forward / size, transposed / size) if size else (float("nan"), float("nan"))


def save_structure(model, path: Path, group: int) -> None:
    """Every block-sparse module's block mask and row permutation (what speed depends on)."""
    from safetensors.torch import save_file

    from ..nn import BlockSparseLinear

    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, BlockSparseLinear):
            tensors[f"{name}.block_mask"] = module.block_mask.to(torch.uint8).cpu().contiguous()
            tensors[f"{name}.row_perm"] = module.sparse_weight.row_perm.cpu().contiguous()
    save_file(tensors, str(path), metadata={"row_group": str(group)})


def load_structure(path: Path) -> tuple[dict, dict, int]:
    """(block masks, row permutations, G) as `sparsify_model` takes them; validated there."""
    from safetensors import safe_open

    masks, perms = {}, {}
    with safe_open(str(path), framework="pt") as handle:
        group = int(handle.metadata().get("row_group", "1"))
        for key in handle.keys():
            name, _, kind = key.rpartition(".")
            if kind == "block_mask":
                masks[name] = handle.get_tensor(key).bool()
            elif kind == "row_perm":
                perms[name] = handle.get_tensor(key)
            else:
                raise ValueError(f"{path}: unexpected tensor {key!r} (expected NAME.block_mask / NAME.row_perm)")
    return masks, perms, group


# --------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------
def run_speed(args, configs) -> None:
    from ..integration.data import eval_tokens
    from ..integration.model import load_model
    from ..integration.recipes import latency
    from ..sparsify import sparsify_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dense_model, tokenizer = load_model(args.model)
    dense_model.eval()
    variants = {"dense": dense_model}
    for group, union in configs:
        name = config_name(group, union)
        structure = args.out / name / "structure.safetensors"
        if not structure.is_file():
            raise SystemExit(f"{structure} is missing: run --phase quality first (with the same --configs)")
        masks, perms, saved_group = load_structure(structure)
        model = copy.deepcopy(dense_model)
        sparsify_model(model, block_masks=masks, row_perms=perms if saved_group > 1 else None,
                       row_group=saved_group, whole_stays_dense=True)  # as prune_model converts
        variants[name] = model.eval()
    prompt = eval_tokens(tokenizer, args.dataset)[:, :args.prompt_len]
    measured = latency(variants, prompt, args.decode_tokens, repeats=args.reps)
    dense = measured["dense"]
    rows = {name: {"prefill_ms": m["prefill_s"] * 1e3, "decode_tokens_per_s": m["decode_tokens_per_s"],
                   "prefill_speedup": dense["prefill_s"] / m["prefill_s"],
                   "decode_speedup": m["decode_tokens_per_s"] / dense["decode_tokens_per_s"]}
            for name, m in measured.items()}
    common.write_json(args.out / "speed.json", {
        "environment": common.environment(torch.device("cpu")), "prompt_len": prompt.shape[1],
        "decode_tokens": args.decode_tokens, "reps": args.reps, "threads": torch.get_num_threads(),
        "variants": rows})


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def run_plot(args, configs) -> None:
    dense = _read(args.out / "dense.json")
    dense_ppl = dense["ppl"]
    speed = _read(args.out / "speed.json", required=False)
    results = [_read(args.out / config_name(g, u) / "result.json") for g, u in configs]
    free = next((r for r in results if r["row_group"] == 1), None)
    header = ["masks", "density", "one-shot ppl", "LoRA ppl", "vs free (LoRA)", "union fwd", "union W^T",
              "prefill speedup", "decode speedup"]
    rows = []
    for r in results:
        s = speed["variants"].get(r["config"]) if speed else None
        rows.append([r["config"], f"{r['total_density']:.3f}", f"{r['ppl_one_shot']:.2f}", f"{r['ppl_lora']:.2f}",
                     f"{r['ppl_lora'] / free['ppl_lora'] - 1:+.1%}" if free else "",
                     f"{r['union_forward']:.3f}", f"{r['union_transposed']:.3f}",
                     common.fmt_speedup(s["prefill_speedup"]) if s else "",
                     common.fmt_speedup(s["decode_speedup"]) if s else ""])
    lines = [f"Dense perplexity {dense_ppl:.2f} ({dense['windows']} windows of {args.seqlen} tokens).", "",
             common.markdown_table(header, rows)]
    if speed:
        env = speed["environment"]
        lines += ["", f"Speed: {env.get('device_name', 'CPU')}, {speed['threads']} threads, prefill "
                      f"{speed['prompt_len']} tokens, decode {speed['decode_tokens']} tokens, medians of "
                      f"{speed['reps']} interleaved rounds; torch {env.get('torch', '?')}."]
    (args.out / "tradeoff.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if speed:
        _pareto(args.out / "tradeoff.png", results, speed["variants"], dense_ppl)


def _pareto(path: Path, results: list[dict], speed: dict, dense_ppl: float) -> None:
    def draw(fig, axes):
        for ax, kind in zip(axes[0], ("decode_speedup", "prefill_speedup")):
            for r in (r for r in results if r["config"] in speed):
                x, y = speed[r["config"]][kind], r["ppl_lora"]
                ax.scatter(x, y, color="#c44e52" if r["row_group"] == 1 else "#4c72b0")
                ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.axhline(dense_ppl, color="gray", linestyle="--", label=f"dense {dense_ppl:.1f}")
            ax.axvline(1.0, color="gray", linewidth=0.5)
            ax.set_xlabel(f"{kind.split('_')[0]} speedup over dense (measured)")
            ax.set_ylabel("perplexity after LoRA")
            ax.legend()

    common.plot(path, draw, ncols=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tradeoff"))
    parser.add_argument("--phase", choices=("all",) + PHASES, default="all")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="G or G:u per configuration, comma-separated; 1 = free masks (default %(default)s)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (the demo's)")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps")
    parser.add_argument("--train-seqlen", type=int, default=256, help="tokens per LoRA step")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for speed (0: torch's default)")
    return parser


def resolve_defaults(args) -> None:
    if not 0.0 <= args.sparsity < 1.0:
        raise SystemExit(f"--sparsity must be in [0, 1), got {args.sparsity}")
    for name in ("seqlen", "nsamples", "eval_windows", "steps", "train_seqlen", "prompt_len", "decode_tokens", "reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.config_list = parse_configs(args.configs, args.sparsity)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def run(args) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    phases = PHASES if args.phase == "all" else (args.phase,)
    for phase in phases:
        {"quality": run_quality, "speed": run_speed, "plot": run_plot}[phase](args, args.config_list)
    return args.out


def main(argv=None) -> int:
    return common.main(build_parser, resolve_defaults, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
