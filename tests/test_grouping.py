"""Block-row clustering for the grouped kernel: union densities and permutations."""

import pytest
import torch

from blocksparse.grouping import cluster_block_rows, group_union_sizes, shared_column_groups, union_density


def planted_mask(prototypes: int, copies: int, cols: int, keep: int, seed: int = 0) -> torch.Tensor:
    """`prototypes` random column sets, each repeated `copies` times, rows shuffled."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.zeros(prototypes, cols, dtype=torch.bool)
    for p in range(prototypes):
        protos[p, torch.randperm(cols, generator=gen)[:keep]] = True
    rows = protos.repeat_interleave(copies, dim=0)
    return rows[torch.randperm(rows.shape[0], generator=gen)]


def wanda_like_mask(rows: int, cols: int, keep: int, seed: int = 0) -> torch.Tensor:
    """Shared per-column importance plus per-row noise, top `keep` per row (like Wanda's ||X_j||)."""
    gen = torch.Generator().manual_seed(seed)
    score = 2 * torch.rand(cols, generator=gen)[None, :] + torch.randn(rows, cols, generator=gen)
    return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True)


def test_union_density_by_hand():
    mask = torch.tensor([[1, 0, 0, 0],
                         [0, 1, 0, 0],
                         [1, 0, 0, 0],
                         [1, 1, 1, 0],
                         [0, 0, 0, 1]], dtype=torch.bool)
    assert group_union_sizes(mask, 1).tolist() == [1, 1, 1, 3, 1]
    assert group_union_sizes(mask, 2).tolist() == [2, 3, 1]     # last group is the lone row 4
    assert union_density(mask, 2) == pytest.approx((2 + 3 + 1) / 3 / 4)
    assert group_union_sizes(mask, 4).tolist() == [3, 1]
    perm = torch.tensor([0, 2, 1, 3, 4])
    assert group_union_sizes(mask, 2, perm).tolist() == [1, 3, 1]
    assert union_density(mask, 8) == pytest.approx(4 / 4)


def test_group_size_one_is_density_and_identity():
    mask = wanda_like_mask(40, 24, 12)
    assert union_density(mask, 1) == pytest.approx(0.5)
    assert torch.equal(cluster_block_rows(mask, 1), torch.arange(40))
    assert torch.equal(cluster_block_rows(mask[:3], 4), torch.arange(3))


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_planted_groups_are_recovered(group_size):
    # Rows come in identical copies of group_size: the optimum union is one row's columns.
    mask = planted_mask(prototypes=12, copies=group_size, cols=32, keep=8, seed=group_size)
    perm = cluster_block_rows(mask, group_size)
    assert sorted(perm.tolist()) == list(range(mask.shape[0]))
    assert union_density(mask, group_size, perm) == pytest.approx(8 / 32)
    assert union_density(mask, group_size) > 8 / 32 + 0.1     # shuffled natural order is far worse


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_clustering_beats_natural_and_greedy(group_size):
    mask = wanda_like_mask(203, 48, 24, seed=group_size)     # 203: last group is partial
    perm = cluster_block_rows(mask, group_size)
    greedy = cluster_block_rows(mask, group_size, max_swap_passes=0)
    natural, clustered = union_density(mask, group_size), union_density(mask, group_size, perm)
    assert sorted(perm.tolist()) == list(range(203))
    assert union_density(mask, group_size, greedy) >= clustered
    assert clustered < natural - 0.03
    assert torch.equal(perm, cluster_block_rows(mask, group_size))      # deterministic


def test_permuting_rows_does_not_change_clustered_quality_much():
    mask = wanda_like_mask(96, 36, 18, seed=3)
    shuffled = mask[torch.randperm(96, generator=torch.Generator().manual_seed(1))]
    a = union_density(mask, 4, cluster_block_rows(mask, 4))
    b = union_density(shuffled, 4, cluster_block_rows(shuffled, 4))
    assert abs(a - b) < 0.02


def test_bad_input_errors():
    mask = wanda_like_mask(8, 8, 4)
    with pytest.raises(ValueError, match="torch.bool"):
        cluster_block_rows(mask.float(), 2)
    with pytest.raises(ValueError, match="2-D"):
        union_density(mask[0], 2)
    with pytest.raises(ValueError, match="group_size"):
        cluster_block_rows(mask, 0)
    with pytest.raises(ValueError, match="permutation of range\\(8\\)"):
        union_density(mask, 2, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="8 block rows"):
        union_density(mask, 2, torch.arange(7))


def planted_scores(groups: int, group_size: int, cols: int, keep: int, seed: int = 0):
    """Rows in hidden groups, each group's rows scoring high on the group's own `keep` columns."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(groups * group_size, cols, generator=gen) * 0.1
    truth = torch.randperm(groups * group_size, generator=gen)
    for g in range(groups):
        columns = torch.randperm(cols, generator=gen)[:keep]
        rows = truth[g * group_size:(g + 1) * group_size]
        scores[rows[:, None], columns[None, :]] += 1.0 + torch.rand(group_size, keep, generator=gen)
    return scores, truth


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_shared_column_groups_recover_planted_groups(group_size):
    scores, truth = planted_scores(6, group_size, 24, 8, seed=group_size)
    perm, sets = shared_column_groups(scores, group_size, keep_per_row=8, union_blocks=8)
    assert sorted(perm.tolist()) == list(range(6 * group_size)) and sets.sum(1).tolist() == [8] * 6
    found = {frozenset(perm[g * group_size:(g + 1) * group_size].tolist()) for g in range(6)}
    assert found == {frozenset(truth[g * group_size:(g + 1) * group_size].tolist()) for g in range(6)}


def test_wider_sets_keep_more_and_respect_the_budget():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(32, 20, generator=gen) * torch.rand(20, generator=gen) ** 2
    kept = {}
    for union in (6, 9, 20):
        perm, sets = shared_column_groups(scores, 4, keep_per_row=6, union_blocks=union)
        assert sets.sum(1).tolist() == [union] * 8
        group = torch.empty_like(perm)
        group[perm] = torch.arange(32) // 4
        inside = scores.masked_fill(~sets[group], -1.0)
        kept[union] = float(inside.topk(6, dim=1).values.sum())
    free = float(scores.topk(6, dim=1).values.sum())
    assert kept[6] < kept[9] <= kept[20] == pytest.approx(free)


def test_shared_column_groups_validate():
    with pytest.raises(ValueError, match=r"need 1 <= keep_per_row \(5\) <= union_blocks \(4\)"):
        shared_column_groups(torch.rand(8, 6), 2, keep_per_row=5, union_blocks=4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        shared_column_groups(torch.rand(8, 6), 0, keep_per_row=2, union_blocks=2)
