"""Least-squares reconstruction and greedy block OBS on small matrices."""

import itertools

import torch

from blocksparse.masks import block_scores, select_block_mask
from blocksparse.prune.reconstruct import (dense_target_weight, greedy_obs_mask, output_error,
                                           reconstruct_block_rows)


# ----------------------------------------------------------------- reconstruction
def _problem(n=16, k=32, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ torch.randn(k, k, generator=g)  # correlated inputs
    w = torch.randn(n, k, generator=g)
    return w, x, (x.T @ x).double()


def test_reconstruction_is_the_least_squares_solution_and_lowers_the_error():
    w, x, gram = _problem()
    mask = select_block_mask(block_scores(w, gram.diagonal(), 8, "wanda"), 2)
    masked = w * mask.repeat_interleave(8, 0).repeat_interleave(8, 1)
    solved = reconstruct_block_rows(w, mask, gram, damp=1e-8)
    assert output_error(w, solved, gram) < 0.6 * output_error(w, masked, gram)
    for r in range(2):  # each block row: lstsq on the kept columns
        cols = torch.nonzero(mask[r]).flatten()
        idx = (cols[:, None] * 8 + torch.arange(8)).flatten()
        ref = torch.linalg.lstsq(x[:, idx].double(), (x @ w[8 * r:8 * r + 8].T).double()).solution.T
        torch.testing.assert_close(solved[8 * r:8 * r + 8, idx].double(), ref, rtol=1e-4, atol=1e-4)
        outside = torch.ones(32, dtype=torch.bool)
        outside[idx] = False
        assert torch.count_nonzero(solved[8 * r:8 * r + 8, outside]) == 0


def test_greedy_obs_first_step_is_the_best_single_block_to_drop():
    w, _, gram = _problem(n=8, k=40)
    mask = greedy_obs_mask(w, gram, keep_per_row=4, block_size=8, damp=1e-6)
    errors = []
    for drop in range(5):
        candidate = torch.ones(1, 5, dtype=torch.bool)
        candidate[0, drop] = False
        errors.append(output_error(w, reconstruct_block_rows(w, candidate, gram, damp=1e-6), gram))
    assert mask[0].tolist() == [i != min(range(5), key=errors.__getitem__) for i in range(5)]


def test_greedy_obs_beats_wanda_scores_after_reconstruction():
    w, _, gram = _problem(n=16, k=64, seed=3)
    greedy = greedy_obs_mask(w, gram, 4, 8)
    wanda = select_block_mask(block_scores(w, gram.diagonal(), 8, "wanda"), 4)
    err = {name: output_error(w, reconstruct_block_rows(w, m, gram), gram)
           for name, m in (("greedy", greedy), ("wanda", wanda))}
    assert err["greedy"] < err["wanda"]
    best = min(output_error(w, reconstruct_block_rows(w, torch.tensor([list(c)] * 2), gram), gram)
               for c in itertools.product([True, False], repeat=8) if sum(c) == 4)
    assert err["greedy"] >= best  # sanity: no mask can beat the exhaustive optimum


def test_greedy_obs_groups_of_one_row_drop_what_free_rows_drop():
    # Groups of one row share their inverse Hessian with nobody: the group-column phase
    # (one Hessian per group) must choose exactly what the per-row phase chooses.
    w, _, gram = _problem(n=48, k=64, seed=5)
    free = greedy_obs_mask(w, gram, keep_per_row=3, block_size=8, rounds=3)
    single = greedy_obs_mask(w, gram, 3, 8, rounds=3, row_groups=torch.arange(6), union_blocks=3)
    assert torch.equal(single, free)


def test_greedy_obs_groups_are_solved_independently():
    # Each group's choice depends on its own rows only, also across the switch from one
    # Hessian per group (group-columns) to one per row (union 5 of 8, each row keeps 3).
    w, _, gram = _problem(n=64, k=64, seed=6)
    groups = torch.tensor([1, 0, 2, 1, 3, 0, 2, 3])
    mask = greedy_obs_mask(w, gram, 3, 8, rounds=4, row_groups=groups, union_blocks=5)
    assert mask.sum(1).tolist() == [3] * 8
    for g in range(4):
        rows = torch.nonzero(groups == g).flatten()
        element_rows = (rows[:, None] * 8 + torch.arange(8)).flatten()
        alone = greedy_obs_mask(w[element_rows], gram, 3, 8, rounds=4, row_groups=torch.zeros(2, dtype=torch.long),
                                union_blocks=5)
        assert torch.equal(mask[rows], alone), g
        assert int(mask[rows].any(0).sum()) <= 5


def test_dense_target_is_the_weight_itself_when_inputs_agree():
    w, x, gram = _problem()
    assert torch.equal(dense_target_weight(w, gram, gram.clone(), 0.01), w)
