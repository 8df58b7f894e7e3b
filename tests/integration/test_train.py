"""LoRA training on the HF Trainer: convergence against dense PEFT, frozen sparsity, resume, distillation."""

import peft
import pytest
import torch
from transformers import Trainer, TrainerCallback, default_data_collator, set_seed

from blocksparse import BlockSparseLinear, sparsify_model
from blocksparse.integration.peft import lora_config
from blocksparse.integration.train import NonFiniteTrainingError, TokenBlocks, train_lora, training_arguments
from helpers import make_tiny_llama

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
        assert now.keys() == state.keys() == {"sparse_weight.crow", "sparse_weight.col", "sparse_weight.values",
                                              "sparse_weight.row_perm", "sparse_weight.row_group", "bias"}
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


def test_a_nan_loss_stops_training_at_once_and_saves_nothing(tmp_path):
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    steps_run = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    with pytest.raises(NonFiniteTrainingError, match="training diverged: .* at step 1"):
        train_lora(model, memorisable_blocks(n=8), arguments(tmp_path, max_steps=4, save_steps=1), lora_config(),
                   callbacks=[CountSteps()])
    assert steps_run == [1] and not list(tmp_path.glob("checkpoint-*"))
