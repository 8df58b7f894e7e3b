"""Union densities on Llama-2-7B-shaped 16x16 masks (256 and 688 block columns), free and grouped.

The roofline's union densities must come from masks of the shapes it predicts:
the embedded model's linears have 36-96 block columns, Llama-2-7B's 256 or 688,
and a union grows with the number of columns to choose from. No Llama-2-7B
weights can be read here, so the masks are pruned from synthetic Wanda-like
scores, |W_ij| * ||X_j||: W Gaussian with log-normal row scales (sigma 0.3),
input-channel norms log-normal (sigma 1.0) with 0.5% outlier channels at 20x,
the heavy-tailed activations Wanda's scores are known for. Per linear shape,
sparsity and G:

- free:     each block row keeps its P best blocks (`prune` without
            `--row-group`), rows clustered by `cluster_block_rows`;
- grouped:  rows in groups of G sharing P block columns
            (`shared_column_groups`, what `prune --row-group G` builds);
            the forward union is P by construction;
- each also for the transposed mask (the dX kernel's orientation), clustered.

For each it gives the mean union density and max/mean of the groups' union
sizes (the wave tail of the roofline model).

    python -m blocksparse.bench.llama_union --out runs/llama_union
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..grouping import cluster_block_rows, group_union_sizes, shared_column_groups
from ..kernels.roofline import LLAMA2_7B_SHAPES

BLOCK = 16
GROUPS = (1, 2, 4, 8)


def synthetic_block_scores(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[N/16, K/16] block sums of Wanda-like scores |W| * ||X|| (see the module docstring)."""
    row_scale = torch.exp(0.3 * torch.randn(n, 1, generator=gen))
    x_norm = torch.exp(torch.randn(1, k, generator=gen))
    outliers = torch.randperm(k, generator=gen)[: max(1, k // 200)]
    x_norm[0, outliers] *= 20.0
    scores = (torch.randn(n, k, generator=gen).abs() * row_scale) * x_norm
    return scores.view(n // BLOCK, BLOCK, k // BLOCK, BLOCK).sum(dim=(1, 3))


def _stats(mask: torch.Tensor, g: int) -> dict:
    perm = cluster_block_rows(mask, g) if g > 1 else None
    sizes = group_union_sizes(mask, g, perm).double()
    return {"union": round(float(sizes.mean() / mask.shape[1]), 4),
            "max_over_mean": round(float(sizes.max() / sizes.mean()), 4)}


def measure(sparsities=(0.5, 0.75), groups=GROUPS, seed: int = 0, shapes=LLAMA2_7B_SHAPES) -> list[dict]:
    """One row per (shape, sparsity, G, mask kind); `shapes`: (name, N, K) triples."""
    rows = []
    for name, n, k in shapes:
        gen = torch.Generator().manual_seed(seed)
        scores = synthetic_block_scores(n, k, gen)
        for sparsity in sparsities:
            keep = round((1 - sparsity) * scores.shape[1])
            free = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(keep, dim=1).indices, True)
            for g in groups:
                masks = {"free": free}
                if g > 1:
                    perm, sets = shared_column_groups(scores, g, keep, keep)
                    grouped = torch.empty_like(free)
                    grouped[perm] = sets.repeat_interleave(g, dim=0)[: scores.shape[0]]
                    masks["grouped"] = grouped
                else:
                    masks["grouped"] = free
                for kind, mask in masks.items():
                    fwd, bwd = _stats(mask, g), _stats(mask.t().contiguous(), g)
                    rows.append({"shape": name, "N": n, "K": k, "sparsity": sparsity, "G": g, "mask": kind,
                                 "union": fwd["union"], "max_over_mean": fwd["max_over_mean"],
                                 "union_bwd": bwd["union"], "max_over_mean_bwd": bwd["max_over_mean"]})
                    print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/llama_union")
    args = parser.parse_args(argv)
    rows = measure(tuple(args.sparsity), seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llama_union.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| shape | sparsity | G | mask | union fwd | max/mean fwd | union bwd | max/mean bwd |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} {r['N']}x{r['K']} | {r['sparsity']:.0%} | {r['G']} | {r['mask']} | {r['union']:.3f} "
              f"| {r['max_over_mean']:.3f} | {r['union_bwd']:.3f} | {r['max_over_mean_bwd']:.3f} |" for r in rows]
    (out / "llama_union.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
