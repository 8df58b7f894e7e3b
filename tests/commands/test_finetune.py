"""`blocksparse finetune`: the CLI, resume, torchrun/DDP and the reference-workflow scripts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from blocksparse import sparsify_model
from blocksparse.commands import main as cli_main
from helpers import byte_tokenizer, make_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_model_and_text(tmp_path_factory, corpus_file):
    model_dir = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    return model_dir, corpus_file


def cli_flags(model_dir, text, out, **extra):
    """finetune's flags; an extra flag given as None is left out."""
    flags = {"--model-name-or-path": model_dir, "--dataset_name": text, "--block_size": 96,
             "--sparsity": 0.5, "--lora-r": 4, "--logging_steps": 1, "--max_eval_samples": 4,
             "--output_dir": out}
    flags.update(extra)
    return [str(a) for kv in flags.items() if kv[1] is not None for a in kv]


def test_cli_trains_saves_evaluates_and_resumes(tiny_model_and_text, tmp_path, capsys):
    model_dir, text = tiny_model_and_text
    out = tmp_path / "out"
    assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 4, "--save_steps": 2}),
                     "--eval_base"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "eval_results.json",
            "train_results.json", "checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(out))  # no pickle
    results = json.loads((out / "eval_results.json").read_text())
    assert results["steps"] == 4 and results["seqlen"] == 96 and results["lora"]["windows"] == 4
    assert 1.0 < results["perplexity"] < 1000 and 1.0 < results["base"]["ppl"] < 1000
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / "sparse_base")
    assert (out / "sparse_base" / "blocksparse_config.json").is_file()
    card = (out / "README.md").read_text()  # the adapter's card: this run's recipe and numbers
    assert f"LoRA adapter for `{out / 'sparse_base'}`" in card and "LoRA r=4," in card
    assert f"| base + this adapter | {results['lora']['ppl']:.2f} |" in card
    assert f"| base alone | {results['base']['ppl']:.2f} |" in card and "4 steps" in card
    assert "total density **0.5000**" in (out / "sparse_base" / "README.md").read_text()

    capsys.readouterr()
    assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 6})]) == 2
    assert "--resume_from_checkpoint last" in capsys.readouterr().err
    assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 6}),
                     "--resume-from-checkpoint", "last", "--no_eval"]) == 0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_cli_rejects_bad_input(tiny_model_and_text, tmp_path, capsys):
    model_dir, text = tiny_model_and_text
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path, **{"--lora_dropout": 1.5})]) == 2
    assert "--lora_dropout must be in [0, 1)" in capsys.readouterr().err
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path, **{"--target_modules": "nope"})]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path), "--fsdp", "--train_sparse_values"]) == 2
    assert "--train_sparse_values under FSDP is not supported yet" in capsys.readouterr().err
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path), "--fsdp", "--fp16"]) == 2
    assert "--fsdp with --fp16: the loss scaler would check for infs per rank" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    ({"--learning_rate": "nan"}, "--learning_rate must be a finite number, got nan"),
    ({"--lora_alpha": "inf"}, "--lora_alpha must be a finite number, got inf"),
    ({"--distill_temperature": "0"}, "--distill_temperature must be > 0, got 0.0"),
    ({"--output_dir": "FILE"}, "is a file; expected a directory"),
    ({"--distill_hidden_weight": "-1"}, "--distill_hidden_weight must be >= 0, got -1.0"),
    ({"--lora_r": "0"}, "--lora_r must be >= 1 (or 0 with --train_sparse_values: no adapter), got 0"),
    ({"--sparse_values_learning_rate": "1e-4"}, "--sparse_values_learning_rate needs --train_sparse_values"),
    ({"--teacher_cache_topk": "0"}, "--teacher_cache_topk must be >= 1, got 0"),
])
def test_cli_bad_flags_are_one_line_errors_before_any_work(tiny_model_and_text, tmp_path, capsys, flags, message):
    model_dir, text = tiny_model_and_text
    (tmp_path / "FILE").write_text("not a directory")
    flags = {key: str(tmp_path / value) if key == "--output_dir" else value for key, value in flags.items()}
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "out", **flags), "--distill"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blocksparse finetune: error: ") and message in err[0], err


