"""The demo pipeline end to end, with tiny settings: a tiny Llama and a local text."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from blocksparse.commands import main
from blocksparse.commands.demo import run_demo
from blocksparse.dtypes import native_bf16
from blocksparse.integration.recipes import DEMO_RECIPE, RECOVERY_RECIPES, SEED_RECIPE
from blocksparse.integration.train import VALUES_FILE


@pytest.mark.parametrize("row_group, side_by_side", [(1, True), (2, False)])
def test_demo_runs_every_stage_and_writes_the_report(tiny_dir, corpus_file, tmp_path, row_group, side_by_side):
    model_dir, text = tiny_dir, corpus_file
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    results = run_demo(out, model_name=str(model_dir), dataset=str(text), sparsity=0.3, row_group=row_group,
                       seqlen=32, nsamples=4, eval_windows=3, steps=3, batch_size=2, train_seqlen=32, lora_r=4,
                       decode_tokens=2, side_by_side=side_by_side)
    assert torch.get_num_threads() == threads  # the threads given back after the side-by-side run
    for name in ("report.md", "results.json", "demo.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "seed_adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    # The side-by-side run reads the one-shot model from the checkpoint the demo writes.
    assert (out / "one_shot" / "blocksparse_config.json").is_file() == side_by_side
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["sparsity"] == 0.3
    # The recipe keeps layer 0's MLP and every v_proj dense; the rest meet the budget,
    # which is 70% of the tiny model's 288 blocks rounded to whole blocks.
    assert results["prune"]["total_density"] == pytest.approx(round(0.7 * 288) / 288)
    for stage in ("dense", "pruned", "seed_recovered", "recovered"):
        assert math.isfinite(saved[stage]["ppl"]) and saved[stage]["windows"] == 3
    # The demo's recipe and the seed's, at the same budget, each at its own rate.
    assert saved["recovery"]["recipe"] == DEMO_RECIPE and saved["seed_recovery"]["recipe"] == SEED_RECIPE
    for key, name in (("recovery", DEMO_RECIPE), ("seed_recovery", SEED_RECIPE)):
        assert saved[key]["train_tokens"] == 3 * 2 * 32
        assert saved[key]["learning_rate"] == RECOVERY_RECIPES[name]["lr"]
    assert saved["recovered"]["ppl"] != saved["seed_recovered"]["ppl"]
    # "auto" precision: bf16 autocast where this CPU computes bf16 natively, for both runs
    precision = "bf16" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "fp32"
    assert saved["settings"]["precision"] == precision
    assert saved["recovery"]["precision"] == saved["seed_recovery"]["precision"] == precision
    for kind in ("dense", "sparse", "dense_lora", "sparse_lora"):
        assert saved["latency"][kind]["prefill_s"] > 0 and saved["latency"][kind]["decode_tokens_per_s"] > 0
    report = (out / "report.md").read_text()
    assert f"| + recovery, `{DEMO_RECIPE}` (unmerged) |" in report and "demo.png" in report
    assert f"| + the seed's recipe, `{SEED_RECIPE}` (unmerged) |" in report
    assert "| decode (tokens/s), both + LoRA |" in report
    assert ("free masks" if row_group == 1 else "2 block rows per group sharing their columns") in report
    # Each stage's greedy samples, in the report as in results.json.
    found = saved["samples"]
    assert len(found["prompts"]) == 3 and all(len(found[k]) == 3 for k in ("dense", "pruned", "recovered"))
    assert "| prompt | dense | block-sparse (one-shot) | recovered |" in report
    assert " ".join(found["prompts"][0].split()) in report
    # Where the time went, stage by stage, adding up to no more than the whole run.
    seconds = saved["stage_seconds"]
    recovery = ({f"recovery ({SEED_RECIPE} and {DEMO_RECIPE}, side by side)"} if side_by_side else
                {f"recovery ({SEED_RECIPE})", f"recovery ({DEMO_RECIPE})"})
    assert set(seconds) == {"load", "perplexity", "samples", "prune", "latency"} | recovery
    assert saved["settings"]["side_by_side"] == side_by_side
    assert (", side by side" in report) == side_by_side
    assert all(t > 0 for t in seconds.values()) and sum(seconds.values()) <= saved["seconds"]
    assert seconds["prune"] == saved["prune"]["seconds"] and f"| prune | {seconds['prune']:.1f} |" in report


def test_a_recipe_that_trains_the_kept_blocks_saves_them_and_times_the_seed_adapter(tiny_dir, corpus_file,
                                                                                   tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out, model_name=str(tiny_dir), dataset=str(corpus_file), sparsity=0.3, seqlen=32,
                       nsamples=4, eval_windows=2, recipe="values_kd_hidden", steps=2, batch_size=1,
                       train_seqlen=32, decode_tokens=2, sample_tokens=2)
    values = load_file(out / "adapter" / VALUES_FILE)
    assert values and all(name.endswith("values") for name in values)
    assert not (out / "adapter" / "adapter_config.json").exists()  # no LoRA in this recipe
    assert (out / "seed_adapter" / "adapter_config.json").is_file()
    assert set(results["latency"]) == {"device", "dense", "sparse", "dense_lora", "sparse_lora"}
    assert math.isfinite(results["recovered"]["ppl"])

    without_seed = run_demo(tmp_path / "alone", model_name=str(tiny_dir), dataset=str(corpus_file), sparsity=0.3,
                            seqlen=32, nsamples=4, eval_windows=2, recipe="values_kd_hidden", seed_recipe=False,
                            steps=1, batch_size=1, train_seqlen=32, decode_tokens=2, sample_tokens=2)
    assert "seed_recovered" not in without_seed and set(without_seed["latency"]) == {"device", "dense", "sparse"}
    assert "both + LoRA" not in (tmp_path / "alone" / "report.md").read_text()


def test_cli_overrides_reach_the_recipe_and_not_the_seed_run(tiny_dir, corpus_file, tmp_path, monkeypatch):
    import blocksparse.commands.demo as demo

    calls, recover = [], demo.recover

    def recording(*args, **kwargs):
        calls.append((args[4], {k: kwargs.get(k) for k in ("learning_rate", "lora_r", "target_modules",
                                                           "precision")}))
        return recover(*args, **kwargs)

    monkeypatch.setattr(demo, "recover", recording)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(tiny_dir), "--dataset", str(corpus_file),
                 "--sparsity", "0.3", "--seqlen", "32", "--nsamples", "4", "--eval-windows", "2", "--steps", "2",
                 "--train-seqlen", "32", "--decode-tokens", "2", "--sample-tokens", "2", "--lora-r", "4",
                 "--target-modules", "q_proj,o_proj", "--learning-rate", "0.002", "--precision", "bf16"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {"q_proj", "o_proj"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["recovery"]["learning_rate"] == 0.002
    assert saved["seed_recovery"]["learning_rate"] == RECOVERY_RECIPES[SEED_RECIPE]["lr"]
    mine = [(DEMO_RECIPE, {"learning_rate": 0.002, "lora_r": 4, "target_modules": ("q_proj", "o_proj"),
                           "precision": "bf16"})]
    if saved["settings"]["side_by_side"]:  # the seed's run called recover() in its own process
        assert calls == mine
    else:
        assert calls == [(SEED_RECIPE, {"learning_rate": None, "lora_r": None, "target_modules": None,
                                        "precision": "bf16"})] + mine
    seed = json.loads((out / "seed_adapter" / "adapter_config.json").read_text())
    assert seed["r"] == 8 and seed["lora_alpha"] == 16 and set(seed["target_modules"]) == {"q_proj", "v_proj"}
    assert saved["seed_recovery"]["precision"] == "bf16"
    assert "bf16 autocast" in (out / "report.md").read_text()

    assert main(["demo", "--out", str(tmp_path / "bad"), "--model", str(tiny_dir), "--dataset", str(corpus_file),
                 "--target-modules", "q_proj,qkv"]) == 2  # refused before any pruning


def test_demo_cli_rejects_bad_input(capsys):
    assert main(["demo", "--sparsity", "1.0"]) == 2
    assert "--sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--learning_rate", "nan"]) == 2
    assert "--learning_rate must be a finite number, got nan" in capsys.readouterr().err
    assert main(["demo", "--recipe", "values_kd_hidden", "--lora_r", "8"]) == 2
    assert "recipe 'values_kd_hidden' trains no LoRA adapter" in capsys.readouterr().err
    assert main(["demo", "--learning_rate", "0"]) == 2
    assert "--learning_rate must be > 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--precision", "fp16"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    assert main(["demo", "--row_group", "0"]) == 2
    assert "--row_group must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--row_group", "1", "--union_density", "0.7"]) == 2
    assert "--union_density needs --row_group > 1" in capsys.readouterr().err
    assert main(["demo", "--row_group", "8", "--union_density", "0.3"]) == 2
    assert "in [1 - sparsity, 1] = [0.5, 1], got 0.3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--sparse_block_size", "0"])
    assert exit_info.value.code == 2 and "invalid choice: 0" in capsys.readouterr().err
