"""Every row of blocksparse.families on a tiny random model: sparsify, prune, a PEFT LoRA
step through the fused op, and a sparse-checkpoint round trip; unknown families refused."""

import pytest
import torch

from blocksparse import BlockSparseLinear, sparsify_model
from blocksparse.families import FAMILIES, UnsupportedModelError, decoder_layers, family_of
from blocksparse.integration.checkpoint import load_sparse_pretrained, save_sparse_pretrained
from blocksparse.integration.peft import get_peft_model, lora_config
from blocksparse.prune import prune_model
from helpers import CALIB, make_tiny_model, sparse_layers

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_prunes_trains_and_round_trips(model_type, tmp_path):
    model = make_tiny_model(model_type)
    family = family_of(model)
    assert family.model_type == model_type and len(decoder_layers(model)) == 2

    report = prune_model(model, CALIB, sparsity=0.5, batch_size=4, progress=False,
                         allocation={family.mlp_path(0): 1.0})
    layers = sparse_layers(model)
    assert {name.rpartition(".")[2] for name in layers} == set(family.projections)
    # Layer 0's MLP is kept whole: it stays nn.Linear; every other projection is block-sparse.
    assert len(layers) == 2 * len(family.projections) - len(family.mlp_projections)
    assert report["total_density"] == 0.5
    assert all(f"{family.mlp_path(0)}.{p}" not in layers and report["layers"][f"{family.mlp_path(0)}.{p}"]["density"] == 1
               for p in family.mlp_projections)
    if model_type == "qwen2":  # q/k/v biases survive the swap
        assert layers[f"{family.layers}.0.{family.attention}.q_proj"].bias is not None
    logits = model(IDS).logits

    save_sparse_pretrained(model, None, tmp_path / "ckpt")
    loaded, _ = load_sparse_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded(IDS).logits, logits)

    peft_model = get_peft_model(loaded, lora_config(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=family.lora_targets))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    values_before = {n: m.sparse_weight.values.clone() for n, m in peft_model.named_modules()
                     if isinstance(m, BlockSparseLinear)}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in trainable)
    for n, m in peft_model.named_modules():
        if isinstance(m, BlockSparseLinear):
            assert torch.equal(m.sparse_weight.values, values_before[n]), n


def test_sparsify_uses_the_family_projections():
    model = sparsify_model(make_tiny_model("mistral"), sparsity=0.5)
    assert len(sparse_layers(model)) == 2 * len(FAMILIES["mistral"].projections)


def test_a_family_with_fused_projections_is_refused_in_one_line():
    model = make_tiny_model("phi3", pad_token_id=0)  # qkv_proj and gate_up_proj are fused
    with pytest.raises(UnsupportedModelError) as err:
        family_of(model)
    message = str(err.value)
    assert "model type 'phi3' is not supported" in message and "llama, mistral, qwen2" in message
    assert "\n" not in message
    with pytest.raises(UnsupportedModelError, match="phi3"):
        prune_model(model, CALIB, progress=False)
    with pytest.raises(UnsupportedModelError, match="phi3"):
        sparsify_model(model, sparsity=0.5)


def test_a_model_without_a_config_is_named():
    with pytest.raises(UnsupportedModelError, match=r"Linear \(no config.model_type\) is not supported"):
        family_of(torch.nn.Linear(16, 16))
