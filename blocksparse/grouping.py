"""Row groups: block-row clustering and union density, for the grouped kernel schedule.

The grouped forward kernel gives each program G consecutive block rows and walks
the *union* of their block columns, so its compute is proportional to the mean
union density over groups (1.0 = dense). Reordering block rows so that rows with
similar column sets share a group shrinks the unions. The permutation is
computed once per weight, at construction; the kernel's epilogue stores each
block row at its true place, so the model's numerics do not change.

    perm = cluster_block_rows(block_mask, group_size=4)    # LongTensor [R]
    union_density(block_mask, 4, perm)                     # fraction of dense compute

Algorithm: greedy grouping (seed each group with the densest unassigned row,
then add the row that grows the union least), then a local search over row
swaps between groups (all R x R swap gains in one matrix product per pass),
with a few random zero-gain swaps to leave local optima (what they buy on
real masks: docs/DESIGN.md, section 5).
"""

from __future__ import annotations

import torch

__all__ = ["cluster_block_rows", "group_of", "group_union_sizes", "shared_column_groups", "union_density"]


def _check_mask(block_mask: torch.Tensor, group_size: int) -> None:
    if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 2:
        got = tuple(block_mask.shape) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
        raise ValueError(f"block_mask must be a 2-D bool tensor [block_rows, block_cols], got {got}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def _check_perm(perm: torch.Tensor, rows: int) -> torch.Tensor:
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.numel() != rows:
        raise ValueError(f"perm must be a 1-D permutation of {rows} block rows, got shape {tuple(perm.shape)}")
    if perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError(f"perm must be an integer tensor, got {perm.dtype}")
    perm = perm.to(torch.long).cpu()
    if not torch.equal(torch.sort(perm).values, torch.arange(rows)):
        raise ValueError(f"perm is not a permutation of range({rows})")
    return perm


def group_union_sizes(block_mask: torch.Tensor, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Number of distinct block columns of each group of `group_size` consecutive (permuted) rows.

    The last group is shorter when group_size does not divide the row count.
    """
    _check_mask(block_mask, group_size)
    rows, cols = block_mask.shape
    mask = block_mask.cpu()
    if perm is not None:
        mask = mask[_check_perm(perm, rows)]
    groups = -(-rows // group_size)
    padded = torch.zeros(groups * group_size, cols, dtype=torch.bool)
    padded[:rows] = mask
    return padded.view(groups, group_size, cols).any(dim=1).sum(dim=1)


def union_density(block_mask: torch.Tensor, group_size: int, perm: torch.Tensor | None = None) -> float:
    """Mean over groups of |union of the group's block columns| / block columns.

    This is the fraction of dense FLOPs the grouped kernel (BN = block_size * group_size)
    performs; group_size=1 gives the plain density.
    """
    sizes = group_union_sizes(block_mask, group_size, perm)
    return float(sizes.double().mean() / block_mask.shape[1]) if sizes.numel() else 0.0


def _greedy_groups(rows_f: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group rows one group at a time: seed = densest unassigned row, then repeatedly
    add the row adding the fewest new columns (ties: the row overlapping most)."""
    num_rows, num_cols = rows_f.shape
    row_counts = rows_f.sum(dim=1)
    unassigned = torch.ones(num_rows, dtype=torch.bool, device=rows_f.device)
    order = []
    big = float(num_cols + 1) ** 2
    while len(order) < num_rows:
        seed = int(torch.where(unassigned, row_counts, -1.0).argmax())
        unassigned[seed] = False
        order.append(seed)
        union = rows_f[seed].clone()
        for _ in range(group_size - 1):
            if not bool(unassigned.any()):
                break
            overlap = rows_f @ union
            growth = row_counts - overlap
            # Fewest new columns first; among equals the row sharing most columns
            # (the densest such row, which would be hardest to place later).
            key = torch.where(unassigned, growth * (num_cols + 1) - overlap, big)
            pick = int(key.argmin())
            unassigned[pick] = False
            order.append(pick)
            union = torch.maximum(union, rows_f[pick])
    return torch.tensor(order, dtype=torch.long, device=rows_f.device)


def _swap_deltas(rows_f: torch.Tensor, perm: torch.Tensor, group_size: int):
    """delta[i, j]: change of the summed union size if rows i and j swap groups
    (+inf within a group), the group of every row, and the current summed union size.

    For row i in group g let U_i be the union of g without i; swapping i (in g)
    with j (in h) gives |U_i + row_j| + |U_j + row_i| - |U_g| - |U_h|, so all
    R x R deltas are one matrix product.
    """
    num_rows, num_cols = rows_f.shape
    num_groups = -(-num_rows // group_size)
    group_of = torch.empty(num_rows, dtype=torch.long, device=rows_f.device)
    group_of[perm] = torch.arange(num_rows, device=rows_f.device) // group_size
    cover = torch.zeros(num_groups, num_cols, device=rows_f.device).index_add_(0, group_of, rows_f)
    union_size = (cover > 0).sum(dim=1).to(rows_f.dtype)
    without_self = ((cover[group_of] - rows_f) > 0).to(rows_f.dtype)
    joined = without_self.sum(dim=1)[:, None] + rows_f.sum(dim=1)[None, :] - without_self @ rows_f.T
    base = union_size[group_of]
    delta = joined + joined.T - base[:, None] - base[None, :]
    delta[group_of[:, None] == group_of[None, :]] = float("inf")
    return delta, group_of, float(union_size.sum())


def _apply_swaps(perm: torch.Tensor, pairs: list[tuple[int, int]], group_of: torch.Tensor) -> None:
    """Swap each (i, j) in order, skipping pairs whose groups were already changed
    in this batch (their deltas are stale)."""
    position = torch.empty_like(perm)
    position[perm] = torch.arange(perm.numel(), device=perm.device)
    group_of = group_of.tolist()
    position = position.tolist()
    touched = set()
    for i, j in pairs:
        gi, gj = group_of[i], group_of[j]
        if gi in touched or gj in touched:
            continue
        touched.update((gi, gj))
        perm[position[i]], perm[position[j]] = j, i


def _swap_refine(rows_f: torch.Tensor, perm: torch.Tensor, group_size: int, max_passes: int,
                 plateau_rounds: int, generator: torch.Generator) -> torch.Tensor:
    """Local search over row swaps between groups, keeping the best permutation seen.

    Each pass applies, best first, each row's best improving swap over disjoint
    group pairs. At a local optimum it takes a batch of random zero-change swaps
    (a plateau move) to escape, at most `plateau_rounds` times.
    """
    perm = perm.clone()
    best_total, best_perm = float("inf"), perm.clone()
    plateau_moves = 0
    for _ in range(max_passes):
        delta, group_of, total = _swap_deltas(rows_f, perm, group_size)
        if total < best_total:
            best_total, best_perm = total, perm.clone()
        best_gain, partner = delta.min(dim=1)
        improving = (best_gain < -0.5).nonzero().flatten()
        if improving.numel():
            improving = improving[torch.argsort(best_gain[improving])]
            _apply_swaps(perm, list(zip(improving.tolist(), partner[improving].tolist())), group_of)
            continue
        if plateau_moves >= plateau_rounds:
            break
        plateau_moves += 1
        neutral = (delta.abs() < 0.5).nonzero()
        neutral = neutral[neutral[:, 0] < neutral[:, 1]].cpu()
        if neutral.numel() == 0:
            break
        neutral = neutral[torch.randperm(neutral.shape[0], generator=generator)[:perm.numel()]]
        _apply_swaps(perm, [tuple(pair) for pair in neutral.tolist()], group_of)
    _, _, total = _swap_deltas(rows_f, perm, group_size)
    return perm if total < best_total else best_perm


def cluster_block_rows(block_mask: torch.Tensor, group_size: int, max_swap_passes: int = 200,
                       plateau_rounds: int = 10, seed: int = 0) -> torch.Tensor:
    """A permutation `perm` of block rows such that consecutive groups of `group_size`
    rows of `block_mask[perm]` share block columns (small union density).

    block_mask: bool [R, C]. Returns LongTensor [R] on the CPU: group g holds rows
    perm[g*G:(g+1)*G] (the last group is shorter when G does not divide R).
    group_size=1 (or R <= group_size) returns the identity, since no reordering
    can change the unions. max_swap_passes=0 gives the plain greedy grouping;
    plateau_rounds bounds the random escapes from local optima (drawn from
    `seed`, so the result is deterministic). The work runs on block_mask's
    device: pass a CUDA mask to cluster large weights faster.
    """
    _check_mask(block_mask, group_size)
    num_rows = block_mask.shape[0]
    if group_size == 1 or num_rows <= group_size:
        return torch.arange(num_rows)
    rows_f = block_mask.to(torch.float32)
    # The CPU work is thousands of small ops: extra intra-op threads only add
    # synchronization (20x slower on a busy 2-core machine), so use one.
    threads = torch.get_num_threads()
    if rows_f.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        perm = _greedy_groups(rows_f, group_size)
        if max_swap_passes > 0:
            generator = torch.Generator().manual_seed(seed)
            perm = _swap_refine(rows_f, perm, group_size, max_swap_passes, plateau_rounds, generator)
    finally:
        torch.set_num_threads(threads)
    return perm.cpu()


# ---------------------------------------------------------------------------------------
# Groups that share block columns, chosen on scores (grouped masks, DESIGN.md section 6)
# ---------------------------------------------------------------------------------------
def group_of(perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """The row group of each block row, for groups perm[g*G:(g+1)*G]."""
    group = torch.empty_like(perm)
    group[perm] = torch.arange(perm.numel(), device=perm.device) // group_size
    return group


def _column_sets(scores: torch.Tensor, group: torch.Tensor, n_groups: int, union_blocks: int,
                 keep_per_row: int) -> torch.Tensor:
    """Bool [groups, C]: each group's `union_blocks` columns.

    Fully shared (union_blocks == keep_per_row): the columns of the largest summed
    score, which is exact (every row keeps the whole set). Wider sets: start there,
    then repeatedly take the columns the rows' own top-`keep_per_row` choices inside
    the set value most (a fixed point in a few rounds).
    """
    totals = torch.zeros(n_groups, scores.shape[1], dtype=scores.dtype).index_add_(0, group, scores)
    sets = torch.zeros_like(totals, dtype=torch.bool).scatter_(1, totals.topk(union_blocks, dim=1).indices, True)
    if union_blocks == keep_per_row:
        return sets
    for _ in range(4):
        inside = scores.masked_fill(~sets[group], -1.0)
        chosen = torch.zeros_like(inside).scatter_(1, inside.topk(keep_per_row, dim=1).indices, 1.0) * scores
        used = torch.zeros_like(totals).index_add_(0, group, chosen)
        # What the rows use first; the summed score breaks ties among unused columns.
        new = torch.zeros_like(sets).scatter_(1, (used + 1e-6 * totals).topk(union_blocks, dim=1).indices, True)
        if torch.equal(new, sets):
            break
        sets = new
    return sets


def _affinity(scores: torch.Tensor, sets: torch.Tensor, keep_per_row: int) -> torch.Tensor:
    """[R, groups]: the score row r would keep inside group g's columns (its best keep_per_row)."""
    if int(sets[0].sum()) == keep_per_row:  # fully shared: the row keeps the whole set
        return scores @ sets.to(scores.dtype).T
    inside = scores[:, None, :].masked_fill(~sets[None], 0.0)
    return inside.topk(keep_per_row, dim=2).values.sum(dim=2)


def shared_column_groups(scores: torch.Tensor, group_size: int, keep_per_row: int, union_blocks: int,
                         max_passes: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Block rows in groups of `group_size` that share `union_blocks` block columns.

    scores: [R, C] tile importances (any non-negative score). Rows are compared on
    their scores normalised to sum 1, so a row's share of its own importance counts,
    not its scale. Maximises the kept normalised score, sum over rows of the row's
    best `keep_per_row` tiles inside its group's column set: starting from
    `cluster_block_rows` on the rows' free top-`keep_per_row` masks, alternate a
    local search over row swaps between groups (all swap gains at once, with the
    groups' sets fixed) with re-choosing each group's set, while the objective rises.

    Returns (perm, sets): group g holds block rows perm[g*G:(g+1)*G] and may use the
    block columns where sets[g] is True. Deterministic.
    """
    rows, cols = scores.shape
    if not 1 <= keep_per_row <= union_blocks <= cols:
        raise ValueError(f"need 1 <= keep_per_row ({keep_per_row}) <= union_blocks ({union_blocks}) "
                         f"<= block columns ({cols})")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    s = scores.detach().double().cpu().clamp_min(0)
    s = s / s.sum(dim=1, keepdim=True).clamp_min(1e-30)
    free = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(keep_per_row, dim=1).indices, True)
    perm = cluster_block_rows(free, group_size)
    n_groups = -(-rows // group_size)

    def evaluate(perm):
        group = group_of(perm, group_size)
        sets = _column_sets(s, group, n_groups, union_blocks, keep_per_row)
        kept = _affinity(s, sets, keep_per_row).gather(1, group[:, None]).sum()
        return float(kept), group, sets

    best, group, sets = evaluate(perm)
    for _ in range(max_passes if group_size > 1 else 0):
        a = _affinity(s, sets, keep_per_row)                     # [R, groups]
        own = a.gather(1, group[:, None])[:, 0]
        gain = a[:, group] + a[:, group].T - own[:, None] - own[None, :]   # swap rows i and j
        gain[group[:, None] == group[None, :]] = 0.0
        best_gain, partner = gain.max(dim=1)
        improving = (best_gain > 1e-12).nonzero().flatten()
        if improving.numel() == 0:
            break
        candidate = perm.clone()
        _apply_swaps(candidate, list(zip(improving[torch.argsort(-best_gain[improving])].tolist(),
                                         partner[improving].tolist())), group)
        value, new_group, new_sets = evaluate(candidate)
        if value <= best + 1e-12:
            break
        best, perm, group, sets = value, candidate, new_group, new_sets
    return perm, sets
