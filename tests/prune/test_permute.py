"""Channel permutations before pruning (blocksparse.prune.permute): the permuted model computes
what the dense one did, the orders follow importance, and prune_model prunes the permuted model."""

import copy

import pytest
import torch

from blocksparse.families import decoder_layers, family_of
from blocksparse.integration.train import Distillation, hidden_mse
from blocksparse.prune import prune_model
from blocksparse.prune.driver import _by_layer
from blocksparse.prune.permute import channel_orders, permute_layer, permute_outside
from blocksparse.sparsify import target_linears
from helpers import CALIB, make_tiny_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def _orders(model, pruned=None, seed=0):
    """Orders from random input norms (every target linear pruned unless `pruned` says)."""
    by_layer = _by_layer(decoder_layers(model), target_linears(model))
    generator = torch.Generator().manual_seed(seed)
    sq = {name: torch.rand(lin.in_features, generator=generator, dtype=torch.float64) + 0.01
          for linears in by_layer for name, lin in linears.items()}
    return channel_orders(model, family_of(model), by_layer, sq, set(sq) if pruned is None else pruned), sq


def _permute(model, orders):
    family = family_of(model)
    permute_outside(model, family, orders.hidden)
    for i, layer in enumerate(decoder_layers(model)):
        permute_layer(layer, family, orders, i, model.config)


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("llama", dict(attention_bias=True, mlp_bias=True)),   # biases on every projection
    ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),  # a tied head, no GQA
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases
])
def test_a_permuted_model_computes_what_the_dense_one_did(model_type, overrides):
    model = make_tiny_model(model_type, **overrides)
    with torch.no_grad():  # non-trivial norm weights and biases (both start constant), so one left
        for name, p in model.named_parameters():  # in the old order shows
            if "norm" in name or "bias" in name:
                p.uniform_(0.5, 1.5)
    before = model(IDS, output_hidden_states=True)
    dense = copy.deepcopy(model)
    orders, _ = _orders(model)
    _permute(model, orders)
    after = model(IDS, output_hidden_states=True)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    # The hidden states are the dense model's in the new order, and the weights really moved.
    for h_after, h_before in zip(after.hidden_states, before.hidden_states):
        torch.testing.assert_close(h_after, h_before[..., orders.hidden], atol=1e-5, rtol=1e-5)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, dense.get_parameter(name))]
    assert any("down_proj" in n for n in moved) and any("v_proj" in n for n in moved)
    assert any("embed_tokens" in n for n in moved)
    assert all(not torch.equal(o, torch.arange(len(o))) for o in [orders.hidden, *orders.mlp, *orders.value])


def test_orders_sort_channels_by_their_share_of_the_pruned_score_mass():
    model = make_tiny_model("llama")
    only = {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    orders, sq = _orders(model, pruned=only)
    # Only down_proj is pruned: the MLP order sorts its columns' |W| ||X_j|| sums, the hidden
    # order its rows' shares summed over layers, and the value dims keep their order.
    hidden_importance = 0
    for i, layer in enumerate(decoder_layers(model)):
        scores = layer.mlp.down_proj.weight.detach().double().abs() * sq[f"model.layers.{i}.mlp.down_proj"].sqrt()
        assert torch.equal(orders.mlp[i], torch.argsort(scores.sum(0), descending=True, stable=True))
        hidden_importance = hidden_importance + scores.sum(1) / scores.sum()
        assert orders.value[i] is None
    assert torch.equal(orders.hidden, torch.argsort(hidden_importance, descending=True, stable=True))
    nothing, _ = _orders(model, pruned=set())
    assert nothing.hidden is None and nothing.mlp == [None, None] and nothing.value == [None, None]


def test_value_order_is_one_order_per_key_value_head():
    model = make_tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head_dim 32
    orders, _ = _orders(model)
    for order in orders.value:
        heads = order.reshape(2, 32)
        assert torch.equal(heads.sort(dim=1).values, torch.arange(64).reshape(2, 32))  # stays inside its head


def test_prune_model_with_permuted_channels_is_prune_model_of_the_permuted_model(monkeypatch):
    # Whatever prune_model does with the orders (layer 0's inputs, the sink probes, the dense
    # track, each layer just before it is pruned), it must equal pruning a model permuted first.
    from blocksparse.prune import driver

    chosen = []
    monkeypatch.setattr(driver, "channel_orders", lambda *args: chosen.append(channel_orders(*args)) or chosen[-1])
    recipe = dict(sparsity=0.5, method="wanda", reconstruct_target="dense", refine_steps=2, sink_tokens=4,
                  batch_size=4, progress=False, convert=False)
    dense = make_tiny_model("llama")
    model = copy.deepcopy(dense)
    report = prune_model(model, CALIB, permute_channels=True, **recipe)
    reference = copy.deepcopy(dense)
    _permute(reference, chosen[0])
    expected = prune_model(reference, CALIB, **recipe)
    assert report["layers"] == expected["layers"]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # The masks are whole 16 x 16 blocks in the final coordinates.
    weight = model.model.layers[1].self_attn.q_proj.weight
    blocks = (weight != 0).reshape(4, 16, 4, 16).permute(0, 2, 1, 3).reshape(16, 256)
    assert ((blocks.sum(1) == 0) | (blocks.sum(1) == 256)).all()


def test_prune_model_prunes_the_permuted_model_and_records_the_hidden_order():
    dense = make_tiny_model("llama")
    model = copy.deepcopy(dense)
    report = prune_model(model, CALIB, sparsity=0.5, method="wanda", reconstruct=False, sink_tokens=0,
                         batch_size=4, progress=False, convert=False, permute_channels=True)
    order = torch.tensor(report["channel_permutation"]["hidden"])
    assert torch.equal(order.sort().values, torch.arange(64)) and not torch.equal(order, torch.arange(64))
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight[:, order])
    # Kept weights are the dense model's in the permuted order: q_proj's columns moved by the
    # hidden order (its rows stay), and every weight is either kept as it was or zero.
    for i in range(2):
        pruned = model.model.layers[i].self_attn.q_proj.weight
        original = dense.model.layers[i].self_attn.q_proj.weight[:, order]
        kept = pruned != 0
        assert torch.equal(pruned[kept], original[kept]) and kept.float().mean() == 0.5
    unpermuted = prune_model(copy.deepcopy(dense), CALIB, sparsity=0.5, method="wanda", reconstruct=False,
                             sink_tokens=0, batch_size=4, progress=False, convert=False)
    assert unpermuted["channel_permutation"] is None


def test_hidden_distillation_follows_the_recorded_order():
    teacher = make_tiny_model("llama")
    student = copy.deepcopy(teacher)
    orders, _ = _orders(student)
    _permute(student, orders)
    s = student(IDS, output_hidden_states=True).hidden_states
    t = teacher(IDS, output_hidden_states=True).hidden_states
    assert hidden_mse(s, t, orders.hidden) < 1e-10
    assert hidden_mse(s, t) > 0.1  # the same model, compared channel by channel in the wrong order
    Distillation(teacher, hidden_weight=1.0, hidden_order=orders.hidden)
    with pytest.raises(ValueError, match="permutation of 0..n-1, got 64 entries, 1 distinct, from 0 to 0"):
        Distillation(teacher, hidden_weight=1.0, hidden_order=torch.zeros(64, dtype=torch.long))
    with pytest.raises(ValueError, match="orders 32 channels; the teacher has 64"):
        Distillation(teacher, hidden_weight=1.0, hidden_order=torch.arange(32))
