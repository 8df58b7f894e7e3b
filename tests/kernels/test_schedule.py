"""Host-side schedules of the grouped kernel (no Triton needed)."""

import torch

from blocksparse import BlockSparseWeight
from blocksparse.kernels.schedule import build_schedule, get_schedule


def test_schedule_lists_group_unions_and_true_rows():
    # 4 block rows over 3 block columns; rows 0 and 2 share columns {0, 2}.
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    weight = BlockSparseWeight.from_dense(torch.randn(64, 48), mask)
    block = torch.arange(weight.nnz_blocks)
    natural = build_schedule(weight.crow, weight.col, block, 3, 2)
    assert natural.group_ptr.tolist() == [0, 3, 6]  # rows {0,1} and {2,3} both cover all columns
    perm = torch.tensor([0, 2, 1, 3])
    clustered = build_schedule(weight.crow, weight.col, block, 3, 2, perm)
    assert clustered.group_rows.tolist() == [[0, 2], [1, 3]]
    assert clustered.group_ptr.tolist() == [0, 2, 4]
    assert clustered.union_col[:4].tolist() == [0, 2, 1, 2]
    # Union entry (group 0, col 0): row 0 holds block 0, row 2 holds block 3.
    assert clustered.union_block[0].tolist() == [0, 3]
    assert clustered.union_block[3].tolist() == [-1, 6]  # (group 1, col 2): only row 3


def test_schedule_is_cached_on_the_weight_and_not_saved():
    weight = BlockSparseWeight.from_dense(torch.randn(64, 64), torch.rand(4, 4) < 0.5)
    first = get_schedule(weight, 2, transposed=True)
    assert get_schedule(weight, 2, transposed=True).union_col is first.union_col
    assert set(weight.state_dict()) == {"crow", "col", "values", "row_perm", "row_group"}  # no tables
    moved = weight.to(torch.float64)
    assert moved.values.dtype == torch.float64
    again = get_schedule(moved, 2, transposed=True)
    assert again.group_ptr.dtype == torch.int32 and torch.equal(again.union_col, first.union_col)


def test_groups_launch_largest_union_first_with_a_partial_group_last():
    # 7 block rows (the last group of G=2 is partial) with unions of very different sizes.
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 12, generator=gen) < torch.linspace(0.1, 0.9, 7)[:, None]
    mask[:, 0] = True
    weight = BlockSparseWeight.from_dense(torch.randn(112, 192), mask)
    for transposed in (False, True):
        schedule = get_schedule(weight, 2, transposed=transposed)
        sizes = (schedule.group_ptr[1:] - schedule.group_ptr[:-1]).tolist()
        full = [s for s, rows in zip(sizes, schedule.group_rows.tolist()) if -1 not in rows]
        assert full == sorted(full, reverse=True) and len(full) >= 3, sizes
        if not transposed:
            assert -1 in schedule.group_rows[-1].tolist()          # the partial group stays last
        rows = mask.shape[1 if transposed else 0]
        assert sorted(r for r in schedule.group_rows.flatten().tolist() if r >= 0) == list(range(rows))
