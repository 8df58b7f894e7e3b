"""The demo pipeline end to end, with tiny settings: a tiny Llama and a local text."""

import json
import math

import pytest

from blocksparse.cli import main
from blocksparse.integration.demo import run_demo
from conftest import byte_tokenizer, make_tiny_llama

WORDS = ("the river city trade market bridge north south people history music school "
         "garden winter summer station library museum harbor valley").split()


@pytest.fixture
def tiny_model_and_text(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(4000)))
    return model_dir, text


def test_demo_runs_every_stage_and_writes_the_report(tiny_model_and_text, tmp_path):
    model_dir, text = tiny_model_and_text
    out = tmp_path / "demo"
    results = run_demo(out, model_name=str(model_dir), dataset=str(text), sparsity=0.3, seqlen=32,
                       nsamples=4, eval_windows=3, steps=3, batch_size=2, train_seqlen=32, lora_r=4,
                       decode_tokens=2)
    for name in ("report.md", "results.json", "demo.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["sparsity"] == 0.3
    # The recipe keeps layer 0's MLP and every v_proj dense; the rest meet the budget,
    # which is 70% of the tiny model's 288 blocks rounded to whole blocks.
    assert results["prune"]["total_density"] == pytest.approx(round(0.7 * 288) / 288)
    for stage in ("dense", "pruned", "lora"):
        assert math.isfinite(saved[stage]["ppl"]) and saved[stage]["windows"] == 3
    assert saved["finetune"]["train_tokens"] == 3 * 2 * 32
    for kind in ("dense", "sparse"):
        assert saved["latency"][kind]["prefill_s"] > 0 and saved["latency"][kind]["decode_tokens_per_s"] > 0
    report = (out / "report.md").read_text()
    assert "| block-sparse + LoRA (unmerged) |" in report and "demo.png" in report


def test_demo_cli_rejects_bad_input(capsys):
    assert main(["demo", "--sparsity", "1.0"]) == 2
    assert "--sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
