"""Union density of real Wanda block masks: natural row order vs clustered vs random.

The grouped kernel (DESIGN.md section 5) computes, per group of G block rows, the
union of their block columns; its FLOPs are union_density x dense. This script
prunes every target linear of a model with `blocksparse.prune.prune_model`
(Wanda 16x16 block scores, per-block-row comparison group, sequential
calibration on the default corpus; no reconstruction, which does not change
masks) and reports the mean union density per G for:

- natural:     block rows in their original order;
- clustered:   after `blocksparse.grouping.cluster_block_rows`;
- random:      a random mask with the same number of blocks per block row
               (what union densities would be without Wanda's shared column structure);
- backward:    clustered union density of the transposed mask, which the dX = dY W
               kernel of the backward pass walks (groups of G block columns of W).

Per projection type the numbers are means over layers; "all" weights every
linear by its dense FLOPs (N x K), the weight a model-level speedup needs.

    python benchmarks/union_density.py --out runs/union_density
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..grouping import cluster_block_rows, union_density

ORDERS = ("natural", "clustered", "random", "backward")


def wanda_block_masks(model_name: str, sparsity: float, block_size: int, calib_sequences: int, seq_len: int,
                      seed: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Prune a fresh copy of the model; return {linear name: block mask} and {name: (N, K)}."""
    from ..integration.data import calibration_samples
    from ..integration.model import load_model
    from ..nn import BlockSparseLinear
    from ..prune import prune_model

    model, tokenizer = load_model(model_name)
    calib = calibration_samples(tokenizer, "default", calib_sequences, seq_len, seed=seed)
    prune_model(model, calib, sparsity=sparsity, block_size=block_size, method="wanda", comparison_group="block-row",
                reconstruct=False, convert=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    return ({name: m.block_mask.cpu() for name, m in layers.items()},
            {name: (m.out_features, m.in_features) for name, m in layers.items()})


def random_like(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random mask with the same number of kept blocks in every block row."""
    keep = int(mask[0].sum())
    order = torch.rand(mask.shape, generator=gen).argsort(dim=1)[:, :keep]
    return torch.zeros_like(mask).scatter_(1, order, True)


def projection_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def measure(masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], groups, seed: int):
    """Rows {sparsity, projection, G, order, union_density, layers} averaged as the docstring says."""
    gen = torch.Generator().manual_seed(seed)
    per_proj = defaultdict(list)      # (proj, G, order) -> [density]
    weighted = defaultdict(float)     # (G, order) -> sum density * N*K
    total_weight = 0.0
    cluster_seconds = 0.0
    for name, mask in masks.items():
        rand = random_like(mask, gen)
        flops = shapes[name][0] * shapes[name][1]
        total_weight += flops
        for g in groups:
            start = time.perf_counter()
            perm = cluster_block_rows(mask, g)
            cluster_seconds += time.perf_counter() - start
            mask_t = mask.t().contiguous()
            values = {"natural": union_density(mask, g), "clustered": union_density(mask, g, perm),
                      "random": union_density(rand, g),
                      "backward": union_density(mask_t, g, cluster_block_rows(mask_t, g))}
            for order, value in values.items():
                per_proj[(projection_of(name), g, order)].append(value)
                weighted[(g, order)] += value * flops
    rows = []
    projections = list(dict.fromkeys(k[0] for k in per_proj))  # in the order the layers hold them
    for proj in projections + ["all"]:
        for g in groups:
            for order in ORDERS:
                if proj == "all":
                    value, count = weighted[(g, order)] / total_weight, len(masks)
                else:
                    vals = per_proj[(proj, g, order)]
                    value, count = sum(vals) / len(vals), len(vals)
                rows.append({"projection": proj, "G": g, "order": order,
                             "union_density": round(value, 4), "linears": count})
    return rows, cluster_seconds


def markdown_table(rows, sparsity: float, groups) -> str:
    lines = [f"### sparsity {sparsity:.0%}: union density (fraction of dense FLOPs) "
             f"natural / clustered / random / backward (transposed mask, clustered)",
             "", "| projection | " + " | ".join(f"G={g}" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    table = {(r["projection"], r["G"], r["order"]): r["union_density"] for r in rows}
    for proj in dict.fromkeys(r["projection"] for r in rows):
        cells = [" / ".join(f"{table[(proj, g, o)]:.3f}" for o in ORDERS) for g in groups]
        lines.append(f"| {proj} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M) or a local HF dir")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--block-size", "--block_size", type=int, default=16)
    parser.add_argument("--calib-sequences", "--calib_sequences", type=int, default=32)
    parser.add_argument("--seq-len", "--seq_len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/union_density", help="directory for union_density.md/.csv")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not all(0.0 < s < 1.0 for s in args.sparsity):
        raise SystemExit(f"--sparsity values must lie in (0, 1), got {args.sparsity}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows, sections = [], []
    for sparsity in args.sparsity:
        masks, shapes = wanda_block_masks(args.model, sparsity, args.block_size, args.calib_sequences,
                                          args.seq_len, args.seed)
        rows, seconds = measure(masks, shapes, args.groups, args.seed)
        for r in rows:
            r["sparsity"] = sparsity
        all_rows += rows
        sections.append(markdown_table(rows, sparsity, args.groups)
                        + f"\n\nclustering time: {seconds:.2f} s for {len(masks)} linears x {len(args.groups)} G")
    header = (f"# Union density of Wanda {args.block_size}x{args.block_size} block masks\n\n"
              f"model {args.model}, {len(shapes)} linears, blocksparse.prune Wanda (sequential, per block row, "
              f"no reconstruction), calibration {args.calib_sequences} x {args.seq_len} tokens of the default "
              f"corpus, seed {args.seed}. Rows per projection are means over layers; "
              f"'all' weights each linear by N*K.\n")
    report = header + "\n\n".join(sections) + "\n"
    (out / "union_density.md").write_text(report)
    with open(out / "union_density.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sparsity", "projection", "G", "order", "union_density", "linears"])
        writer.writeheader()
        writer.writerows(all_rows)
    print(report)
    print(f"wrote {out / 'union_density.md'} and {out / 'union_density.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
