"""Tile scores, comparison groups and the magnitude mask (blocksparse.masks)."""

import pytest
import torch

from blocksparse.masks import SCORES, block_scores, blocks_per_row, magnitude_block_mask, select_block_mask


def test_block_scores_match_their_definitions():
    torch.manual_seed(0)
    w, sq = torch.randn(16, 32), torch.rand(32)
    wanda = block_scores(w, sq, 8, "wanda")
    assert wanda.shape == (2, 4)
    assert torch.allclose(wanda[1, 2], (w[8:16, 16:24].abs() * sq[16:24].sqrt()).sum())
    obs = block_scores(w, sq, 8, "obs")
    assert torch.allclose(obs[0, 3], (w[0:8, 24:32].square() * sq[24:32]).sum())
    assert torch.allclose(block_scores(w, None, 8, "magnitude")[1, 0], w[8:16, 0:8].abs().sum())


def test_select_block_mask_rows_and_global():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    row = select_block_mask(scores, 2, "block-row")
    assert row.tolist() == [[True, True, False, False], [False, False, True, True]]
    glob = select_block_mask(scores, 2, "global")
    assert glob.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_magnitude_mask_keeps_the_same_count_per_block_row():
    weight = torch.randn(64, 128)
    mask = magnitude_block_mask(weight, 0.75)
    assert mask.sum(1).tolist() == [2, 2, 2, 2]
    scores = weight.abs().reshape(4, 16, 8, 16).sum((1, 3))
    kept_min = scores.masked_fill(~mask, float("inf")).min(1).values
    dropped_max = scores.masked_fill(mask, -float("inf")).max(1).values
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_block_mask(weight, 1.0)



@pytest.mark.parametrize("block_size", [0, -16, 7, 48])
def test_magnitude_mask_names_a_bad_block_size(block_size):
    with pytest.raises(ValueError, match=rf"block_size must be one of \(8, 16, 32, 64\), got {block_size}"):
        magnitude_block_mask(torch.randn(96, 96), 0.5, block_size)


def test_a_new_score_is_one_registry_entry(monkeypatch):
    from blocksparse.masks import Score

    monkeypatch.setitem(SCORES, "square", Score(lambda w, sq: w.square(), False, "sum of W^2"))
    w = torch.randn(16, 16)
    assert torch.allclose(block_scores(w, None, 8, "square")[0, 1], w[0:8, 8:16].square().sum())
    with pytest.raises(ValueError, match="score must be one of"):
        block_scores(w, None, 8, "nope")


def test_blocks_per_row_rounds_down_and_keeps_at_least_one():
    assert [blocks_per_row(36, d) for d in (0.5, 0.4, 0.01, 1.0)] == [18, 14, 1, 36]


def test_grouped_mask_keeps_each_rows_count_inside_its_groups_budget():
    from blocksparse.grouping import group_union_sizes
    from blocksparse.masks import grouped_block_mask, union_blocks_for

    scores = torch.rand(12, 10) * torch.rand(10)
    for union_density, union in ((None, 4), (0.6, 6)):
        assert union_blocks_for(10, 4, union_density) == union
        mask, perm = grouped_block_mask(scores, 4, 3, union)
        assert mask.sum(1).tolist() == [4] * 12
        assert group_union_sizes(mask, 3, perm).max() <= union
    with pytest.raises(ValueError, match=r"union_density must be in \(0, 1\]"):
        union_blocks_for(10, 4, 0.0)
    assert union_blocks_for(10, 4, 0.2) == 4  # never below the row's own blocks
