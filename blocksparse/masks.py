"""Block masks from tile scores: the score registry and the comparison groups.

    scores = block_scores(weight, act_sq_norms, block_size=16, score="wanda")  # [N/b, K/b]
    mask = select_block_mask(scores, blocks_per_row(K // 16, density=0.5))     # bool [N/b, K/b]

A score is one entry of `SCORES`: a function of W [N, K] (fp32) and the input
channels' squared norms ||X_j||^2 [K] giving an elementwise importance, summed
over each b x b tile. A comparison group is one entry of `COMPARISON_GROUPS`:
which tiles compete for the kept places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .format import DEFAULT_BLOCK_SIZE, check_block_size, check_divisible
from .grouping import group_of, shared_column_groups


@dataclass(frozen=True)
class Score:
    elementwise: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_activations: bool
    help: str


SCORES = {
    "wanda": Score(lambda w, sq: w.abs() * sq.sqrt()[None, :], True, "sum over the tile of |W_ij| ||X_j||"),
    "obs": Score(lambda w, sq: w.square() * sq[None, :], True,
                 "sum of W_ij^2 ||X_j||^2 (the diagonal OBS saliency)"),
    "magnitude": Score(lambda w, sq: w.abs(), False, "sum of |W_ij|"),
}


def block_scores(weight: torch.Tensor, act_sq_norms: torch.Tensor | None, block_size: int,
                 score: str = "wanda") -> torch.Tensor:
    """Importance of every b x b tile of W [N, K]: float [N/b, K/b].

    act_sq_norms [K] holds ||X_j||^2 over the calibration tokens (unused by scores
    that do not need activations).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {tuple(SCORES)}, got {score!r}")
    n, k = weight.shape
    entry = SCORES[score]
    sq = None
    if entry.needs_activations:
        if act_sq_norms is None or act_sq_norms.shape != (k,):
            given = None if act_sq_norms is None else tuple(act_sq_norms.shape)
            raise ValueError(f"{score} scores need act_sq_norms of shape ({k},), got {given}")
        sq = act_sq_norms.float().clamp_min(0)
    b = block_size
    return entry.elementwise(weight.detach().float(), sq).reshape(n // b, b, k // b, b).sum(dim=(1, 3))


def blocks_per_row(n_block_cols: int, density: float) -> int:
    """Blocks one block row keeps at `density`: rounded down, at least one."""
    return max(1, min(n_block_cols, math.floor(density * n_block_cols + 1e-9)))


def _per_block_row(scores: torch.Tensor, keep_per_row: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(keep_per_row, dim=1).indices, True)


def _whole_matrix(scores: torch.Tensor, keep_per_row: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.view(-1)[scores.flatten().topk(keep_per_row * scores.shape[0]).indices] = True
    return mask


# Which tiles compete: "block-row" keeps every block row's best `keep_per_row`
# (all rows hold the same number of blocks: load balance, Wanda's per-row spirit);
# "global" keeps the best keep_per_row * rows of the matrix (one threshold; rows may
# be left nearly empty; for comparison only).
COMPARISON_GROUPS = {"block-row": _per_block_row, "global": _whole_matrix}


def select_block_mask(scores: torch.Tensor, keep_per_row: int, comparison_group: str = "block-row") -> torch.Tensor:
    """Bool mask [N/b, K/b] of the kept blocks."""
    cols = scores.shape[1]
    if not 1 <= keep_per_row <= cols:
        raise ValueError(f"keep_per_row must be in [1, {cols}], got {keep_per_row}")
    if comparison_group not in COMPARISON_GROUPS:
        raise ValueError(f"comparison_group must be one of {tuple(COMPARISON_GROUPS)}, got {comparison_group!r}")
    return COMPARISON_GROUPS[comparison_group](scores, keep_per_row)


def union_blocks_for(n_block_cols: int, keep_per_row: int, union_density: float | None) -> int:
    """Block columns a row group may use: round(union_density * C), at least keep_per_row;
    None means fully shared (= keep_per_row: the union is the density)."""
    if union_density is None:
        return keep_per_row
    if not 0.0 < union_density <= 1.0:
        raise ValueError(f"union_density must be in (0, 1], got {union_density}")
    return min(n_block_cols, max(keep_per_row, round(union_density * n_block_cols)))


def grouped_block_mask(scores: torch.Tensor, keep_per_row: int, row_group: int,
                       union_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-row mask whose rows, in groups of `row_group`, share `union_blocks` columns.

    Every block row keeps exactly `keep_per_row` blocks, its best inside its group's
    column set (`blocksparse.grouping.shared_column_groups` chooses groups and sets).
    Returns (mask [N/b, K/b], perm): group g is block rows perm[g*G:(g+1)*G].
    """
    cols = scores.shape[1]
    if not 1 <= keep_per_row <= cols:
        raise ValueError(f"keep_per_row must be in [1, {cols}], got {keep_per_row}")
    perm, sets = shared_column_groups(scores, row_group, keep_per_row, union_blocks)
    group = group_of(perm, row_group)
    inside = scores.detach().double().cpu().masked_fill(~sets[group], -float("inf"))
    mask = torch.zeros_like(inside, dtype=torch.bool).scatter_(1, inside.topk(keep_per_row, dim=1).indices, True)
    return mask.to(scores.device), perm


def element_mask(block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """The [N, K] element mask of a block mask."""
    return block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def magnitude_block_mask(weight: torch.Tensor, sparsity: float, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Per block row, the largest-|W| blocks: the pruner's magnitude score without calibration data."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    check_divisible(tuple(weight.shape), check_block_size(block_size))
    scores = block_scores(weight, None, block_size, "magnitude")
    return select_block_mask(scores, blocks_per_row(scores.shape[1], 1.0 - sparsity))
