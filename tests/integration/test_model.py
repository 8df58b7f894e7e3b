"""Model loading: local directories, sparse-checkpoint dispatch, the embedded default model."""

import json

import pytest
import torch

from blocksparse.integration import model as model_module
from blocksparse.integration.cache import atomic_directory
from blocksparse.integration.checkpoint import SPARSE_CHECKPOINT_MARKER
from blocksparse.integration.evaluate import perplexity
from blocksparse.integration.model import ModelNotFoundError, load_model
from blocksparse.sparsify import check_block_divisible, target_linears
from helpers import byte_tokenizer, make_tiny_llama


def test_load_local_directory(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("Zürich").input_ids == byte_tokenizer()("Zürich").input_ids


def test_sparse_checkpoint_goes_through_load_sparse_pretrained(tiny_dir, monkeypatch):
    (tiny_dir / SPARSE_CHECKPOINT_MARKER).write_text("{}")
    calls = []

    def load_sparse_pretrained(path, dtype=None, device="cpu"):
        calls.append((path, dtype, device))
        return make_tiny_llama(seed=1), None  # no tokenizer saved: load_model reads the directory's

    monkeypatch.setattr(model_module, "load_sparse_pretrained", load_sparse_pretrained)
    model, tokenizer = load_model(str(tiny_dir), dtype=torch.float64)
    assert calls == [(str(tiny_dir), torch.float64, "cpu")]
    assert torch.equal(model.lm_head.weight, make_tiny_llama(seed=1).lm_head.weight.double())
    assert tokenizer("ab").input_ids == byte_tokenizer()("ab").input_ids


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "cache" / "thing"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(final.parent.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"x")
    assert [p.name for p in final.parent.iterdir()] == ["thing"]
    assert (final / "whole.bin").read_bytes() == b"x"


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    """Convert the embedded GGUF once into a fresh cache (the one slow step, ~30 s)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOCKSPARSE_CACHE", str(root))
        model_module.default_model_dir()
        yield root


def test_default_model_is_converted_once_and_cached(default_cache, monkeypatch):
    directory = default_cache / "models" / model_module.DEFAULT_CACHE_NAME
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]

    def no_gguf():
        raise AssertionError("the cached directory must be used, not the GGUF")

    monkeypatch.setattr(model_module, "default_gguf_path", no_gguf)
    model, tokenizer = load_model("default")
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (576, 1536, 30)
    assert cfg.num_key_value_heads * cfg.head_dim == 192
    check_block_divisible(target_linears(model), 16)
    assert model.dtype == torch.float32 and len(tokenizer) == 49152
    # A working language model: plain English is far more likely than chance (ppl 49152).
    text = ("The city is the capital of the state and its largest city by population. It is located "
            "on the banks of the river, and it has a long history as a center of trade and industry. ")
    tokens = tokenizer(text * 2, return_tensors="pt").input_ids
    assert perplexity(model, tokens, seqlen=tokens.shape[1], progress=False)["ppl"] < 20


def test_unreachable_hub_model_names_offline_alternatives(monkeypatch):
    from transformers import AutoModelForCausalLM

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelNotFoundError, match=r"cannot load model 'meta-llama/Llama-2-7b-hf'.*offline\?.*"
                                                 r"--model default .* or a local model directory"):
        load_model("meta-llama/Llama-2-7b-hf")
