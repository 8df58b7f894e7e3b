import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from blocksparse import BlockSparseLinear
from blocksparse.integration import densify_model, sparsify_model
from blocksparse.nn import magnitude_block_mask
from conftest import make_tiny_llama
from reference import random_block_mask


def masked_dense(linear, mask, b=16):
    return linear.weight.detach() * mask.repeat_interleave(b, 0).repeat_interleave(b, 1)


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
    assert [name for name, _ in module.named_parameters()] == ["bias"]
    before = module.sparse_weight.values.clone()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    module(torch.randn(5, 32)).square().sum().backward()
    opt.step()
    assert torch.equal(module.sparse_weight.values, before)


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


def test_sparsify_and_revert_llama():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in ("q_proj", "down_proj"):
            masks[name] = random_block_mask(module.out_features // 16, module.in_features // 16, 0.5)
            with torch.no_grad():
                module.weight.copy_(masked_dense(module, masks[name]))
    dense_logits = model(ids).logits
    sparsify_model(model, block_masks=masks)
    swapped = {n for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    assert swapped == set(masks)
    torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-4, atol=1e-5)
    densify_model(model)
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-4, atol=1e-5)


def test_sparsify_targets_and_filter():
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    swapped = [n for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)]
    assert len(swapped) == 2 * 7 and not any("lm_head" in n for n in swapped)
    assert all(m.density == 0.5 for m in model.modules() if isinstance(m, BlockSparseLinear))
    model = sparsify_model(make_tiny_llama(), sparsity=0.5, filter_fn=lambda m, name: "mlp" in name)
    swapped = [n for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)]
    assert len(swapped) == 2 * 3 and all(".mlp." in n for n in swapped)
    with pytest.raises(ValueError, match="expected an nn.Linear there, found nothing"):
        sparsify_model(make_tiny_llama(), block_masks={"model.nope": torch.ones(1, 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no nn.Linear in the model matches"):
        sparsify_model(make_tiny_llama(), target_modules=("c_attn",))
