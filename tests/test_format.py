import pytest
import torch
from safetensors.torch import load_file, save_file

from blocksparse import BlockSparseWeight
from helpers import random_block_mask


@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
def test_dense_round_trip(block_size):
    n, k = 2 * 64, 3 * 64
    weight = torch.randn(n, k)
    mask = random_block_mask(n // block_size, k // block_size, 0.5)
    w = BlockSparseWeight.from_dense(weight, mask)
    assert w.block_size == block_size and w.shape == (n, k)
    assert torch.equal(w.block_mask, mask)
    assert w.density == pytest.approx(mask.float().mean().item())
    dense_mask = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    assert torch.equal(w.to_dense(), weight * dense_mask)


def test_blocks_sorted_and_values_are_tiles():
    weight = torch.arange(32 * 48, dtype=torch.float32).reshape(32, 48)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    w = BlockSparseWeight.from_dense(weight, mask)
    assert w.crow.tolist() == [0, 2, 3] and w.col.tolist() == [1, 2, 0]
    # tiles are stored transposed: values[i][c, j] = W[row*16 + j, col*16 + c]
    assert torch.equal(w.values[0], weight[0:16, 16:32].t())
    assert torch.equal(w.values[2], weight[16:32, 0:16].t())
    assert w.crow.dtype == w.col.dtype == torch.int32


def test_transposed_metadata_is_a_permutation_of_the_same_blocks():
    mask = random_block_mask(6, 5, 0.5, generator=torch.Generator().manual_seed(3))
    w = BlockSparseWeight.from_dense(torch.randn(96, 80), mask)
    t_index, t_row, t_crow = w.t_index.long(), w.t_row.long(), w.t_crow.long()
    assert sorted(t_index.tolist()) == list(range(w.nnz_blocks))
    for c in range(5):
        entries = range(t_crow[c], t_crow[c + 1])
        rows = [t_row[i].item() for i in entries]
        assert rows == sorted(rows) == torch.nonzero(mask[:, c]).flatten().tolist()
        for i in entries:  # each transposed entry points at the block (t_row, c)
            assert w.col[t_index[i]].item() == c and w.row[t_index[i]].item() == t_row[i].item()


def test_no_mask_keeps_nonzero_blocks():
    weight = torch.zeros(32, 32)
    weight[20, 3] = 1.0
    w = BlockSparseWeight.from_dense(weight)
    assert w.block_mask.tolist() == [[False, False], [True, False]]


def test_state_dict_safetensors_round_trip(tmp_path):
    w = BlockSparseWeight.from_dense(torch.randn(64, 32), random_block_mask(4, 2, 0.5))
    save_file(w.state_dict(), tmp_path / "w.safetensors")
    sd = load_file(tmp_path / "w.safetensors")
    assert set(sd) == {"crow", "col", "values", "row_perm", "row_group"}
    w2 = BlockSparseWeight.from_bsr(sd["crow"], sd["col"], sd["values"], w.shape)
    assert torch.equal(w2.to_dense(), w.to_dense())


def test_to_dtype_keeps_indices():
    w = BlockSparseWeight.from_dense(torch.randn(32, 32), torch.ones(2, 2, dtype=torch.bool))
    w = w.to(torch.bfloat16)
    assert w.values.dtype == torch.bfloat16 and w.col.dtype == torch.int32 and w.t_index.dtype == torch.int32


@pytest.mark.parametrize(
    "crow, col, message",
    [
        ([0, 1, 2], [0, 5], "out of range"),
        ([0, 2, 2], [1, 0], "strictly increasing"),
        ([0, 2, 2], [1, 1], "strictly increasing"),
        ([0, 2, 1], [0, 1], "non-decreasing"),
        ([1, 1, 2], [0, 1], r"crow\[0\] must be 0"),
        ([0, 1], [0, 1], "N/b \\+ 1"),
        ([0, 1, 3], [0, 1], "must all equal"),
        ([0, 1, 2], [0, -1], "out of range"),
    ],
)
def test_malformed_index_data_is_rejected(crow, col, message):
    values = torch.randn(len(col), 16, 16)
    with pytest.raises(ValueError, match=message):
        BlockSparseWeight.from_bsr(torch.tensor(crow, dtype=torch.int32),
                                   torch.tensor(col, dtype=torch.int32), values, (32, 32))


def test_bad_shapes_and_block_sizes():
    with pytest.raises(ValueError, match="not divisible by block_size=16"):
        BlockSparseWeight.from_dense(torch.randn(40, 32), block_size=16)
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlockSparseWeight.from_dense(torch.randn(48, 48), block_size=12)
    with pytest.raises(ValueError, match="block_mask shape"):
        BlockSparseWeight.from_dense(torch.randn(64, 64), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D bool"):
        BlockSparseWeight.from_dense(torch.randn(64, 64), torch.ones(4, 4))
    with pytest.raises(ValueError, match="values must be"):
        BlockSparseWeight.from_bsr(torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                   torch.randn(0, 16, 8), (32, 32))


def grouped_weight(perm=(2, 0, 3, 1), row_group=2):
    dense = torch.randn(64, 48)
    mask = random_block_mask(4, 3, 0.6, generator=torch.Generator().manual_seed(4))
    return dense, mask, BlockSparseWeight.from_dense(dense, mask, row_perm=torch.tensor(perm), row_group=row_group)


def test_a_row_grouping_is_a_layout_the_numbers_do_not_see():
    dense, mask, w = grouped_weight()
    plain = BlockSparseWeight.from_dense(dense, mask)
    assert torch.equal(w.block_mask, mask) and torch.equal(w.to_dense(), plain.to_dense())
    assert w.row_group == 2 and w.row_perm.tolist() == [2, 0, 3, 1]
    # Storage lists the rows in group order: block row 2's tiles come first.
    first = int(w.crow[1])
    assert torch.equal(w.values[:first], plain.values[int(plain.crow[2]):int(plain.crow[3])])
    assert torch.equal(w.blocks_of(dense), w.values)
    assert sorted(w.t_index.tolist()) == list(range(w.nnz_blocks))
    # The transposed structure names true rows: it rebuilds the true mask.
    t_cols = torch.repeat_interleave(torch.arange(3), torch.diff(w.t_crow.long()))
    rebuilt = torch.zeros(3, 4, dtype=torch.bool)
    rebuilt[t_cols, w.t_row.long()] = True
    assert torch.equal(rebuilt, mask.t())


def test_a_row_grouping_round_trips_through_safetensors(tmp_path):
    dense, mask, w = grouped_weight()
    save_file(w.state_dict(), tmp_path / "w.safetensors")
    sd = load_file(tmp_path / "w.safetensors")
    assert sd["row_group"].item() == 2
    w2 = BlockSparseWeight.from_bsr(sd["crow"], sd["col"], sd["values"], w.shape,
                                    row_perm=sd["row_perm"], row_group=int(sd["row_group"]))
    assert torch.equal(w2.to_dense(), w.to_dense()) and w2.row_group == 2
    assert "row_group=2" in repr(w2)


@pytest.mark.parametrize("perm, row_group, message", [
    ([0, 1, 1, 3], 2, r"row_perm is not a permutation of range\(4\): row_perm\[1\]=1"),
    ([0, 1, 2, 4], 2, r"row_perm\[3\]=4 is out of range"),
    ([0, 1, 2], 2, "row_perm must list all N/b = 4 block rows, got 3"),
    ([0, 1, 2, 3], 0, "row_group must be an int >= 1, got 0"),
])
def test_a_malformed_row_grouping_is_refused(perm, row_group, message):
    dense, mask, w = grouped_weight()
    with pytest.raises(ValueError, match=message):
        BlockSparseWeight.from_bsr(w.crow, w.col, w.values, w.shape, row_perm=torch.tensor(perm),
                                   row_group=row_group)


def test_a_layout_is_built_once_and_rebuilt_where_the_weight_moves():
    _, _, w = grouped_weight()
    builds = []

    def build(weight):
        builds.append(weight.values.dtype)
        return {"rows": weight.crow.clone(), "dtype": weight.values.dtype}

    first = w.layout("test", build)
    assert w.layout("test", build) is first and builds == [torch.float32]
    w.to(torch.float32)  # a no-op move keeps them
    assert w.layout("test", build) is first
    w.to(torch.float64)  # a real move empties them: they are rebuilt where the weight now lives
    assert w.layout("test", build)["dtype"] == torch.float64 and builds == [torch.float32, torch.float64]
    # A loaded structure is a new weight: nothing derived from the old one survives.
    _, _, other = grouped_weight(perm=(0, 1, 2, 3), row_group=1)
    w.load_state_dict(other.to(torch.float64).state_dict())
    assert torch.equal(w.layout("test", build)["rows"], other.crow) and len(builds) == 3