@pytest.mark.parametrize("lora_r", [0, 4])
def test_cli_trains_the_kept_blocks_and_saves_them_as_the_sparse_base(tiny_model_and_text, tmp_path, lora_r):
    from transformers import AutoModelForCausalLM

    from blocksparse import BlockSparseLinear, sparsify_model
    from blocksparse.integration.checkpoint import load_sparse_pretrained

    model_dir, text = tiny_model_and_text
    out = tmp_path / "out"
    assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 3, "--save_steps": 2,
                                                                      "--lora_r": lora_r,
                                                                      "--sparse_values_learning_rate": 1e-3}),
                     "--train_sparse_values", "--distill", "--distill_hidden_weight", "0.5"]) == 0
    assert (out / "checkpoint-2" / "blocksparse_values.safetensors").is_file()
    assert (out / "adapter_model.safetensors").exists() == (lora_r > 0)
    base, _ = load_sparse_pretrained(out / "sparse_base")
    untrained = sparsify_model(AutoModelForCausalLM.from_pretrained(model_dir), sparsity=0.5)  # what --sparsity made
    ours = {n: m for n, m in base.named_modules() if isinstance(m, BlockSparseLinear)}
    theirs = {n: m for n, m in untrained.named_modules() if isinstance(m, BlockSparseLinear)}
    assert ours.keys() == theirs.keys() and ours
    for name, module in ours.items():  # same blocks, new values
        assert torch.equal(module.block_mask, theirs[name].block_mask)
        assert not torch.equal(module.sparse_weight.values, theirs[name].sparse_weight.values)
    results = json.loads((out / "eval_results.json").read_text())
    card = (out / "sparse_base" / "README.md").read_text()
    assert "## Sparse fine-tuning" in card and "3 steps, learning rate 0.001" in card
    if lora_r == 0:
        assert f"after it: **{results['trained']['ppl']:.2f}**" in card
    else:
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(out / "sparse_base")


def test_a_recipe_sets_the_defaults_and_explicit_flags_win(tiny_model_and_text, tmp_path, capsys):
    from blocksparse.integration.recipes import RECOVERY_RECIPES
    from blocksparse.integration.train import RUN_RECORD

    model_dir, text = tiny_model_and_text
    every = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    def run(out, **extra):
        assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--lora-r": None, "--max_steps": 2,
                                                                          "--save_steps": 2}, **extra),
                         "--no_eval"]) == 0
        record = json.loads((out / "checkpoint-2" / RUN_RECORD).read_text())
        return record, json.loads((out / "adapter_config.json").read_text())

    spec = RECOVERY_RECIPES["values_lora16_kd_hidden"]
    record, adapter = run(tmp_path / "recipe", **{"--recipe": "values_lora16_kd_hidden"})
    assert (record["recipe"], record["lora_r"], record["lora_alpha"]) == ("values_lora16_kd_hidden", 16, 32)
    assert record["learning_rate"] == spec["lr"]
    assert record["sparse_values_learning_rate"] == pytest.approx(spec["lr"] * spec["values_lr_ratio"])
    assert record["distill"] and record["train_sparse_values"]
    assert (record["distill_weight"], record["distill_hidden_weight"]) == (0.5, 1.0)
    assert set(adapter["target_modules"]) == every and adapter["r"] == 16
    assert adapter["lora_dropout"] == record["lora_dropout"] == spec["lora"]["dropout"] == 0.05
    assert (tmp_path / "recipe" / "checkpoint-2" / "blocksparse_values.safetensors").is_file()

    record, adapter = run(tmp_path / "override", **{"--recipe": "lora16", "--lora_r": 4, "--learning_rate": 5e-4,
                                                    "--target_modules": "q_proj,o_proj"})
    assert (record["lora_r"], record["lora_alpha"], record["learning_rate"]) == (4, 8, 5e-4)  # alpha / r kept
    assert not record["distill"] and not record["train_sparse_values"]
    assert set(adapter["target_modules"]) == {"q_proj", "o_proj"}
    assert adapter["lora_dropout"] == RECOVERY_RECIPES["lora16"]["lora"]["dropout"] == 0.0
    record, adapter = run(tmp_path / "dropout", **{"--recipe": "lora16", "--lora_dropout": 0.1})
    assert adapter["lora_dropout"] == 0.1

    record, adapter = run(tmp_path / "plain")  # no recipe: the reference workflow's defaults, as before
    assert (record["recipe"], record["lora_r"], record["lora_alpha"], record["learning_rate"]) == (None, 8, 16, 1e-4)
    assert adapter["lora_dropout"] == 0.05
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"} and not record["distill"]

    capsys.readouterr()  # the recipe is part of the run: resuming it under another is refused
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "plain", **{"--lora-r": None,
                                                                                   "--max_steps": 4}),
                     "--recipe", "lora16", "--resume_from_checkpoint", "last"]) == 2
    assert "--recipe None there, lora16 now" in capsys.readouterr().err
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "values", **{"--lora-r": None}),
                     "--recipe", "values_kd_hidden", "--eval_base"]) == 2
    assert "--lora_r 0 (--recipe values_kd_hidden) trains none" in capsys.readouterr().err


