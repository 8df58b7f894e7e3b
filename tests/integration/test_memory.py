"""The memory model (blocksparse.integration.memory) against what tiny models really hold."""

import json
import os

import pytest
import torch

from blocksparse.commands import main
from blocksparse.integration.memory import PRESETS, PROJECTIONS, SEED_TARGETS, Setup, Shape, estimate, shape_of
from blocksparse.integration.peft import lora_config
from blocksparse.prune import prune_model
from helpers import CALIB, make_tiny_model

TOKENS = 64


def tiny(layers, hidden, intermediate, heads, kv_heads, lora_r, dtype, targets=PROJECTIONS):
    from peft import get_peft_model

    model = make_tiny_model(num_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                            num_attention_heads=heads, num_key_value_heads=kv_heads)
    prune_model(model, CALIB[:4, :64], sparsity=0.5, method="magnitude", reconstruct=False, progress=False,
                sink_tokens=0)
    model = model.to(dtype)
    if lora_r:
        model = get_peft_model(model, lora_config(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                                  target_modules=list(targets)))
    return model.train()


def saved_for_backward(model) -> int:
    """Bytes of the distinct storages autograd saves in one training forward, parameters excluded."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, 256, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("backend, hidden, intermediate, heads, kv_heads, lora_r, dtype", [
    ("torch", 64, 128, 4, 2, 8, torch.float32), ("torch", 96, 192, 6, 3, 12, torch.float32),
    ("torch", 96, 160, 6, 6, 8, torch.bfloat16), ("triton", 64, 128, 4, 2, 8, torch.float32),
    ("triton", 96, 160, 6, 6, 8, torch.float32), ("triton", 96, 192, 6, 3, 12, torch.bfloat16)])
def test_activations_per_layer_are_what_autograd_saves(monkeypatch, backend, hidden, intermediate, heads, kv_heads,
                                                       lora_r, dtype):
    # One more decoder layer adds exactly one layer's saved tensors (the first layer saves less: its
    # input, the frozen embeddings' output, needs no gradient). The Triton op runs in the interpreter.
    if backend == "triton":
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
            pytest.skip("the Triton op needs a GPU or TRITON_INTERPRET=1 (make test sets it)")
        monkeypatch.setenv("BLOCKSPARSE_BACKEND", "triton")
    measured = (saved_for_backward(tiny(2, hidden, intermediate, heads, kv_heads, lora_r, dtype))
                - saved_for_backward(tiny(1, hidden, intermediate, heads, kv_heads, lora_r, dtype))) / TOKENS
    shape = Shape(hidden, intermediate, 1, heads, kv_heads, 256)
    setup = Setup(lora_r=lora_r, seqlen=TOKENS, dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                  backend=backend)
    modeled = estimate(shape, setup)["activations (decoder layers)"] / TOKENS
    assert abs(modeled / measured - 1) < 0.15, (modeled, measured)


def test_weights_and_trainable_parameters_are_the_models_own():
    model = tiny(2, 64, 128, 4, 2, 8, torch.float32, targets=SEED_TARGETS)
    values = sum(m.sparse_weight.values.numel() * 4 for m in model.modules() if hasattr(m, "sparse_weight"))
    lora = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    parts = estimate(Shape(64, 128, 2, 4, 2, 256), Setup(lora_r=8, lora_targets=SEED_TARGETS, dtype_bytes=4))
    assert parts["kept block values"] == values
    assert parts["LoRA parameters (fp32)"] == lora
    assert parts["LoRA gradients + Adam (fp32)"] == 3 * lora
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_fsdp_shards_what_it_shards_and_gathers_two_layers():
    shape, one = PRESETS["llama-2-70b"], Setup(train_values=True)
    alone, sharded = estimate(shape, one), estimate(shape, Setup(train_values=True, world_size=8, fsdp=True))
    assert estimate(shape, Setup(train_values=True, world_size=8)) == alone  # DDP: every rank holds everything
    for part in ("kept block values", "LoRA parameters (fp32)", "trained values: gradients + Adam"):
        assert sharded[part] == pytest.approx(alone[part] / 8)
    assert sharded["dense weights (embeddings, head, norms)"] == alone["dense weights (embeddings, head, norms)"]
    assert sharded["block index (replicated)"] == alone["block index (replicated)"]
    assert alone["FSDP gathered layers (2)"] == 0 and sharded["FSDP gathered layers (2)"] > 0
    checkpointed = estimate(shape, Setup(gradient_checkpointing=True))
    assert checkpointed["activations (decoder layers)"] < alone["activations (decoder layers)"] / 10


def test_a_config_file_gives_its_shape(tmp_path):
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert shape_of(str(tmp_path)) == Shape(64, 128, 2, 4, 2, 256)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="lacks a Llama geometry field"):
        shape_of(str(tmp_path))


def test_cli_prints_the_table_and_the_verdict(capsys):
    assert main(["memory", "--model", "llama-2-70b", "--world-size", "8", "--fsdp", "--gradient-checkpointing",
                 "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "| kept block values |" in out and "**total per rank**" in out and "fits in 80 GiB" in out


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1"], "--sparsity must be in [0, 1)"), (["--world-size", "0"], "--world-size must be >= 1"),
    (["--block-size", "7"], "--block-size must be one of"), (["--model", "nowhere"], "neither a preset"),
    (["--device-memory", "nan"], "--device-memory must be a finite number"),
    (["--fsdp"], "give --world-size >= 2 with it")])
def test_cli_bad_input_is_one_line(capsys, extra, message):
    assert main(["memory"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
