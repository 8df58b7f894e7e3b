"""Least-squares fits of kept weights, and greedy block OBS (the "obc" method).

Notation: W [N, K] (out x in), X [tokens, K] the linear's input, H = X^T X,
one "block row" = b consecutive output rows, which share the kept block columns.
"""

from __future__ import annotations

import math

import torch

DEFAULT_DAMP = 0.01


def damped(gram: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """H + damp * mean(diag H) * I (dead input channels get a unit diagonal)."""
    h = gram.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return h


def reconstruct_block_rows(weight: torch.Tensor, block_mask: torch.Tensor, gram: torch.Tensor,
                           damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Re-solve the kept weights of every block row against the calibration inputs.

    For block row r with kept input columns S: argmin_V ||X W_r^T - X_S V^T||^2,
    i.e. H[S, S] V^T = H[S, :] W_r^T with H damped. All block rows that keep the same
    columns (the b rows of one block row; a grouped mask's whole row group) share one
    Cholesky factor and are solved together. Returns the new W, zero outside the mask.
    """
    n, k = weight.shape
    b = n // block_mask.shape[0]
    h = damped(gram.double(), damp)
    w = weight.detach().double()
    out = torch.zeros_like(w)
    arange_b = torch.arange(b, device=w.device)
    patterns, which = torch.unique(block_mask, dim=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        if not pattern.any():  # a block row that keeps nothing stays zero
            continue
        cols = (torch.nonzero(pattern).flatten()[:, None] * b + arange_b).flatten()         # S: [m]
        rows = (torch.nonzero(which == p).flatten()[:, None] * b + arange_b).flatten()      # [n_p * b]
        h_s = h[cols]                                                                        # [m, K]
        solved = torch.cholesky_solve(h_s @ w[rows].T, torch.linalg.cholesky(h_s[:, cols]))  # [m, n_p * b]
        out[rows[:, None], cols] = solved.T
    return out.to(weight.dtype)


def greedy_obs_mask(weight: torch.Tensor, gram: torch.Tensor, keep_per_row: int, block_size: int,
                    damp: float = DEFAULT_DAMP, rounds: int | None = None,
                    row_groups: torch.Tensor | None = None, union_blocks: int | None = None) -> torch.Tensor:
    """Choose each block row's kept blocks by greedy block OBS (Optimal Brain Compression).

    Starting from the dense block row, repeatedly drop the block whose removal
    raises the output error least *given that the remaining weights are re-solved*:
    error(G) = tr(W_G (Hinv_GG)^-1 W_G^T) with Hinv the inverse Hessian restricted to
    the blocks still kept; then update the kept weights and Hinv (exact downdate).
    rounds=None drops one block per step; rounds=r drops the cheapest blocks in r
    rounds (faster, nearly as good). All block rows run as one batch. Returns the
    bool block mask; the caller re-solves the final weights with
    `reconstruct_block_rows` (which also removes the drift of the downdates).

    row_groups [R] (the row group of each block row) with union_blocks: a grouped
    mask. First whole group-columns are dropped, by the summed cost of their rows'
    blocks (each row's error is independent, so the sum is exact), until every
    group keeps union_blocks columns; then each row drops within its group's set.
    The rounds are shared between the two phases by their number of drops.
    """
    n, k = weight.shape
    b = block_size
    rows, cols = n // b, k // b
    h = damped(gram.float(), damp)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.detach().float().reshape(rows, b, k).clone()      # [R, b, K]
    alive = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    eye = torch.eye(b, device=weight.device)
    arange_b = torch.arange(b, device=weight.device)
    to_drop = cols - keep_per_row
    group_drops = 0 if row_groups is None else cols - union_blocks
    if not 0 <= group_drops <= to_drop:
        raise ValueError(f"union_blocks must be in [keep_per_row, block columns] = [{keep_per_row}, {cols}], "
                         f"got {union_blocks}")
    rounds = to_drop if rounds is None else max(1, min(rounds, to_drop))
    group_rounds = max(1, round(rounds * group_drops / to_drop)) if group_drops else 0
    row_rounds = max(1, rounds - group_rounds) if to_drop > group_drops else 0
    n_groups = 0 if row_groups is None else int(row_groups.max()) + 1
    steps = ([(0, count) for count in _drop_schedule(group_drops, group_rounds)]
             + [(1, count) for count in _drop_schedule(to_drop - group_drops, row_rounds)])
    # Rows that have dropped the same blocks share one inverse Hessian: one per group while
    # whole group-columns are dropped (all of a fully shared mask's drops: G times less
    # downdate work and memory), one per block row after. `owner`: each row's copy (None:
    # its own).
    owner = row_groups.to(weight.device).long() if group_drops else None
    hinv = hinv.expand(n_groups if group_drops else rows, k, k).contiguous()
    for step, (phase, count) in enumerate(steps):
        if phase == 1 and owner is not None:
            hinv, owner = hinv[owner], None
        per_row = (lambda t: t) if owner is None else (lambda t: t[owner])
        copies = hinv.shape[0]
        diag_blocks = torch.diagonal(hinv.view(copies, cols, b, cols, b), dim1=1, dim2=3)  # [H, b, b, C]
        diag_blocks = diag_blocks.permute(0, 3, 1, 2)                                      # [H, C, b, b]
        w_blocks = w.view(rows, b, cols, b).permute(0, 2, 3, 1)                           # [R, C, b_in, b_out]
        if phase == 0:
            # Whole group-columns, by the summed cost of the group's rows, which share Hinv:
            # sum_r tr(w_r^T D^-1 w_r) = tr(D^-1 sum_r w_r w_r^T), one solve per group-column.
            alive_h = alive[torch.zeros(n_groups, dtype=torch.long, device=alive.device).scatter_(
                0, owner, torch.arange(rows, device=alive.device))]  # any member's: they agree
            outer = w.new_zeros(n_groups, cols, b, b).index_add_(
                0, owner, w_blocks @ w_blocks.transpose(2, 3))
            diag_blocks = torch.where(alive_h[:, :, None, None], diag_blocks, eye)
            cost = torch.linalg.solve(diag_blocks, outer).diagonal(dim1=2, dim2=3).sum(-1)
            dropped = cost.masked_fill(~alive_h, math.inf).topk(count, dim=1, largest=False).indices  # [H, count]
        else:
            diag_blocks = torch.where(alive[:, :, None, None], diag_blocks, eye)
            cost = (w_blocks * torch.linalg.solve(diag_blocks, w_blocks)).sum(dim=(2, 3))
            dropped = cost.masked_fill(~alive, math.inf).topk(count, dim=1, largest=False).indices    # [R, count]
        alive.scatter_(1, per_row(dropped), False)
        if step == len(steps) - 1:  # the caller re-solves the kept weights: no downdate left to do
            break
        idx_h = (dropped[:, :, None] * b + arange_b).flatten(1)                           # [H, m]
        m = idx_h.shape[1]
        hinv_cols = hinv.gather(2, idx_h[:, None, :].expand(copies, k, m))                # [H, K, m]
        inv_gg = torch.linalg.inv(hinv_cols.gather(1, idx_h[:, :, None].expand(copies, m, m)))
        idx = per_row(idx_h)                                                              # [R, m]
        w_g = w.gather(2, idx[:, None, :].expand(rows, b, m))                             # [R, b_out, m]
        w -= (w_g @ per_row(inv_gg)) @ per_row(hinv_cols).transpose(1, 2)
        hinv -= hinv_cols @ inv_gg @ hinv_cols.transpose(1, 2)
        w.scatter_(2, idx[:, None, :].expand(rows, b, m), 0.0)
    return alive


def _drop_schedule(drops: int, rounds: int) -> list[int]:
    """Blocks dropped per step: `drops` in min(rounds, drops) nearly equal steps."""
    rounds, counts = min(rounds, drops), []
    for step in range(rounds):
        counts.append(math.ceil((drops - sum(counts)) / (rounds - step)))
    return counts


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||X W^T - X W'^T||^2 / ||X W^T||^2 over the calibration tokens, from H = X^T X."""
    delta = (weight.double() - new_weight.double())
    h = gram.double()
    num = torch.einsum("nk,kl,nl->", delta, h, delta)
    den = torch.einsum("nk,kl,nl->", weight.double(), h, weight.double())
    return float(num / den.clamp_min(1e-30))


def dense_target_weight(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                        damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """The weight whose output on the pruned model's inputs best matches the dense model's output.

    gram = X^T X (pruned model's inputs), cross = X^T X_dense.
    argmin_V ||X_dense W^T - X V^T||^2 = W + H^-1 (X^T X_dense - X^T X) W^T (transposed); pruning
    then fits this weight on H, which equals fitting the dense output up to a constant. Only
    the correction is damped, so where the inputs agree (the first layer) the target is W.
    """
    h = damped(gram, damp)
    correction = torch.cholesky_solve((cross - gram) @ weight.double().T, torch.linalg.cholesky(h))
    return (weight.double() + correction.T).to(weight.dtype)

