"""BlockSparseLinear: the drop-in for nn.Linear."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from blocksparse import BlockSparseLinear
from helpers import masked_dense, random_block_mask


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_with_mask_equals_masked_dense(bias):
    linear = nn.Linear(96, 64, bias=bias)
    mask = random_block_mask(4, 6, 0.5)
    module = BlockSparseLinear.from_linear(linear, block_mask=mask)
    for shape in [(1, 96), (7, 96), (130, 96), (2, 3, 96), (0, 96)]:
        x = torch.randn(shape)
        torch.testing.assert_close(module(x), F.linear(x, masked_dense(linear, mask), linear.bias))


def test_values_are_frozen_and_only_bias_trains():
    module = BlockSparseLinear.from_linear(nn.Linear(32, 32), sparsity=0.5)
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["bias"]
    before = module.sparse_weight.values.clone()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    module(torch.randn(5, 32)).square().sum().backward()
    opt.step()
    assert torch.equal(module.sparse_weight.values, before) and module.sparse_weight.values.grad is None


def test_trained_values_keep_the_structure_and_load_in_place():
    # The values are a (frozen) Parameter: trained, they move; the structure never does, and
    # loading a state dict keeps the same Parameter object (an optimizer holding it stays valid).
    module = BlockSparseLinear.from_linear(nn.Linear(64, 48), sparsity=0.5)
    values = module.sparse_weight.values.requires_grad_(True)
    mask, state = module.block_mask.clone(), {k: v.clone() for k, v in module.state_dict().items()}
    opt = torch.optim.SGD([values], lr=0.1)
    module(torch.randn(5, 64)).square().sum().backward()
    opt.step()
    assert not torch.equal(values, state["sparse_weight.values"]) and torch.equal(module.block_mask, mask)
    module.load_state_dict(state)
    assert module.sparse_weight.values is values and values.requires_grad
    assert torch.equal(values, state["sparse_weight.values"])


def test_introspection_and_repr():
    module = BlockSparseLinear.from_linear(nn.Linear(64, 32), sparsity=0.5)
    assert (module.in_features, module.out_features, module.block_size) == (64, 32, 16)
    assert module.density == 0.5 and module.block_mask.shape == (2, 4)
    assert module.weight.shape == (4, 16, 16)
    assert "block_size=16, density=0.500" in repr(module)


def test_safetensors_round_trip_and_to(tmp_path):
    module = BlockSparseLinear.from_linear(nn.Linear(64, 48), sparsity=0.5)
    save_file(module.state_dict(), tmp_path / "m.safetensors")
    fresh = BlockSparseLinear(64, 48)  # density 0 until loaded
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), module(x))
    half = fresh.to(torch.bfloat16)
    assert half.sparse_weight.values.dtype == torch.bfloat16 and half.bias.dtype == torch.bfloat16
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_malformed_checkpoint_is_rejected():
    module = BlockSparseLinear.from_linear(nn.Linear(64, 32), sparsity=0.5)
    sd = module.state_dict()
    bad_col = dict(sd, **{"sparse_weight.col": sd["sparse_weight.col"] + 10})
    with pytest.raises(RuntimeError, match="malformed block-sparse checkpoint.*out of range"):
        BlockSparseLinear(64, 32).load_state_dict(bad_col)
    bad_values = dict(sd, **{"sparse_weight.values": torch.randn(4, 8, 8)})
    with pytest.raises(RuntimeError, match="expected \\[nnz, 16, 16\\] blocks"):
        BlockSparseLinear(64, 32).load_state_dict(bad_values)


def test_bad_construction():
    with pytest.raises(ValueError, match="not divisible by block_size=16"):
        BlockSparseLinear.from_linear(nn.Linear(40, 32), sparsity=0.5)
    with pytest.raises(ValueError, match="block_mask shape"):
        BlockSparseLinear.from_linear(nn.Linear(64, 32), block_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="either block_mask or sparsity"):
        BlockSparseLinear.from_linear(nn.Linear(64, 32), block_mask=torch.ones(2, 4, dtype=torch.bool),
                                      sparsity=0.5)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        BlockSparseLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="in_features=64"):
        BlockSparseLinear.from_linear(nn.Linear(64, 32))(torch.randn(2, 32))


@pytest.mark.parametrize("block_size", [0, -16, 7, 48])
def test_from_linear_names_a_bad_block_size(block_size):
    with pytest.raises(ValueError, match=rf"block_size must be one of \(8, 16, 32, 64\), got {block_size}"):
        BlockSparseLinear.from_linear(nn.Linear(96, 96), sparsity=0.5, block_size=block_size)


def test_from_linear_checks_a_given_block_size_against_the_mask():
    linear = nn.Linear(64, 64)
    mask32 = torch.ones(2, 2, dtype=torch.bool)
    assert BlockSparseLinear.from_linear(linear, block_mask=mask32).block_size == 32  # read from the mask
    assert BlockSparseLinear.from_linear(linear, block_mask=mask32, block_size=32).block_size == 32
    with pytest.raises(ValueError, match=r"block_mask shape \(2, 2\) does not fit .* \(got block_size=16\)"):
        BlockSparseLinear.from_linear(linear, block_mask=mask32, block_size=16)


def test_malformed_structure_is_one_error_not_a_cascade():
    # The child BlockSparseWeight must not go on loading the keys its parent refused.
    sd = BlockSparseLinear.from_linear(nn.Linear(64, 32), sparsity=0.5).state_dict()
    for bad in (dict(sd, **{"sparse_weight.col": sd["sparse_weight.col"] + 10}),
                dict(sd, **{"sparse_weight.values": torch.randn(4, 8, 8)})):
        with pytest.raises(RuntimeError) as error:
            BlockSparseLinear(64, 32).load_state_dict(bad)
        header, *problems = str(error.value).strip().splitlines()
        assert header.startswith("Error(s) in loading state_dict") and len(problems) == 1, problems
        assert "size mismatch" not in str(error.value)


def test_a_state_dict_load_rebuilds_the_structure_copies_it_and_reads_old_checkpoints():
    linear = nn.Linear(48, 64)
    mask = random_block_mask(4, 3, 0.6, generator=torch.Generator().manual_seed(2))
    grouped = BlockSparseLinear.from_linear(linear, block_mask=mask, row_perm=torch.tensor([2, 0, 3, 1]),
                                            row_group=2)
    target = BlockSparseLinear.from_linear(linear, block_mask=mask)  # same shapes, other order
    target.load_state_dict(grouped.state_dict())
    x = torch.randn(5, 48)
    assert target.sparse_weight.row_group == 2 and torch.equal(target.sparse_weight.row, grouped.sparse_weight.row)
    torch.testing.assert_close(target(x), grouped(x))
    assert target.sparse_weight.values.data_ptr() != grouped.sparse_weight.values.data_ptr()  # a copy
    plain = BlockSparseLinear.from_linear(linear, block_mask=mask)
    old = {k: v for k, v in plain.state_dict().items() if not k.endswith(("row_perm", "row_group"))}
    fresh = BlockSparseLinear(48, 64)
    fresh.load_state_dict(old)  # strict: a checkpoint from before row groupings loads ungrouped
    torch.testing.assert_close(fresh(x), grouped(x))
    assert fresh.sparse_weight.row_group == 1


def test_a_malformed_grouping_in_a_state_dict_is_one_error_and_changes_nothing():
    module = BlockSparseLinear.from_linear(nn.Linear(48, 64), sparsity=0.5)
    before = module.sparse_weight.to_dense().clone()
    for key, value, message in (("sparse_weight.row_group", torch.tensor([2, 2]), "row_group: expected an integer"),
                                ("sparse_weight.row_group", torch.tensor(0), "row_group must be an int >= 1"),
                                ("sparse_weight.row_perm", torch.tensor([0, 1, 1, 3]), "not a permutation")):
        state = dict(module.state_dict(), **{key: value})
        with pytest.raises(RuntimeError) as err:
            module.load_state_dict(state)
        assert message in str(err.value) and str(err.value).count("malformed") == 1
        assert module.sparse_weight.row_group == 1 and torch.equal(module.sparse_weight.to_dense(), before)
