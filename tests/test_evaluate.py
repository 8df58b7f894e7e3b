"""Perplexity (Wanda convention), the `blocksparse eval` CLI, and model loading
(local directories, sparse-checkpoint dispatch, the embedded default model)."""

import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from blocksparse.cli import main
from blocksparse.integration import model as model_module
from blocksparse.integration.evaluate import count_windows, perplexity
from blocksparse.integration.model import ModelNotFoundError, check_block_divisible, load_model
from conftest import byte_tokenizer, make_tiny_llama


def reference_nll(model, tokens, seqlen, windows):
    """Window by window, token by token: -log p(t_i | t_<i) summed."""
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            window = tokens[w * seqlen:(w + 1) * seqlen]
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total -= sum(logprobs[i - 1, window[i]].item() for i in range(1, seqlen))
    return total


# ------------------------------------------------------------------- perplexity

def test_count_windows_drops_the_tail():
    assert count_windows(100, 32) == 3
    assert count_windows(96, 32) == 3
    assert count_windows(100, 32, max_windows=2) == 2
    assert count_windows(100, 32, max_windows=10) == 3
    with pytest.raises(ValueError, match="text has 31 tokens, fewer than one window of seqlen 32"):
        count_windows(31, 32)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        count_windows(100, 1)


def test_perplexity_matches_hand_computation(tiny_llama):
    tokens = torch.randint(0, 256, (1, 3 * 24 + 10))
    result = perplexity(tiny_llama, tokens, seqlen=24, progress=False)
    assert (result["windows"], result["tokens"]) == (3, 3 * 23)
    expected = reference_nll(tiny_llama, tokens[0], 24, 3)
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected / 69), rel=1e-5)
    # The tail (10 tokens) is dropped: changing it changes nothing.
    tokens[0, -10:] = (tokens[0, -10:] + 1) % 256
    assert perplexity(tiny_llama, tokens, seqlen=24, progress=False) == result


def test_perplexity_batching_and_max_windows(tiny_llama):
    tokens = torch.randint(0, 256, (5 * 16,))
    one = perplexity(tiny_llama, tokens, seqlen=16, progress=False)
    batched = perplexity(tiny_llama, tokens, seqlen=16, batch_size=2, progress=False)
    assert batched["windows"] == 5 and batched["nll"] == pytest.approx(one["nll"], rel=1e-5)
    first_two = perplexity(tiny_llama, tokens, seqlen=16, max_windows=2, progress=False)
    assert (first_two["windows"], first_two["tokens"]) == (2, 30)
    assert first_two["nll"] == pytest.approx(reference_nll(tiny_llama, tokens, 16, 2), rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size(tiny_llama):
    with torch.no_grad():
        tiny_llama.lm_head.weight.zero_()
    result = perplexity(tiny_llama, torch.randint(0, 256, (1, 64)), seqlen=32, progress=False)
    assert result["ppl"] == pytest.approx(256, rel=1e-6)


def test_perplexity_restores_training_mode_and_validates(tiny_llama):
    tiny_llama.train()
    perplexity(tiny_llama, torch.randint(0, 256, (40,)), seqlen=20, progress=False)
    assert tiny_llama.training
    with pytest.raises(ValueError, match=r"LongTensor \[1, T\] or \[T\], got torch.float32 \[2, 8\]"):
        perplexity(tiny_llama, torch.zeros(2, 8), seqlen=4, progress=False)
    with pytest.raises(ValueError, match="text has 10 tokens, fewer than one window of seqlen 20"):
        perplexity(tiny_llama, torch.randint(0, 256, (10,)), seqlen=20, progress=False)


# --------------------------------------------------------------------------- CLI

@pytest.fixture
def tiny_dir(tmp_path, tiny_llama):
    path = tmp_path / "tiny"
    tiny_llama.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")  # 360 bytes
    return path


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--seqlen", "--max-windows", "--max_windows", "--batch-size",
                 "--adapter", "--json"):
        assert flag in out


def test_cli_eval_writes_json_matching_perplexity(tiny_dir, text_file, tmp_path, tiny_llama, capsys):
    out_json = tmp_path / "result.json"
    code = main(["eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--seqlen", "64",
                 "--max_windows", "4", "--batch_size", "3", "--json", str(out_json), "--no-progress"])
    assert code == 0
    result = json.loads(out_json.read_text())
    tokens = torch.tensor(byte_tokenizer()(text_file.read_text()).input_ids)
    expected = perplexity(tiny_llama, tokens, seqlen=64, max_windows=4, progress=False)
    assert (result["windows"], result["tokens"]) == (4, 4 * 63)
    assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert (result["model"], result["dataset"], result["seqlen"]) == (str(tiny_dir), str(text_file), 64)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"ppl {expected['ppl']:.4f} | model {tiny_dir}") and "| 4 windows |" in line


