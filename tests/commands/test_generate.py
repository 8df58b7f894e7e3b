"""`blocksparse generate`: greedy text from dense and sparse models, adapters unmerged, --compare."""

import pytest

from blocksparse.commands import main
from blocksparse.integration.generation import Sampling, generate, generate_batch
from helpers import byte_tokenizer, make_tiny_llama


def test_greedy_generation_is_deterministic_and_matches_the_model(tiny_llama):
    tokenizer = byte_tokenizer()
    first = generate(tiny_llama, tokenizer, "the river", Sampling(max_new_tokens=8))
    again = generate(make_tiny_llama(), tokenizer, "the river", Sampling(max_new_tokens=8))
    assert first["text"] == again["text"] and first["new_tokens"] == 8
    # Greedy: each new token is the argmax of the model's next-token logits.
    ids = tokenizer("the river", return_tensors="pt")["input_ids"]
    expected = tiny_llama.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert first["text"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_left_padded_batch_writes_what_each_prompt_writes_alone():
    from helpers import prune_tiny

    tokenizer = byte_tokenizer()
    prompts = ["the river", "a", "winter mornings in the hills"]  # three lengths: two are padded
    for model in (make_tiny_llama(), prune_tiny(0.5)[0]):
        alone = [generate(model, tokenizer, p, Sampling(max_new_tokens=8))["text"] for p in prompts]
        assert generate_batch(model, tokenizer, prompts, Sampling(max_new_tokens=8)) == alone


def test_sampling_is_seeded():
    tokenizer, model = byte_tokenizer(), make_tiny_llama()
    runs = [generate(model, tokenizer, "the", Sampling(12, temperature=1.5, seed=s))["text"] for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def _sparse_checkpoint(tiny_dir, tmp_path):
    from blocksparse.integration.checkpoint import save_sparse_pretrained
    from helpers import prune_tiny

    model, report = prune_tiny(0.5)
    out = tmp_path / "pruned"
    save_sparse_pretrained(model, byte_tokenizer(), out, report={**report, "model": str(tiny_dir)})
    return out


def test_cli_streams_sparse_with_adapter_and_compares_with_dense(tiny_dir, tmp_path, capsys):
    from peft import LoraConfig

    from blocksparse.integration.model import load_model
    from blocksparse.integration.peft import get_peft_model

    pruned = _sparse_checkpoint(tiny_dir, tmp_path)
    model, _ = load_model(str(pruned))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tokenizer = byte_tokenizer()
    with_adapter = generate(peft_model, tokenizer, "the river", Sampling(max_new_tokens=6))["text"]
    alone = generate(load_model(str(pruned))[0], tokenizer, "the river", Sampling(max_new_tokens=6))["text"]
    dense = generate(make_tiny_llama(), tokenizer, "the river", Sampling(max_new_tokens=6))["text"]
    assert with_adapter != alone  # the adapter changes what the model writes

    assert main(["generate", "--model", str(pruned), "--adapter", str(adapter), "--prompt", "the river",
                 "--max-new-tokens", "6", "--compare"]) == 0
    out = capsys.readouterr().out
    assert with_adapter in out and dense in out
    assert f"--- {pruned} + {adapter}:" in out and f"--- {tiny_dir}:" in out
    assert "6 tokens in" in out and "tokens/s" in out


@pytest.mark.parametrize("argv, message", [
    ([], "give --prompt TEXT (repeatable) or --prompts FILE"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--prompt", "x", "--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--prompt", "x", "--top-p", "0.9"], "give --temperature > 0 with them"),
    (["--prompt", "x", "--dense", "/x"], "--dense names the model for --compare"),
    (["--prompts", "/no/file"], "--prompts '/no/file' is not a file"),
    (["--prompt", "x", "--adapter", "/no/adapter"], "is not a PEFT adapter directory"),
    (["--prompt", "x", "--compare"], "records no dense model it was pruned from (prune_report.json); give --dense"),
])
def test_cli_errors_are_one_line(tiny_dir, argv, message, capsys):
    assert main(["generate", "--model", str(tiny_dir)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_reads_prompts_from_a_file(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the river\n\nnorth south\n", encoding="utf-8")
    assert main(["generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 1: the river" in out and "=== prompt 2: north south" in out and "6 tokens in" in out
