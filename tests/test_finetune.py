"""`blocksparse finetune`: convergence against dense PEFT, frozen sparsity, resume, CLI, torchrun/DDP."""

import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, default_data_collator, set_seed

from blocksparse import BlockSparseLinear
from blocksparse.cli import main as cli_main
from blocksparse.integration import sparsify_model
from blocksparse.integration.finetune import TokenBlocks, lora_config, train_lora, training_arguments
from conftest import byte_tokenizer, make_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


def memorisable_blocks(n=64, length=32, seed=0):
    """Windows at random offsets of one fixed token sequence: a tiny model can learn it in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 256, (length + 8,), generator=gen)
    offsets = torch.randint(0, 8, (n,), generator=gen)
    return torch.stack([text[o:o + length] for o in offsets])


def arguments(output_dir, **overrides):
    settings = dict(max_steps=STEPS, logging_steps=1, save_steps=10, learning_rate=1e-2, warmup_steps=0,
                    per_device_train_batch_size=2, disable_tqdm=True)
    settings.update(overrides)
    return training_arguments(str(output_dir), **settings)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """20 steps of LoRA through BlockSparseLinear at density 1 (checkpoint at step 10)."""
    out = tmp_path_factory.mktemp("sparse_run")
    model = sparsify_model(make_tiny_llama(), sparsity=0.0)
    _, trainer, _ = train_lora(model, memorisable_blocks(), arguments(out), lora_config(lora_dropout=0.0))
    return out, losses(trainer)


def test_loss_curve_matches_dense_peft_lora(sparse_run, tmp_path):
    _, ours = sparse_run
    args = arguments(tmp_path)
    model = make_tiny_llama()
    model.config.use_cache = False
    set_seed(args.seed)
    reference = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(model=reference, args=args, train_dataset=TokenBlocks(memorisable_blocks()),
                      data_collator=default_data_collator)
    trainer.train()
    theirs = losses(trainer)
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < ours[0] - 0.15, f"LoRA did not learn: {ours[0]:.3f} -> {ours[-1]:.3f}"
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=1e-5)


def test_resume_from_checkpoint_continues_the_loss_curve(sparse_run, tmp_path):
    out, uninterrupted = sparse_run
    steps_run = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    model = sparsify_model(make_tiny_llama(), sparsity=0.0)
    _, trainer, _ = train_lora(model, memorisable_blocks(), arguments(tmp_path), lora_config(lora_dropout=0.0),
                               resume_from_checkpoint=str(out / "checkpoint-10"), callbacks=[CountSteps()])
    assert steps_run == list(range(11, STEPS + 1))
    resumed = losses(trainer)  # the first 10 entries come back from the checkpoint's trainer_state
    assert len(resumed) == STEPS
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=0, atol=1e-5)


def test_training_never_changes_the_sparse_weights_or_the_bias(tmp_path):
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    for module in model.modules():  # a bias on every sparse layer, to see that it stays frozen
        if isinstance(module, BlockSparseLinear):
            module.bias = torch.nn.Parameter(torch.randn(module.out_features))
    before = {name: {key: t.clone() for key, t in m.state_dict().items()}
              for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    peft_model, _, _ = train_lora(model, memorisable_blocks(n=8), arguments(tmp_path, max_steps=4, save_steps=100),
                                  lora_config(lora_dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"]))
    after = {name.removeprefix("base_model.model.").replace(".base_layer", ""): m
             for name, m in peft_model.named_modules() if isinstance(m, BlockSparseLinear)}
    assert after.keys() == before.keys()
    for name, state in before.items():
        now = after[name].state_dict()
        assert now.keys() == state.keys() == {"sparse_weight.crow", "sparse_weight.col",
                                              "sparse_weight.values", "bias"}
        for key in state:  # bit-identical: values, structure (absent blocks stay absent), bias
            assert torch.equal(now[key], state[key]), f"{name}.{key} changed"
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapter did train


def test_distillation_loss_is_zero_against_an_identical_teacher_and_ce_at_weight_zero(sparse_run, tmp_path):
    # LoRA B starts at zero, so at step 1 the student equals its dense teacher: KL = 0.
    _, plain = sparse_run
    teacher = make_tiny_llama()
    first = {}
    for weight in (1.0, 0.0):
        model = sparsify_model(make_tiny_llama(), sparsity=0.0)
        _, trainer, _ = train_lora(model, memorisable_blocks(), arguments(tmp_path / str(weight), max_steps=1),
                                   lora_config(lora_dropout=0.0), teacher=teacher, distill_weight=weight)
        first[weight] = losses(trainer)[0]
    assert abs(first[1.0]) < 1e-5
    assert first[0.0] == pytest.approx(plain[0], abs=1e-5)


# ------------------------------------------------------------------ CLI and torchrun

@pytest.fixture(scope="module")
def tiny_model_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_llama().save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    words = ["block", "sparse", "kernel", "llama", "lora", "tile", "warp", "rank"]
    gen = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (1500,), generator=gen).tolist())
    (root / "text.txt").write_text(text)
    return root / "model", root / "text.txt"


def cli_flags(model_dir, text, out, **extra):
    flags = {"--model-name-or-path": model_dir, "--dataset_name": text, "--block_size": 32,
             "--sparsity": 0.5, "--lora-r": 4, "--logging_steps": 1, "--max_eval_samples": 4,
             "--output_dir": out}
    flags.update(extra)
    return [str(a) for kv in flags.items() for a in kv]


def test_cli_trains_saves_evaluates_and_resumes(tiny_model_and_text, tmp_path, capsys):
    model_dir, text = tiny_model_and_text
    out = tmp_path / "out"
    assert cli_main(["finetune", *cli_flags(model_dir, text, out, **{"--max_steps": 4, "--save_steps": 2}),
                     "--eval_base"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "eval_results.json",
            "train_results.json", "checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(out))  # no pickle
    results = json.loads((out / "eval_results.json").read_text())
    assert results["steps"] == 4 and results["seqlen"] == 32 and results["lora"]["windows"] == 4
    assert 1.0 < results["perplexity"] < 1000 and 1.0 < results["base"]["ppl"] < 1000
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / "sparse_base")
    assert (out / "sparse_base" / "blocksparse_config.json").is_file()

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


def test_torchrun_two_processes_train_like_one_process_with_twice_the_batch(tiny_model_and_text, tmp_path):
    # DDP averages the two ranks' gradients: with batch 1 per rank it must follow the
    # same trajectory as one process with batch 2 (the sampler hands out the same samples).
    model_dir, text = tiny_model_and_text
    common = {"--max_steps": 3, "--save_steps": 100, "--learning_rate": 1e-2, "--lora_dropout": 0.0}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert cli_main(["finetune", *cli_flags(model_dir, text, single, **common,
                                            **{"--per_device_train_batch_size": 2}), "--no_eval"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "blocksparse.cli", "finetune",
               *cli_flags(model_dir, text, ddp, **common, **{"--per_device_train_batch_size": 1}), "--no_eval"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout
    ours, reference = load_file(ddp / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert ours.keys() == reference.keys() and len(ours) == 8
    for key in ours:
        assert not torch.equal(ours[key], torch.zeros_like(ours[key])), key
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


def test_scripts_train_then_evaluate_the_adapter_unmerged(tiny_model_and_text, tmp_path):
    model_dir, text = tiny_model_and_text
    out = tmp_path / "lora"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MODEL=str(model_dir), SPARSITY="0.5",
               DATASET=str(text), OUTPUT_DIR=str(out), BLOCK_SIZE="32", MAX_STEPS="2", LORA_R="4", LORA_ALPHA="8")
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "run_lora_finetune_block.sh"),
                           "--max_eval_samples", "3", "--save_steps", "100", "--eval_base"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((out / "eval_results.json").read_text())
    del env["MODEL"]  # the evaluation finds the sparse base through the adapter's config
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "evaluate_lora_block.sh")],
                          env=dict(env, SEQLEN="32", MAX_WINDOWS="3"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "ppl_text_32.json").read_text())
    assert result["windows"] == 3 and result["ppl"] == pytest.approx(trained["lora"]["ppl"], rel=1e-5)
    assert abs(trained["lora"]["ppl"] - trained["base"]["ppl"]) > 1e-3  # the adapter was applied