@pytest.mark.parametrize("argv, message", [
    (["--model", "./no/such/model"], "model path './no/such/model' does not exist"),
    (["--dataset", "ptb"], "unknown dataset 'ptb'"),
    (["--seqlen", "1000"], "text has 360 tokens, fewer than one window of seqlen 1000"),
    (["--adapter", "/no/adapter"], "--adapter '/no/adapter' is not a PEFT adapter directory"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-windows", "0"], "max_windows must be >= 1 or None, got 0"),
])
def test_cli_errors_are_one_line(tiny_dir, text_file, capsys, argv, message):
    base = {"--model": str(tiny_dir), "--dataset": str(text_file), "--seqlen": "64"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    code = main(["eval", *[x for pair in base.items() for x in pair], "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]  # earlier lines: transformers' loading progress bar
    assert last.startswith("blocksparse eval: error: ") and message in last


def test_cli_c4_scores_256_windows_like_wanda(tiny_dir, tmp_path, monkeypatch):
    import datasets

    requests = []

    def load_dataset(path, name=None, data_files=None, split=None):
        requests.append((path, data_files, split))
        return datasets.Dataset.from_dict({"text": [f"validation document {i}." for i in range(1200)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out_json = tmp_path / "c4.json"
    assert main(["eval", "--model", str(tiny_dir), "--dataset", "c4", "--seqlen", "8", "--batch-size", "64",
                 "--json", str(out_json), "--no-progress"]) == 0
    assert requests == [("allenai/c4", {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation")]
    assert json.loads(out_json.read_text())["windows"] == 256


def test_cli_adapter_is_applied_unmerged(tiny_dir, text_file, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = make_tiny_llama()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tokens = torch.tensor(byte_tokenizer()(text_file.read_text()).input_ids)
    with_adapter = perplexity(peft_model, tokens, seqlen=64, progress=False)
    without = perplexity(make_tiny_llama(), tokens, seqlen=64, progress=False)
    assert abs(with_adapter["ppl"] - without["ppl"]) > 1e-3  # the adapter does something

    out_json = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--seqlen", "64",
                 "--adapter", str(adapter), "--json", str(out_json), "--no-progress"]) == 0
    assert json.loads(out_json.read_text())["ppl"] == pytest.approx(with_adapter["ppl"], rel=1e-5)

    from blocksparse.integration.evaluate import load_adapter
    loaded = load_adapter(make_tiny_llama(), str(adapter))
    assert isinstance(loaded, PeftModel)
    assert not any(getattr(m, "merged", False) for m in loaded.modules())
    assert any(hasattr(m, "lora_A") for m in loaded.modules())


# ---------------------------------------------------------------- model loading

def test_load_local_directory(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("Zürich").input_ids == byte_tokenizer()("Zürich").input_ids


def test_sparse_checkpoint_goes_through_load_sparse_pretrained(tiny_dir, monkeypatch):
    (tiny_dir / model_module.SPARSE_CHECKPOINT_MARKER).write_text("{}")
    calls = []
    fake = types.ModuleType("blocksparse.integration.checkpoint")

    def load_sparse_pretrained(path, dtype=None, device="cpu"):
        calls.append((path, dtype, device))
        return make_tiny_llama(seed=1), None  # no tokenizer saved: load_model reads the directory's

    fake.load_sparse_pretrained = load_sparse_pretrained
    monkeypatch.setitem(sys.modules, "blocksparse.integration.checkpoint", fake)
    model, tokenizer = load_model(str(tiny_dir), dtype=torch.float64)
    assert calls == [(str(tiny_dir), torch.float64, "cpu")]
    assert torch.equal(model.lm_head.weight, make_tiny_llama(seed=1).lm_head.weight.double())
    assert tokenizer("ab").input_ids == byte_tokenizer()("ab").input_ids


def test_cli_evaluates_a_real_sparse_checkpoint(tiny_llama, text_file, tmp_path):
    from blocksparse.integration import sparsify_model
    from blocksparse.integration.checkpoint import save_sparse_pretrained

    sparse = sparsify_model(tiny_llama, sparsity=0.5)
    save_sparse_pretrained(sparse, byte_tokenizer(), tmp_path / "sparse")
    tokens = torch.tensor(byte_tokenizer()(text_file.read_text()).input_ids)
    expected = perplexity(sparse, tokens, seqlen=64, progress=False)
    out_json = tmp_path / "r.json"
    assert main(["eval", "--model", str(tmp_path / "sparse"), "--dataset", str(text_file), "--seqlen", "64",
                 "--json", str(out_json), "--no-progress"]) == 0
    assert json.loads(out_json.read_text())["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)


def test_check_block_divisible_names_the_offenders():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=120,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"divide by block size 16; not divisible: "
                                         r"model.layers.0.mlp.gate_proj \[120, 64\], .*down_proj \[64, 120\]"):
        check_block_divisible(model)
    check_block_divisible(model, block_size=8)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "cache" / "thing"
    with pytest.raises(RuntimeError):
        with model_module.atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(final.parent.iterdir()) == []
    with model_module.atomic_directory(final) as tmp:
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
    check_block_divisible(model)
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
