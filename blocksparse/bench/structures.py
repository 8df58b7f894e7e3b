"""What the sparsity structure costs one-shot on this model, and what that projects for Llama-2-7B.

Wanda (score |W_ij| ||X_j||, no weight update) prunes the model's projections to 50% in
each structure, layer by layer as its reference code does: a layer's input norms from one
pass of the calibration windows through it, all its linears pruned, then the pass repeated
through the pruned layer for the next one. Structures: "unstructured" (per output row, as
Wanda), "N:M" (per row, N kept of every M consecutive inputs: 4:8, 2:4; N/M must be the
density) and "BxB" blocks (the score summed over each tile, every block row keeping the same
number of tiles: free masks, `blocksparse.masks`' Wanda block score). Perplexity on the
recovery benchmark's held-out windows (the start of the eval text).

Wanda's README publishes Llama-2-7B's WikiText-2 perplexity at 50% for the first three
structures (LLAMA2_7B_WANDA), so each gives k = ln(ratio on Llama-2-7B) / ln(ratio here): the
share of this model's log-perplexity gap that the larger model keeps under the same pruning.
k grows with the damage, so the report fits a gap map, ln(ratio there) = alpha ln(ratio
here)^beta (a line in log-log through the published structures), and with `--curves` (a
`bench recovery` folder) maps this model's points onto Llama-2-7B: the demo recipe's one-shot,
each recovery curve's last point, and its power-law extrapolation to the seed's reference
budget (30,000 x 1024 tokens); beside it, a constant k (mean, range) for comparison. A
projection, not a measurement: it assumes one map for every structure, pruning recipe and stage
of recovery (the published structures span the gaps it is read at, except the demo's one-shot,
just beyond them), it compares this model's default corpus with WikiText-2 and our calibration
windows with Wanda's 128 windows of C4 at Llama-2's context (4096 tokens), and a 7B model may
recover faster per token than a 135M one.

    python -m blocksparse.bench.structures --out runs/structures --curves docs/results/recovery/permuted_160k
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from torch import nn

from ..masks import SCORES, blocks_per_row, element_mask, select_block_mask
from . import common
from .recovery import REFERENCE_TOKENS, power_law, ratio_after

DEFAULT_STRUCTURES = "unstructured,4:8,2:4,16x16"
# Llama-2-7B, WikiText-2 perplexity (seqlen 4096) at 50% sparsity with Wanda, no weight update: the
# table "LLaMA-2 results" of Wanda's README (github.com/locuslab/wanda; Sun et al., "A Simple and
# Effective Pruning Approach for Large Language Models", ICLR 2024).
LLAMA2_7B_WANDA = {"dense": 5.12, "unstructured": 6.42, "4:8": 7.97, "2:4": 11.02}
PUBLISHED_SPARSITY = 0.5


def parse_structure(text: str) -> tuple[str, int, int]:
    """"unstructured" -> ("unstructured", 0, 0); "2:4" -> ("n:m", 2, 4); "16x16" -> ("block", 16, 16)."""
    text = text.strip()
    if text == "unstructured":
        return "unstructured", 0, 0
    for kind, sep in (("n:m", ":"), ("block", "x")):
        left, found, right = text.partition(sep)
        if found and left.isdigit() and right.isdigit():
            a, b = int(left), int(right)
            if kind == "n:m" and 1 <= a < b:
                return kind, a, b
            if kind == "block" and a == b >= 1:
                return kind, a, b
    raise ValueError(f"a structure is 'unstructured', N:M (1 <= N < M, e.g. 2:4) or BxB (square blocks, "
                     f"e.g. 16x16), got {text!r}")


def check_structure(structure: str, sparsity: float) -> tuple[str, int, int]:
    """parse_structure, and an N:M structure's density must be 1 - sparsity (it fixes its own)."""
    kind, a, b = parse_structure(structure)
    if kind == "n:m" and abs(a / b - (1.0 - sparsity)) > 1e-9:
        raise ValueError(f"{structure} keeps {a / b:.0%} of the weights; at sparsity {sparsity} use N:M with "
                         f"N/M = {1.0 - sparsity:g}")
    return kind, a, b