def test_cli_hidden_distillation_reads_the_teacher_in_the_checkpoints_channel_order(tiny_model_and_text, tmp_path,
                                                                                     monkeypatch, capsys):
    from blocksparse.integration import train as train_module

    model_dir, text = tiny_model_and_text
    pruned = tmp_path / "pruned"
    assert cli_main(["prune", "--model", str(model_dir), "--calib", str(text), "--nsamples", "2", "--seqlen", "64",
                     "--method", "wanda", "--refine-steps", "0", "--out", str(pruned), "--no-progress"]) == 0
    recorded = json.loads((pruned / "prune_report.json").read_text())["channel_permutation"]["hidden"]
    seen = []
    real = train_module.hidden_mse
    monkeypatch.setattr(train_module, "hidden_mse", lambda s, t, order=None: seen.append(order) or real(s, t, order))
    flags = cli_flags(pruned, text, tmp_path / "out", **{"--sparsity": None, "--max_steps": 1})
    assert cli_main(["finetune", *flags, "--distill", "--distill_hidden_weight", "1", "--no_eval"]) == 0
    assert seen and all(order.tolist() == recorded for order in seen)
    # A recorded order that is no permutation: one line, before training.
    report = json.loads((pruned / "prune_report.json").read_text())
    report["channel_permutation"]["hidden"] = recorded[:-1]
    (pruned / "prune_report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert cli_main(["finetune", *flags, "--distill", "--distill_hidden_weight", "1", "--no_eval",
                     "--overwrite_output_dir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "channel_permutation.hidden must be a permutation of 0..n-1, got 63 entries, 63 distinct" in err


def test_cli_teacher_cache_is_written_once_reused_and_refused_for_other_blocks(tiny_model_and_text, tmp_path,
                                                                                 capsys):
    model_dir, text = tiny_model_and_text
    cache = tmp_path / "teacher.safetensors"
    flags = ["--distill", "--teacher_cache", str(cache), "--teacher_cache_topk", "8", "--no_eval",
             "--overwrite_output_dir"]
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "a", **{"--max_steps": 2}), *flags]) == 0
    assert "teacher cache: top 8 logits" in capsys.readouterr().out
    assert load_file(cache)["values"].shape[-1] == 8
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "b", **{"--max_steps": 2}), *flags]) == 0
    assert "teacher cache" not in capsys.readouterr().out  # read, not recomputed
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "c", **{"--max_steps": 2,
                                                                                "--block_size": 80}), *flags]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars
    assert last.startswith("blocksparse finetune: error: ") and "computed for other token blocks" in last, last


def test_cli_sparse_block_size_must_be_a_supported_edge(tiny_model_and_text, tmp_path, capsys):
    model_dir, text = tiny_model_and_text
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "out", **{"--sparse_block_size": 0})])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("blocksparse finetune: error: ") and "invalid choice: 0" in last


def test_a_model_with_nan_weights_fails_and_saves_no_adapter(tmp_path, corpus_file, capsys):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    byte_tokenizer().save_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    assert cli_main(["finetune", *cli_flags(tmp_path / "nan", corpus_file, out, **{"--max_steps": 3, "--save_steps": 1}),
                     "--no_eval"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("blocksparse finetune: error: training diverged: ") and "at step 1" in last, last
    assert not (out / "adapter_model.safetensors").exists()
    assert not list(out.glob("checkpoint-*"))  # not even the NaN step's checkpoint


def test_parameters_that_overflow_after_a_finite_loss_fail_and_save_nothing(tiny_model_and_text, tmp_path, capsys):
    # Step 1's loss is finite; Adam's first step of ~1e39 per weight overflows fp32: the
    # parameter check at the step's end must stop it before the checkpoint of that step.
    model_dir, text = tiny_model_and_text
    out = tmp_path / "out"
    assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 3, "--save_steps": 1,
                                                                    "--learning_rate": 1e39, "--warmup_steps": 0}),
                     "--no_eval"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged: " in last and "at step 1" in last, last
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_overwrite_starts_afresh_and_last_is_the_newest_complete_checkpoint_of_this_run(tiny_model_and_text, tmp_path,
                                                                                         capsys):
    model_dir, text = tiny_model_and_text
    out = tmp_path / "out"

    def finetune(*extra, **flags):
        return cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--save_steps": 2, **flags}), "--no_eval",
                         *extra])

    assert finetune(**{"--max_steps": 4, "--lora-r": 2}) == 0  # an earlier run: checkpoint-2, checkpoint-4
    assert finetune("--overwrite_output_dir", **{"--max_steps": 2}) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the earlier run's are gone
    # A kill while saving leaves a checkpoint without trainer_state.json: `last` passes over it.
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "adapter_model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    assert finetune("--resume_from_checkpoint", "last", **{"--max_steps": 3, "--save_steps": 1}) == 0
    assert "checkpoint-9" in capsys.readouterr().out
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    # Other settings make another run: its checkpoints are not resumed.
    assert finetune("--resume_from_checkpoint", "last", **{"--max_steps": 4, "--lora-r": 2}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-3" in err[0] and "--lora_r 4 there, 2 now" in err[0], err


def test_resume_refuses_incomplete_checkpoints_in_one_line(tiny_model_and_text, tmp_path, capsys):
    model_dir, text = tiny_model_and_text
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)  # a kill during the only save
    (out / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"half")
    for resume, message in (("last", "no complete checkpoint-N directory in"),
                            (str(out / "checkpoint-5"), "is not a Trainer checkpoint directory (no trainer_state")):
        assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 2}), "--no_eval",
                         "--resume_from_checkpoint", resume]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (out / "adapter_model.safetensors").exists()


