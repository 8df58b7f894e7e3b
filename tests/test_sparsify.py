"""sparsify_model / densify_model: swapping a model's linears per instance, and back."""

import pytest
import torch
from torch import nn

from blocksparse import BlockSparseLinear, densify_model, sparsify_model
from blocksparse.sparsify import check_block_divisible, target_linears
from helpers import make_tiny_llama, masked_dense, random_block_mask


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


def test_check_block_divisible_names_the_offenders():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=120,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"divide by block size 16; not divisible: "
                                         r"model.layers.0.mlp.gate_proj \[120, 64\], .*down_proj \[64, 120\]"):
        check_block_divisible(target_linears(model), 16)
    check_block_divisible(target_linears(model), 8)


def test_masks_of_another_block_size_give_their_own_block_size():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

    model = sparsify_model(Holder(), block_masks={"lin": torch.ones(2, 2, dtype=torch.bool)})  # 32x32 blocks
    assert model.lin.block_size == 32
    with pytest.raises(ValueError, match=r"lin: block_mask shape \(2, 2\) does not fit"):
        sparsify_model(Holder(), block_masks={"lin": torch.ones(2, 2, dtype=torch.bool)}, block_size=16)
