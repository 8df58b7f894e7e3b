"""Model loading: local directories, sparse-checkpoint dispatch, the embedded default model."""

import json

import pytest
import torch

from blocksparse.integration import model as model_module
from blocksparse.integration.cache import atomic_directory
from blocksparse.integration.checkpoint import SPARSE_CHECKPOINT_MARKER
from blocksparse.integration.evaluate import perplexity
from blocksparse.integration.model import ModelNotFoundError, load_model, load_skeleton
from blocksparse.sparsify import check_block_divisible, target_linears
from helpers import byte_tokenizer, make_tiny_llama


def test_load_local_directory(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("Zürich").input_ids == byte_tokenizer()("Zürich").input_ids


def test_a_skeleton_has_every_parameter_and_buffer_but_no_weight_read(tiny_dir, tmp_path):
    model, _ = load_model(str(tiny_dir))
    skeleton, tokenizer = load_skeleton(str(tiny_dir))
    assert tokenizer is not None and not any(p.is_meta for p in skeleton.parameters())
    ours, expected = skeleton.state_dict(), model.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}
    inv_freq = [name for name, _ in model.named_buffers() if name.endswith("inv_freq")]
    assert inv_freq and all(torch.equal(skeleton.get_buffer(n), model.get_buffer(n)) for n in inv_freq)
    # Nothing to read shards from: the caller loads those whole.
    assert load_skeleton("default") is None and load_skeleton(str(tmp_path)) is None


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


def test_a_hub_model_the_hub_cannot_provide_names_the_local_alternatives(monkeypatch):
    import io
    import urllib.request

    from transformers import AutoConfig

    def refused(*args, **kwargs):
        raise OSError("meta-llama/Llama-2-7b-hf is a gated repository")

    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO())  # the hub answers
    monkeypatch.setattr(AutoConfig, "from_pretrained", refused)
    with pytest.raises(ModelNotFoundError, match=r"cannot load model 'meta-llama/Llama-2-7b-hf'.*could not provide "
                                                 r"it \(.*gated repository\).*'default' .* or a local model directory"):
        load_model("meta-llama/Llama-2-7b-hf")


def test_unreachable_hub_fails_fast_and_names_the_local_models(tmp_path, monkeypatch):
    # A bare name that is no local directory, with the hub unreachable: the hub's retries
    # (~48 s) are skipped by loading from local files only.
    import urllib.error
    import urllib.request

    from transformers import AutoConfig

    monkeypatch.setenv("BLOCKSPARSE_CACHE", str(tmp_path))
    (tmp_path / "models" / "my-pruned").mkdir(parents=True)
    calls = []

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    def from_pretrained(name, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        raise OSError(f"{name} is not in the local cache")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(ModelNotFoundError, match=r"cannot load model 'my-model'.*hub is unreachable.*'default'.*"
                                                 + str(tmp_path / "models" / "my-pruned")):
        load_model("my-model")
    assert calls == [True]


def test_offline_mode_never_asks_the_network(monkeypatch):
    import urllib.request

    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE is set: the network must not be asked")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(ModelNotFoundError, match=r"cannot load model 'my-model'.*offline \(HF_HUB_OFFLINE\)"):
        load_model("my-model")


def _inv_freq(model):
    return model.model.rotary_emb.inv_freq


def test_bf16_loads_keep_the_rope_frequencies_in_fp32(tiny_dir, tmp_path):
    from blocksparse import sparsify_model
    from blocksparse.integration.checkpoint import save_sparse_pretrained

    sparse_dir = save_sparse_pretrained(sparsify_model(make_tiny_llama(), sparsity=0.5), byte_tokenizer(),
                                        tmp_path / "sparse")
    for directory in (tiny_dir, sparse_dir):
        reference = _inv_freq(load_model(str(directory))[0])
        model = load_model(str(directory), dtype=torch.bfloat16)[0]
        assert model.model.norm.weight.dtype == torch.bfloat16
        assert _inv_freq(model).dtype == torch.float32 and torch.equal(_inv_freq(model), reference), directory


def test_a_sparse_checkpoint_without_its_marker_is_refused(tmp_path):
    from blocksparse import sparsify_model
    from blocksparse.integration.checkpoint import SparseCheckpointError, save_sparse_pretrained

    out = save_sparse_pretrained(sparsify_model(make_tiny_llama(), sparsity=0.5), byte_tokenizer(), tmp_path / "s")
    (out / SPARSE_CHECKPOINT_MARKER).unlink()
    with pytest.raises(SparseCheckpointError, match=r"model.safetensors holds block-sparse tensors .* but "
                                                    r"blocksparse_config.json is missing"):
        load_model(str(out))


def _with_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": "abc"}, r"config.json: .*'hidden_size' expected int, got str \(value: 'abc'\)"),
    ({"hidden_size": 10**9}, r"config.json describes a model of about .* parameters .* more than this machine's"),
    ({"num_hidden_layers": 0}, r"config.json: num_hidden_layers must be a positive integer, got 0"),
])
def test_a_bad_config_is_refused_before_anything_is_allocated(tiny_dir, tmp_path, changes, message):
    from blocksparse import sparsify_model
    from blocksparse.integration.checkpoint import save_sparse_pretrained

    sparse_dir = save_sparse_pretrained(sparsify_model(make_tiny_llama(), sparsity=0.5), None, tmp_path / "sparse")
    for directory in (tiny_dir, sparse_dir):
        with pytest.raises(ValueError, match=message):
            load_model(str(_with_config(directory, **changes)))


def test_pickle_weights_are_refused(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    torch.save(make_tiny_llama().state_dict(), tiny_dir / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match=r"pytorch_model.bin: pickle files are not loaded; convert to "
                                                 r"safetensors"):
        load_model(str(tiny_dir))