def structure_mask(scores: torch.Tensor, structure: str, sparsity: float) -> torch.Tensor:
    """Bool mask [N, K] keeping the highest elementwise `scores` under `structure`: per output
    row (unstructured; N:M, which fixes its own density), or per block row (BxB)."""
    kind, a, b = parse_structure(structure)
    n, k = scores.shape
    if kind == "unstructured":
        keep = k - int(k * sparsity)  # Wanda's count: int(K * sparsity) pruned per row
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(keep, dim=1).indices, True)
    if kind == "n:m":
        if k % b:
            raise ValueError(f"{structure} needs the input size to divide by {b}, got {k}")
        groups = scores.reshape(n, k // b, b)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(a, dim=2).indices, True)
        return mask.reshape(n, k)
    if n % a or k % a:
        raise ValueError(f"{structure} blocks need both sizes to divide by {a}, got [{n}, {k}]")
    tiles = scores.reshape(n // a, a, k // a, a).sum(dim=(1, 3))
    return element_mask(select_block_mask(tiles, blocks_per_row(k // a, 1.0 - sparsity)), a)


@torch.no_grad()
def wanda_prune(model: nn.Module, calib: torch.Tensor, structure: str, sparsity: float = PUBLISHED_SPARSITY,
                batch_size: int = 8) -> float:
    """Prune the family's projections of `model` in place (zeros, dense layout) with Wanda under
    `structure`, layer by layer; returns the fraction of their weights kept."""
    from ..families import decoder_layers
    from ..prune.calibration import advance, calibration_batches, dense_sq_norms, layer0_inputs
    from ..sparsify import target_linears

    check_structure(structure, sparsity)  # bad input fails before any work
    model.eval()
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    targets = target_linears(model)
    if not targets:
        raise ValueError("the model has no dense projections to prune (a block-sparse checkpoint?): give the "
                         "dense model")
    hidden, kwargs = layer0_inputs(model, layers, calibration_batches(calib, batch_size), device)
    kept = total = 0
    for layer in layers:
        linears = {name: lin for name, lin in targets.items() if any(lin is m for m in layer.modules())}
        sq = dense_sq_norms([layer], hidden, kwargs, [linears], device)  # the pass with the dense layer
        for name, lin in linears.items():
            scores = SCORES["wanda"].elementwise(lin.weight.detach().float(), sq[name].float().to(device))
            mask = structure_mask(scores, structure, sparsity)
            lin.weight.mul_(mask.to(lin.weight.dtype))
            kept += int(mask.sum())
            total += mask.numel()
        advance(layer, hidden, kwargs)  # the pruned layer's outputs feed the next
    return kept / total


def transfer_factors(measured: dict[str, float], dense: float) -> dict[str, float]:
    """k = ln(Llama-2-7B's published ratio) / ln(the ratio measured here), per published structure."""
    ours = {s: math.log(ppl / dense) for s, ppl in measured.items() if s in LLAMA2_7B_WANDA and s != "dense"}
    return {s: math.log(LLAMA2_7B_WANDA[s] / LLAMA2_7B_WANDA["dense"]) / gap for s, gap in ours.items() if gap > 0}


def gap_map(measured: dict[str, float], dense: float) -> tuple[float, float]:
    """(alpha, beta) of ln(ratio on Llama-2-7B) = alpha * ln(ratio here)^beta, least squares in
    log-log over the published structures measured here (one structure: beta = 1, alpha = its k)."""
    ks = transfer_factors(measured, dense)
    if not ks:
        raise ValueError(f"the projection needs one of {[s for s in LLAMA2_7B_WANDA if s != 'dense']} "
                         f"measured above dense, got {sorted(measured)}")
    if len(ks) == 1:
        return next(iter(ks.values())), 1.0
    gaps = {s: math.log(measured[s] / dense) for s in ks}
    intercept, beta = common.fit_line([math.log(gaps[s]) for s in ks],
                                      [math.log(ks[s] * gaps[s]) for s in ks])
    return math.exp(intercept), beta


def projected(ratio: float, alpha: float, beta: float) -> float:
    """Llama-2-7B's ratio for `ratio` here by the gap map."""
    return math.exp(alpha * math.log(ratio) ** beta) if ratio > 1 else ratio


def projection_rows(measured: dict[str, float], dense: float, curves: Path) -> list[list[str]]:
    """Rows (what, ratio here, Llama-2-7B by the gap map, its perplexity, by a constant k: mean
    (range)) for the curves' one-shot point and each recipe's last point and its power law's
    value at REFERENCE_TOKENS."""
    base = json.loads((curves / "baseline.json").read_text())
    alpha, beta = gap_map(measured, dense)
    ks = transfer_factors(measured, dense)
    k_mean, k_lo, k_hi = statistics.fmean(ks.values()), min(ks.values()), max(ks.values())

    def row(what: str, ratio: float) -> list[str]:
        llama = projected(ratio, alpha, beta)
        return [what, f"{ratio:.2f}x", f"{llama:.2f}x", f"{LLAMA2_7B_WANDA['dense'] * llama:.2f}",
                f"{ratio ** k_mean:.2f}x ({ratio ** k_lo:.2f}-{ratio ** k_hi:.2f}x)"]

    rows = [row("the curves' one-shot checkpoint", base["one_shot"] / base["dense"])]
    for result in curve_results(curves):
        if any(p["ppl"] <= base["dense"] for p in result["points"]):
            continue  # no gap to fit
        last = result["points"][-1]
        a, b = power_law(result["points"], base["dense"])
        rows.append(row(f"+ `{result['recipe']}` after {last['tokens']:,} tokens (measured here)",
                        last["ppl"] / base["dense"]))
        rows.append(row(f"+ `{result['recipe']}` after {REFERENCE_TOKENS:,} tokens (power law, extrapolated)",
                        ratio_after(a, b, REFERENCE_TOKENS)))
    return rows


def curve_results(curves: Path) -> list[dict]:
    """The recipes' curves (>= 2 points) of a `bench recovery` folder: RECIPE/result.json as the
    benchmark writes them, or RECIPE.json as docs/results keeps them."""
    paths = sorted(curves.glob("*/result.json")) + sorted(p for p in curves.glob("*.json")
                                                          if p.name not in ("baseline.json", "speed.json"))
    results = [json.loads(p.read_text()) for p in paths]
    return [r for r in results if len(r.get("points", [])) >= 2]


def run(args) -> Path:
    from ..integration.data import calibration_samples, eval_tokens
    from ..integration.evaluate import perplexity
    from ..integration.model import load_model

    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "structures.json"
    settings = {name: getattr(args, name) for name in ("model", "dataset", "sparsity", "nsamples", "seqlen",
                                                       "eval_windows")}
    found = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results = found if found.get("settings") == settings else {"settings": settings, "ppl": {}}
    model, tokenizer = load_model(args.model)
    windows = eval_tokens(tokenizer, args.dataset)[:, :args.eval_windows * args.seqlen]
    if "dense" not in results["ppl"]:
        results["ppl"]["dense"] = perplexity(model, windows, args.seqlen)["ppl"]
        results["environment"] = common.environment(torch.device("cpu"))  # where the numbers were measured
    calib = calibration_samples(tokenizer, args.dataset, args.nsamples, args.seqlen)
    for structure in args.structure_list:
        if structure in results["ppl"]:
            print(f"{structure}: measured earlier with the same settings, skipped")
            continue
        pruned, _ = load_model(args.model)
        try:
            density = wanda_prune(pruned, calib, structure, args.sparsity)
        except ValueError as err:
            raise SystemExit(f"{structure}: {err}") from None
        results["ppl"][structure] = perplexity(pruned, windows, args.seqlen)["ppl"]
        print(f"{structure}: density {density:.3f}, perplexity {results['ppl'][structure]:.2f}")
        results["environment"] = common.environment(torch.device("cpu"))
        common.write_json(results_file, results)  # each structure kept as it finishes
    write_report(args, results)
    return args.out


def write_report(args, results: dict) -> None:
    ppl = results["ppl"]
    dense = ppl["dense"]
    ks = transfer_factors(ppl, dense) if args.sparsity == PUBLISHED_SPARSITY else {}
    rows = [[s, f"{p:.2f} ({p / dense:.2f}x)",
             (f"{LLAMA2_7B_WANDA[s]:.2f} ({LLAMA2_7B_WANDA[s] / LLAMA2_7B_WANDA['dense']:.2f}x)"
              if s in LLAMA2_7B_WANDA and args.sparsity == PUBLISHED_SPARSITY else "-"),
             f"{ks[s]:.3f}" if s in ks else "-"] for s, p in ppl.items()]
    lines = [f"Wanda (no weight update) at {args.sparsity:.0%} on `{args.model}`: perplexity on {args.eval_windows} "
             f"held-out windows of {args.seqlen} tokens, calibration {args.nsamples} x {args.seqlen} tokens. "
             "Llama-2-7B: Wanda's published WikiText-2 numbers (its README). k = ln(ratio there) / ln(ratio here).",
             "", common.markdown_table(["structure", "this model", "Llama-2-7B (published)", "k"], rows)]
    if args.curves is not None and ks:
        base = json.loads((args.curves / "baseline.json").read_text())
        alpha, beta = gap_map(ppl, dense)
        fit = ", ".join(f"{s} {projected(ppl[s] / dense, alpha, beta) * LLAMA2_7B_WANDA['dense']:.2f}" for s in ks)
        lines += ["", f"Projection to Llama-2-7B (not a measurement): the gap map ln(ratio there) = {alpha:.3f} "
                  f"ln(ratio here)^{beta:.2f}, fitted to the published structures (it gives {fit} against the "
                  f"published numbers above), and beside it a constant k (mean {statistics.fmean(ks.values()):.3f}, "
                  f"range {min(ks.values()):.3f}-{max(ks.values()):.3f}); the recovery curves of `{args.curves}` "
                  f"(dense {base['dense']:.2f} on their windows, {dense:.2f} here).", "",
                  common.markdown_table(["point", "this model (x dense)", "Llama-2-7B (projected)",
                                         "its perplexity (projected; dense 5.12)", "by a constant k (range)"],
                                        projection_rows(ppl, dense, args.curves))]
    text = "\n".join(lines) + "\n"
    (args.out / "structures.md").write_text(text)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/structures"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--sparsity", type=float, default=PUBLISHED_SPARSITY,
                        help="the projection needs the published numbers' 50%% (default)")
    parser.add_argument("--structures", default=DEFAULT_STRUCTURES, help="comma-separated (default: %(default)s)")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration and eval window")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--curves", type=Path, default=None,
                        help="a `bench recovery` folder to project to Llama-2-7B")
    return parser


def resolve_defaults(args) -> None:
    args.structure_list = [s.strip() for s in args.structures.split(",") if s.strip()]
    if not args.structure_list:
        raise SystemExit("--structures: give at least one structure")
    if not 0.0 < args.sparsity < 1.0:
        raise SystemExit(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    for structure in args.structure_list:
        try:
            check_structure(structure, args.sparsity)
        except ValueError as err:
            raise SystemExit(f"--structures: {err}") from None
    for name in ("nsamples", "seqlen", "eval_windows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.curves is not None:
        if not (args.curves / "baseline.json").is_file():
            raise SystemExit(f"--curves: expected a `bench recovery` folder with baseline.json, got {args.curves}")
        published = [s for s in LLAMA2_7B_WANDA if s != "dense"]
        if args.sparsity != PUBLISHED_SPARSITY or not set(published) & set(args.structure_list):
            raise SystemExit(f"--curves: the projection needs --sparsity {PUBLISHED_SPARSITY} and one of "
                             f"{', '.join(published)} in --structures (the published Llama-2-7B numbers)")


def main(argv=None) -> int:
    return common.main(build_parser, resolve_defaults, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
