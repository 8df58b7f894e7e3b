"""PEFT LoRA on BlockSparseLinear: forward/backward against dense PEFT, adapters, merging, saving."""

import copy
import json
import os

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from torch import nn

from blocksparse import BlockSparseLinear
from blocksparse import densify_model, sparsify_model
from blocksparse.integration.peft import (
    LoraBlockSparseLinear,
    MaskedMergeWarning,
    export_dense,
    get_peft_model,
    load_adapter,
    lora_layers,
    merge_masked,
    register_peft,
)
from helpers import make_tiny_llama

TESTED_PEFT = "0.21.2"  # requirements.txt pins it; the custom-module API is experimental


def qv_config(**kwargs):
    settings = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    settings.update(kwargs)
    return LoraConfig(**settings)


def randomize_lora(model, seed=1, std=0.2):
    """LoRA B starts at zero; give every adapter weight a random value so it matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def sparse_llama(sparsity=0.5, **config):
    return sparsify_model(make_tiny_llama(**config), sparsity=sparsity)


def tokens(batch=2, length=24, seed=3):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def test_peft_version_is_the_tested_one():
    assert peft.__version__ == TESTED_PEFT, (
        f"LoraBlockSparseLinear is tested with peft {TESTED_PEFT}, found {peft.__version__}")


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_forward_and_lora_gradients_match_dense_peft(sparsity):
    # Reference: the same (masked) weights as nn.Linear, with PEFT's own LoRA layer.
    sparse = sparse_llama(sparsity)
    dense = densify_model(copy.deepcopy(sparse))
    ours = get_peft_model(sparse, qv_config())
    theirs = peft.get_peft_model(dense, qv_config())
    assert len(lora_layers(ours)) == 4 and not lora_layers(theirs)
    randomize_lora(ours)
    randomize_lora(theirs)
    ids = tokens()
    ours.train()
    theirs.train()
    out, ref = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    ours_g, theirs_g = lora_grads(ours), lora_grads(theirs)
    assert ours_g.keys() == theirs_g.keys() and len(ours_g) == 8
    for name in ours_g:
        assert ours_g[name] is not None and ours_g[name].abs().sum() > 0, name
        torch.testing.assert_close(ours_g[name], theirs_g[name], rtol=1e-4, atol=1e-6, msg=name)
    for layer in lora_layers(ours).values():
        assert layer.get_base_layer().sparse_weight.values.grad is None


def test_only_lora_parameters_train_and_sparse_structure_is_untouched():
    model = sparse_llama(0.5)
    base = {n: (m.sparse_weight.values.clone(), m.block_mask.clone())
            for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    pm = get_peft_model(model, qv_config(lora_dropout=0.05))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for _ in range(3):
        ids = tokens()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m
             for n, m in pm.named_modules() if isinstance(m, BlockSparseLinear)}
    assert after.keys() == base.keys()
    for name, (values, mask) in base.items():
        assert torch.equal(after[name].sparse_weight.values, values), name
        assert torch.equal(after[name].block_mask, mask), name


def test_disable_adapter_gives_the_base_model():
    model = sparse_llama(0.5)
    ids = tokens()
    base_logits = model(input_ids=ids).logits
    pm = get_peft_model(model, qv_config())
    randomize_lora(pm)
    adapted = pm(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-2
    with pm.disable_adapter():
        torch.testing.assert_close(pm(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(pm(input_ids=ids).logits, adapted, rtol=0, atol=0)


def dense_reference(sparse_model, peft_model, adapters):
    """A dense copy of `sparse_model` whose adapted weights hold W + sum of s * B A."""
    dense = densify_model(copy.deepcopy(sparse_model))
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(peft_model).items():
            target = modules[name.removeprefix("base_model.model.")]
            for adapter in adapters:
                if adapter in layer.lora_A:
                    delta = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
                    target.weight += delta * layer.scaling[adapter]
    return dense


def test_multiple_adapters_fused_first_then_unfused_and_mixed_batch():
    model = sparse_llama(0.5)
    untouched = copy.deepcopy(model)
    pm = get_peft_model(model, qv_config())
    # The second adapter also targets k_proj, so it needs registration of its own.
    pm.add_adapter("second", register_peft(qv_config(r=4, lora_alpha=4,
                                                     target_modules=["q_proj", "k_proj"])))
    randomize_lora(pm)
    ids = tokens()
    for active in (["default"], ["second"], ["default", "second"]):
        pm.base_model.set_adapter(active)
        expected = dense_reference(untouched, pm, active)(input_ids=ids).logits
        torch.testing.assert_close(pm(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5,
                                   msg=f"active adapters {active}")
    pm.base_model.set_adapter(["default"])
    pm.eval()
    mixed = pm(input_ids=ids, adapter_names=["default", "second"]).logits
    for row, adapter in enumerate(["default", "second"]):
        expected = dense_reference(untouched, pm, [adapter])(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], expected, rtol=1e-5, atol=1e-5, msg=adapter)


def test_masked_merge_keeps_sparsity_reports_the_dropped_part_and_unmerges():
    model = sparse_llama(0.5)
    untouched = copy.deepcopy(model)
    pm = get_peft_model(model, qv_config())
    randomize_lora(pm)
    ids = tokens()
    pm.eval()
    unmerged_logits = pm(input_ids=ids).logits
    layers = lora_layers(pm)
    before = {n: (l.get_base_layer().sparse_weight.values.clone(), l.get_base_layer().block_mask.clone())
              for n, l in layers.items()}
    expected_errors = {}
    for name, layer in layers.items():
        delta = layer.get_delta_weight("default")
        outside = ~before[name][1].repeat_interleave(16, 0).repeat_interleave(16, 1)
        expected_errors[name] = (delta * outside).norm().item() / delta.norm().item()

    with pytest.warns(MaskedMergeWarning, match="dropped on average"):
        errors = merge_masked(pm)
    assert errors.keys() == layers.keys()
    for name, layer in layers.items():
        assert errors[name] == pytest.approx(expected_errors[name], rel=1e-4)
        assert 0.3 < errors[name] < 0.95  # half the blocks of a random update are outside
        assert layer.merged and torch.equal(layer.get_base_layer().block_mask, before[name][1])
    # The merged model is the sparse model with the update added inside the kept blocks only.
    reference = densify_model(copy.deepcopy(untouched))
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            target = modules[name.removeprefix("base_model.model.")]
            mask = before[name][1].repeat_interleave(16, 0).repeat_interleave(16, 1)
            target.weight += layer.get_delta_weight("default") * mask
    torch.testing.assert_close(pm(input_ids=ids).logits, reference(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)

    pm.unmerge_adapter()
    for name, layer in layers.items():
        assert not layer.merged
        torch.testing.assert_close(layer.get_base_layer().sparse_weight.values, before[name][0],
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(pm(input_ids=ids).logits, unmerged_logits, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_stays_sparse_and_warns_per_layer():
    pm = get_peft_model(sparse_llama(0.5), qv_config())
    randomize_lora(pm)
    with pytest.warns(MaskedMergeWarning, match="drops"):
        merged = pm.merge_and_unload()
    kinds = {type(m) for m in merged.modules()}
    assert BlockSparseLinear in kinds and LoraBlockSparseLinear not in kinds


def test_export_dense_merges_exactly_into_plain_linears():
    pm = get_peft_model(sparse_llama(0.5), qv_config())
    randomize_lora(pm)
    ids = tokens()
    pm.eval()
    expected = pm(input_ids=ids).logits
    merge_masked_then = copy.deepcopy(pm)
    with pytest.warns(MaskedMergeWarning):
        merge_masked(merge_masked_then)  # export must undo a masked merge first
    for model in (pm, merge_masked_then):
        dense = export_dense(model)
        kinds = {type(m) for m in dense.modules()}
        assert BlockSparseLinear not in kinds and LoraBlockSparseLinear not in kinds
        assert not isinstance(dense, PeftModel)
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_and_load_adapter_round_trip(tmp_path):
    model = sparse_llama(0.5)
    fresh = copy.deepcopy(model)
    fresh_plain = copy.deepcopy(model)
    pm = get_peft_model(model, qv_config(lora_dropout=0.05))
    randomize_lora(pm)
    pm.eval()
    ids = tokens()
    expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["target_modules"] and not any("custom" in k for k in saved)

    loaded = load_adapter(fresh, tmp_path)
    assert isinstance(loaded, PeftModel) and len(lora_layers(loaded)) == 4
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    # Plain PEFT loads it too once the config is registered ...
    plain = PeftModel.from_pretrained(copy.deepcopy(fresh_plain), tmp_path, config=register_peft(tmp_path))
    assert torch.equal(plain(input_ids=ids).logits, expected)
    # ... and not without: the registration is not saved with the adapter.
    with pytest.raises(ValueError, match="not supported"):
        PeftModel.from_pretrained(fresh_plain, tmp_path)


def test_load_adapter_adds_a_second_adapter_to_a_peft_model(tmp_path):
    pm = get_peft_model(sparse_llama(0.5), qv_config())
    randomize_lora(pm, seed=5)
    pm.save_pretrained(tmp_path)
    other = get_peft_model(sparse_llama(0.5), qv_config(target_modules=["k_proj"]))
    load_adapter(other, tmp_path, adapter_name="loaded")
    assert set(other.peft_config) == {"default", "loaded"}
    layer = dict(other.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    source = dict(pm.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.lora_B["loaded"].weight, source.lora_B["default"].weight)


def test_register_peft_is_idempotent_and_validates():
    config = qv_config()
    assert register_peft(register_peft(config)) is config
    assert config._custom_modules == {BlockSparseLinear: LoraBlockSparseLinear}
    default = register_peft()
    assert (default.r, default.lora_alpha, default.lora_dropout) == (8, 16, 0.05)
    assert set(default.target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(TypeError, match="LoraConfig"):
        register_peft(42)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(sparse_llama(0.5), "/nonexistent/adapter")


@pytest.mark.parametrize("option", [dict(use_dora=True), dict(init_lora_weights="pissa"),
                                    dict(init_lora_weights="olora")])
def test_options_that_need_a_dense_base_weight_are_refused(option):
    with pytest.raises(ValueError, match="DoRA|dense base weight"):
        get_peft_model(sparse_llama(0.5), qv_config(**option))


def test_wraps_only_block_sparse_linear():
    with pytest.raises(TypeError, match="BlockSparseLinear"):
        LoraBlockSparseLinear(nn.Linear(32, 32), "default", config=qv_config(), r=8, lora_alpha=16)


def test_bf16_base_with_fp32_lora_weights():
    model = sparse_llama(0.5).to(torch.bfloat16)
    reference = densify_model(copy.deepcopy(model)).float()
    pm = get_peft_model(model, qv_config())  # PEFT keeps the adapter in fp32 (autocast_adapter_dtype)
    layer = next(iter(lora_layers(pm).values()))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    randomize_lora(pm)
    x = torch.randn(3, 5, layer.in_features).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    dense = dict(reference.named_modules())[
        "model.layers.0.self_attn.q_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = dense(x.float()) + (x.float() @ a.t() @ b.t()) * layer.scaling["default"]
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton backend runs on a CPU only under TRITON_INTERPRET=1")
def test_triton_backend_fused_lora_matches_torch_backend(monkeypatch):
    layer_model = get_peft_model(sparse_llama(0.5), qv_config(lora_dropout=0.0))
    randomize_lora(layer_model)
    layer = next(iter(lora_layers(layer_model).values()))
    x = torch.randn(2, 9, layer.in_features)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("BLOCKSPARSE_BACKEND", backend)
        xb = x.clone().requires_grad_(True)
        out = layer(xb)
        out.square().sum().backward()
        results[backend] = (out.detach(), xb.grad, layer.lora_A["default"].weight.grad.clone(),
                            layer.lora_B["default"].weight.grad.clone())
        layer.zero_grad()
    for name, t, r in zip(("out", "grad x", "grad A", "grad B"), results["triton"], results["torch"]):
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-4, msg=name)
