"""`blocksparse eval`: the CLI over perplexity, adapters and sparse checkpoints."""

import json

import pytest
import torch

from blocksparse.commands import main
from blocksparse.integration.evaluate import perplexity
from helpers import byte_tokenizer, make_tiny_llama


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


def test_cli_checks_the_device_and_the_json_path_before_the_work(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    from blocksparse.integration import model as model_module

    def no_work(*args, **kwargs):
        raise AssertionError("bad flags must be refused before the model is loaded")

    monkeypatch.setattr(model_module, "load_model", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, message in ((["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
                           (["--device", "bogus"], "--device 'bogus' is not a torch device"),
                           (["--json", str(tmp_path / "missing" / "x.json")], "missing' does not exist")):
        code = main(["eval", "--model", str(tiny_dir), "--dataset", str(text_file), *flags, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("blocksparse eval: error: ") and message in err[0], err


@pytest.mark.parametrize("config", [{"hidden_size": "abc"}, {"hidden_size": 10**9}])
def test_cli_refuses_a_bad_config_in_one_line(tiny_dir, text_file, capsys, config):
    (tiny_dir / "config.json").write_text(json.dumps({**json.loads((tiny_dir / "config.json").read_text()),
                                                      **config}))
    assert main(["eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"blocksparse eval: error: {tiny_dir / 'config.json'}"), err


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

    from blocksparse.integration.peft import load_adapter
    loaded = load_adapter(make_tiny_llama(), str(adapter))
    assert isinstance(loaded, PeftModel)
    assert not any(getattr(m, "merged", False) for m in loaded.modules())
    assert any(hasattr(m, "lora_A") for m in loaded.modules())


def test_cli_evaluates_a_real_sparse_checkpoint(tiny_llama, text_file, tmp_path):
    from blocksparse import sparsify_model
    from blocksparse.integration.checkpoint import save_sparse_pretrained

    sparse = sparsify_model(tiny_llama, sparsity=0.5)
    save_sparse_pretrained(sparse, byte_tokenizer(), tmp_path / "sparse")
    tokens = torch.tensor(byte_tokenizer()(text_file.read_text()).input_ids)
    expected = perplexity(sparse, tokens, seqlen=64, progress=False)
    out_json = tmp_path / "r.json"
    assert main(["eval", "--model", str(tmp_path / "sparse"), "--dataset", str(text_file), "--seqlen", "64",
                 "--json", str(out_json), "--no-progress"]) == 0
    assert json.loads(out_json.read_text())["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
