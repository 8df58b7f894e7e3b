"""adapter_fit.fit_adapter: a LoRA adapter fitted to the dense model layer by layer."""

import copy

import pytest
import torch

from blocksparse import sparsify_model
from blocksparse.families import family_of
from blocksparse.integration.adapter_fit import fit_adapter, lora_parameters
from blocksparse.integration.peft import get_peft_model, lora_config
from blocksparse.integration.recipes import recover
from blocksparse.prune.permute import ChannelOrders, permute_layer, permute_outside
from blocksparse.prune.refine import relative_error
from helpers import CALIB, byte_tokenizer, make_tiny_llama, sparse_layers

EVERY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pruned_with_adapter(num_layers=3):
    teacher = make_tiny_llama(num_layers=num_layers)
    student = sparsify_model(copy.deepcopy(teacher), sparsity=0.5, block_size=16)
    return teacher, get_peft_model(student, lora_config(r=4, lora_alpha=8, target_modules=EVERY))


def layer0_error(student, teacher) -> float:
    """Layer 0's loss computed by hand: both models' first hidden states after layer 0 (no dropout)."""
    was_training = student.training
    with torch.no_grad():
        ours = student.eval()(input_ids=CALIB, output_hidden_states=True).hidden_states[1]
        theirs = teacher(input_ids=CALIB, output_hidden_states=True).hidden_states[1]
    student.train(was_training)
    return relative_error(ours.float(), theirs.float()).item()


def test_the_fit_lowers_each_layers_loss_and_leaves_the_pruned_model_as_it_was():
    teacher, student = pruned_with_adapter()
    student.train()
    values = {name: m.sparse_weight.values.detach().clone() for name, m in sparse_layers(student).items()}
    with torch.no_grad(), student.disable_adapter():
        before_output = student(input_ids=CALIB).logits
    expected_first = layer0_error(student, teacher)  # B = 0: the adapter adds nothing yet

    report = fit_adapter(student, teacher, CALIB, steps=12, lr=1e-2, precision="float32", progress=False)

    losses = report["layer_loss_before_after"]
    assert sorted(losses, key=int) == ["0", "1", "2"]
    assert losses["0"][0] == pytest.approx(expected_first, rel=1e-5)
    assert all(after < before for before, after in losses.values())
    assert layer0_error(student, teacher) == pytest.approx(losses["0"][1], rel=1e-5)
    assert all(p.abs().sum() > 0 for name, p in student.named_parameters() if "lora_B" in name)
    for name, m in sparse_layers(student).items():  # the kept blocks are the pruner's
        assert torch.equal(m.sparse_weight.values, values[name])
    with torch.no_grad(), student.disable_adapter():
        assert torch.equal(student(input_ids=CALIB).logits, before_output)
    assert student.training and all(m.training for m in student.modules())  # modes restored
    assert all(p.grad is None for p in student.parameters())


def test_the_targets_follow_a_permuted_students_channel_order():
    """A student that is the teacher with its hidden channels reordered computes the same
    function: with the order its every layer's loss is zero, without it it is not."""
    teacher = make_tiny_llama(num_layers=2)
    student = copy.deepcopy(teacher)
    family, config = family_of(student), student.config
    order = torch.randperm(config.hidden_size, generator=torch.Generator().manual_seed(3))
    orders = ChannelOrders(order, [None, None], [None, None])
    permute_outside(student, family, order)
    for i, layer in enumerate(student.model.layers):
        permute_layer(layer, family, orders, i, config)
    student = get_peft_model(student, lora_config(r=4, lora_alpha=8, target_modules=EVERY))

    ordered = fit_adapter(student, teacher, CALIB, steps=1, hidden_order=order, precision="float32", progress=False)
    assert all(before < 1e-10 for before, _ in ordered["layer_loss_before_after"].values())
    unordered = fit_adapter(student, teacher, CALIB, steps=1, precision="float32", progress=False)
    assert all(before > 0.1 for before, _ in unordered["layer_loss_before_after"].values())


def test_the_fit_refuses_what_it_cannot_do():
    teacher, student = pruned_with_adapter(num_layers=2)
    with pytest.raises(ValueError, match="steps >= 1 and lr > 0, got steps=0"):
        fit_adapter(student, teacher, CALIB, steps=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        fit_adapter(student, teacher, CALIB, precision="fp16")
    with pytest.raises(ValueError, match="the teacher has 3 decoder layers, the model 2"):
        fit_adapter(student, make_tiny_llama(num_layers=3), CALIB)
    with pytest.raises(ValueError, match="the model has no LoRA adapter"):
        fit_adapter(student.get_base_model().__class__(student.config), teacher, CALIB)
    assert lora_parameters(student.get_base_model().model.layers[0])


def test_recover_fits_the_adapter_of_a_recipe_that_asks(corpus_file, tmp_path, monkeypatch):
    from blocksparse.integration import adapter_fit, recipes

    monkeypatch.setattr(recipes, "FIT_SAMPLES", 2)
    monkeypatch.setattr(recipes, "FIT_SEQLEN", 32)
    calls = []
    fit = adapter_fit.fit_adapter

    def recording(model, teacher, calib, **kwargs):
        calls.append((list(calib.shape), kwargs["steps"]))
        assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)  # before training
        return fit(model, teacher, calib, **{**kwargs, "steps": 2})

    monkeypatch.setattr(adapter_fit, "fit_adapter", recording)
    teacher = make_tiny_llama()
    student = sparsify_model(copy.deepcopy(teacher), sparsity=0.5, block_size=16)
    with pytest.raises(ValueError, match="recipe 'lora16_fit' fits its adapter to the dense model: pass its teacher"):
        recover(student, byte_tokenizer(), str(corpus_file), tmp_path, "lora16_fit", steps=2)
    trained, info = recover(student, byte_tokenizer(), str(corpus_file), tmp_path, "lora16_fit", steps=2,
                            train_seqlen=32, lora_r=4, teacher=teacher, progress=False)
    assert calls == [([2, 32], recipes.RECOVERY_RECIPES["lora16_fit"]["fit"]["steps"])]
    assert 0 <= info["fit_seconds"] <= info["seconds"] and info["train_tokens"] == 2 * 32