def torchrun(flags, processes=2):
    """`blocksparse finetune FLAGS` under torchrun on the CPU (gloo); fails the test unless it succeeds.
    --standalone: the rendezvous takes a free port (a fixed one may still be held by a run before)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "blocksparse", "finetune", *flags]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged_losses(checkpoint):
    return [entry["loss"] for entry in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
            if "loss" in entry]


def assert_same_trained_adapter(ours_dir, reference_dir):
    """The adapters two runs saved: the same 8 tensors (LoRA A/B on q, v of 2 layers), trained, equal within fp32."""
    ours = load_file(ours_dir / "adapter_model.safetensors")
    reference = load_file(reference_dir / "adapter_model.safetensors")
    assert ours.keys() == reference.keys() and len(ours) == 8
    for key in ours:
        assert not torch.equal(ours[key], torch.zeros_like(ours[key])), key
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


def test_torchrun_two_processes_train_like_one_process_with_twice_the_batch(tiny_model_and_text, tmp_path):
    # DDP averages the two ranks' gradients: with batch 1 per rank it must follow the
    # same trajectory as one process with batch 2 (the sampler hands out the same samples).
    model_dir, text = tiny_model_and_text
    common = {"--max_steps": 3, "--save_steps": 100, "--learning_rate": 1e-2, "--lora_dropout": 0.0}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert cli_main(["finetune", *cli_flags(model_dir, text, single, **common,
                                            **{"--per_device_train_batch_size": 2}), "--no_eval"]) == 0
    done = torchrun(cli_flags(model_dir, text, ddp, **common, **{"--per_device_train_batch_size": 1}) + ["--no_eval"])
    assert "world size 2" in done.stdout
    assert_same_trained_adapter(ddp, single)


def test_fsdp_ranks_train_like_one_process_with_twice_the_batch_teacher_and_accumulation_included(
        tiny_model_and_text, tmp_path):
    # FSDP reduce-scatters the mean gradient, so two ranks with batch 1 follow one process with
    # batch 2, through accumulated micro-batches (deferred reduction) and a sharded teacher. The
    # model is a sparse checkpoint and the teacher a dense safetensors directory: sharded, each
    # rank reads only its shards of both (`load_skeleton` + `fsdp.load_weights`); one process
    # loads them whole.
    from blocksparse.integration.checkpoint import save_sparse_pretrained
    from blocksparse.integration.model import load_model

    model_dir, text = tiny_model_and_text
    dense, tokenizer = load_model(str(model_dir))
    checkpoint = save_sparse_pretrained(sparsify_model(dense, sparsity=0.5), tokenizer, tmp_path / "sparse",
                                        report={"model": str(model_dir)})  # the teacher
    common = {"--max_steps": 3, "--save_steps": 3, "--learning_rate": 1e-2, "--lora_dropout": 0.0,
              "--gradient_accumulation_steps": 2, "--max_eval_samples": 2,  # logit KD: a per-token mean
              "--sparsity": None}
    model_dir = checkpoint
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert cli_main(["finetune", *cli_flags(model_dir, text, single, **common,
                                            **{"--per_device_train_batch_size": 2}), "--distill"]) == 0
    done = torchrun(cli_flags(model_dir, text, sharded, **common) + ["--distill", "--fsdp"])
    assert "world size 2 | FSDP: each rank holds 1/2" in done.stdout
    assert_same_trained_adapter(sharded, single)
    assert logged_losses(sharded / "checkpoint-3") == pytest.approx(logged_losses(single / "checkpoint-3"), rel=1e-5)
    # Every rank scored the held-out windows through the sharded model; rank 0 wrote them.
    ppl = json.loads((sharded / "eval_results.json").read_text())["perplexity"]
    assert ppl == pytest.approx(json.loads((single / "eval_results.json").read_text())["perplexity"], rel=1e-4)


def test_fsdp_checkpoints_are_sharded_safetensors_and_resume_exactly(tiny_model_and_text, tmp_path, capsys):
    model_dir, text = tiny_model_and_text
    common = {"--max_steps": 4, "--save_steps": 2, "--learning_rate": 1e-2, "--lora_dropout": 0.1}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(cli_flags(model_dir, text, whole, **common) + ["--fsdp", "--no_eval"])
    shards = sorted(os.listdir(whole / "checkpoint-2" / "fsdp"))
    assert shards == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors",
                      "state.json"]
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= set(os.listdir(whole / "checkpoint-2"))
    assert json.loads((whole / "checkpoint-2" / "fsdp" / "state.json").read_text())["world_size"] == 2
    assert len(load_file(whole / "checkpoint-2" / "adapter_model.safetensors")) == 8  # gathered: a usable adapter
    written = [name for _, _, files in os.walk(whole) for name in files]
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in written)  # no pickle
    # Cut after step 2 and resumed: the same adapter bit for bit (dropout draws restored per rank).
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "adapter_model.safetensors").unlink()
    torchrun(cli_flags(model_dir, text, resumed, **common)
             + ["--fsdp", "--no_eval", "--resume_from_checkpoint", "last"])
    ours, reference = load_file(resumed / "adapter_model.safetensors"), load_file(whole / "adapter_model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[key], reference[key]) for key in ours)
    assert logged_losses(resumed / "checkpoint-4") == logged_losses(whole / "checkpoint-4")
    # Without FSDP the sharded optimizer state would be lost: refused in one line.
    shutil.rmtree(resumed / "checkpoint-4")
    capsys.readouterr()
    assert cli_main(["finetune", *cli_flags(model_dir, text, resumed, **common), "--no_eval",
                     "--resume_from_checkpoint", "last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was saved by an FSDP run" in err[0], err


def test_bf16_mixed_precision_trains_an_fp32_model_through_the_op(tiny_model_and_text, tmp_path):
    # Autocast runs the block-sparse linears in bf16 as it runs nn.Linear; the adapter stays fp32.
    model_dir, text = tiny_model_and_text
    out = tmp_path / "bf16"
    assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 2, "--save_steps": 100}),
                     "--bf16"]) == 0
    adapter = load_file(out / "adapter_model.safetensors")
    assert len(adapter) == 8 and all(t.dtype == torch.float32 and bool(torch.isfinite(t).all())
                                     for t in adapter.values())
    assert any(not torch.equal(t, torch.zeros_like(t)) for key, t in adapter.items() if "lora_B" in key)
    assert 1.0 < json.loads((out / "eval_results.json").read_text())["perplexity"] < 1000


def test_scripts_train_then_evaluate_the_adapter_unmerged(tiny_model_and_text, tmp_path):
    model_dir, text = tiny_model_and_text
    out = tmp_path / "lora"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MODEL=str(model_dir), SPARSITY="0.5",
               DATASET=str(text), OUTPUT_DIR=str(out), BLOCK_SIZE="96", MAX_STEPS="2", LORA_R="4", LORA_ALPHA="8")
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "run_lora_finetune_block.sh"),
                           "--max_eval_samples", "3", "--save_steps", "100", "--eval_base"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((out / "eval_results.json").read_text())
    del env["MODEL"]  # the evaluation finds the sparse base through the adapter's config
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "evaluate_lora_block.sh")],
                          env=dict(env, SEQLEN="96", MAX_WINDOWS="3"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "ppl_corpus_96.json").read_text())
    assert result["windows"] == 3 and result["ppl"] == pytest.approx(trained["lora"]["ppl"], rel=1e-5)
    assert abs(trained["lora"]["ppl"] - trained["base"]["ppl"]) > 1e-3  # the adapter was applied



def test_a_sequence_length_that_looks_like_a_sparse_block_edge_is_refused(tiny_model_and_text, tmp_path, capsys):
    model_dir, text = tiny_model_and_text
    assert cli_main(["finetune", *cli_flags(model_dir, text, tmp_path / "out", **{"--block_size": 16})]) == 2
    err = capsys.readouterr().err
    assert "--block_size 16 is tokens per training sequence" in err and "--sparse_block_size" in err
    assert len(err.strip().splitlines()) == 1
