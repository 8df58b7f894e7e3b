"""How much each matrix keeps: uniform, OWL (outlier-weighted layer-wise), or explicit densities.

Densities per matrix come first (`owl_densities`, `explicit_densities`); `keep_counts`
turns them into whole blocks per block row so that the total matches the budget.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence

import torch

from ..masks import blocks_per_row

ALLOCATIONS = ("uniform", "owl")


def owl_densities(outlier_ratios: Sequence[float], density: float, spread: float = 0.08) -> list[float]:
    """OWL (outlier-weighted layer-wise) densities: layers with more outliers keep more.

    Densities are the outlier ratios mapped linearly onto a range of width
    2 * spread, centred so that their mean equals `density`.
    """
    ratios = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    span = float(ratios.max() - ratios.min())
    scaled = (ratios - ratios.min()) * (2 * spread / span) if span > 0 else torch.zeros_like(ratios)
    return (scaled - scaled.mean() + density).clamp(0.0, 1.0).tolist()


def outlier_ratio(weights: Sequence[torch.Tensor], act_sq_norms: Sequence[torch.Tensor],
                  threshold: float = 5.0) -> float:
    """Fraction of Wanda scores |W_ij| ||X_j|| above `threshold` x their layer mean (OWL's LOD)."""
    scores = torch.cat([(w.detach().float().abs() * sq.float().sqrt()[None, :]).flatten()
                        for w, sq in zip(weights, act_sq_norms)])
    return float((scores > threshold * scores.mean()).float().mean())


def explicit_densities(allocation: Mapping[str, float], shapes: Mapping[str, tuple[int, int]],
                       density: float) -> dict[str, float]:
    """Per-linear densities from {linear name or module prefix: density}.

    A key covers the linear of that name or every linear under that module (e.g.
    "model.layers.0.mlp"); `*` matches any run of characters ("model.layers.*.self_attn.v_proj").
    The longest matching key wins. Linears no key covers share what is left of the
    budget, so the total stays at `density`.
    """
    for key, value in allocation.items():
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"allocation density for {key!r} must be in (0, 1], got {value}")

    def key_of(name):
        keys = [key for key in allocation if fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(name, key + ".*")]
        return max(keys, key=len) if keys else None

    owners = {name: key_of(name) for name in shapes}
    unused = sorted(set(allocation) - set(owners.values()))
    if unused:
        raise ValueError(f"allocation keys match no pruned linear: {unused[:5]} "
                         f"(pruned linears look like {next(iter(shapes))!r})")
    fixed = {name: float(allocation[key]) for name, key in owners.items() if key is not None}
    rest = [name for name in shapes if name not in fixed]
    if not rest:
        return fixed
    size = {name: n * k for name, (n, k) in shapes.items()}
    left = density * sum(size.values()) - sum(fixed[name] * size[name] for name in fixed)
    rest_density = left / sum(size[name] for name in rest)
    if not 0.0 < rest_density <= 1.0:
        raise ValueError(f"the named densities leave density {rest_density:.3f} for the other linears; "
                         f"the total cannot be {density:.3f}")
    return {**fixed, **{name: rest_density for name in rest}}


def keep_counts(densities: Mapping[str, float], shapes: Mapping[str, tuple[int, int]],
                block_size: int, density: float) -> dict[str, int]:
    """Blocks kept per block row of each matrix, so the total kept fraction equals `density`.

    Each matrix first gets `blocks_per_row` (floor(density_m * K/b), at least one); the blocks still
    missing from the budget round(density * all blocks) go, one block per block row
    at a time, to the matrix whose rounding lost most among those that still fit.
    Exact whenever the leftover can be tiled by whole block rows (always for a
    uniform allocation).
    """
    b = block_size
    total = sum((n // b) * (k // b) for n, k in shapes.values())
    budget = int(round(density * total))
    counts, lost = {}, {}
    for name, (n, k) in shapes.items():
        want = min(max(densities[name], 0.0), 1.0) * (k // b)
        counts[name] = blocks_per_row(k // b, densities[name])
        lost[name] = want - counts[name]
    spent = sum(counts[name] * (n // b) for name, (n, k) in shapes.items())
    if spent > budget:
        raise ValueError(f"cannot keep a total density of {density:.4f}: the densities asked for (at least one "
                         f"block per block row) already keep {spent / total:.4f}; lower the fixed densities "
                         f"or the sparsity")
    while True:
        fits = [name for name, (n, k) in shapes.items() if spent + n // b <= budget and counts[name] < k // b]
        if not fits:
            return counts
        name = max(fits, key=lost.get)
        counts[name] += 1
        lost[name] -= 1.0
        spent += shapes[name][0] // b

