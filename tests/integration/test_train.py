"""Recovery training on the HF Trainer: LoRA against dense PEFT, frozen sparsity, resume, distillation
(logit KL, hidden states), training the kept block values."""

import peft
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, default_data_collator, set_seed

from blocksparse import BlockSparseLinear, sparsify_model
from blocksparse.integration.peft import lora_config
from blocksparse.integration.train import (VALUES_FILE, Distillation, NonFiniteTrainingError, TokenBlocks, hidden_mse,
                                           load_teacher_cache, logit_kl, save_teacher_cache, teacher_topk, topk_kl,
                                           train, training_arguments)
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
    _, trainer, _ = train(model, memorisable_blocks(), arguments(out), lora_config(lora_dropout=0.0))
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
    _, trainer, _ = train(model, memorisable_blocks(), arguments(tmp_path), lora_config(lora_dropout=0.0),
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
    peft_model, _, _ = train(model, memorisable_blocks(n=8), arguments(tmp_path, max_steps=4, save_steps=100),
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
        _, trainer, _ = train(model, memorisable_blocks(), arguments(tmp_path / str(weight), max_steps=1),
                              lora_config(lora_dropout=0.0), distillation=Distillation(teacher, kl_weight=weight))
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
        train(model, memorisable_blocks(n=8), arguments(tmp_path, max_steps=4, save_steps=1), lora_config(),
                   callbacks=[CountSteps()])
    assert steps_run == [1] and not list(tmp_path.glob("checkpoint-*"))


def test_logit_kl_and_hidden_mse_match_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    t = 2.0
    p = torch.softmax(teacher[:, :-1] / t, -1)
    by_hand = (p * (torch.log(p) - torch.log_softmax(student[:, :-1] / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(logit_kl(student, teacher, t), by_hand)
    hs = [torch.randn(2, 5, 3, generator=gen) for _ in range(3)]  # embeddings + two layers
    ht = [torch.randn(2, 5, 3, generator=gen) for _ in range(3)]
    by_hand = sum(((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(hs[1:], ht[1:])) / 2
    torch.testing.assert_close(hidden_mse(hs, ht), by_hand)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        Distillation(make_tiny_llama(), temperature=0.0)


def test_hidden_state_distillation_is_zero_against_an_identical_teacher_and_adds_to_ce(sparse_run, tmp_path):
    _, plain = sparse_run
    first = {}
    for hidden in (1.0, 3.0):  # LoRA B = 0 at step 1: student equals teacher, the hidden term is 0
        model = sparsify_model(make_tiny_llama(), sparsity=0.0)
        _, trainer, _ = train(model, memorisable_blocks(), arguments(tmp_path / str(hidden), max_steps=1),
                              lora_config(lora_dropout=0.0),
                              distillation=Distillation(make_tiny_llama(), kl_weight=0.0, hidden_weight=hidden))
        first[hidden] = losses(trainer)[0]
    assert first[1.0] == pytest.approx(plain[0], abs=1e-5) and first[3.0] == pytest.approx(plain[0], abs=1e-5)
    # Against another teacher: the first step's loss is CE + w * the mean layer MSE, computed by hand
    # on the one batch there is (both blocks; either order gives the same sums).
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    other = make_tiny_llama(seed=1)
    blocks = memorisable_blocks(n=2)
    with torch.no_grad():
        student = model(input_ids=blocks, labels=blocks, output_hidden_states=True)
        teacher = other(input_ids=blocks, output_hidden_states=True)
    by_hand = student.loss + 2.0 * hidden_mse(student.hidden_states, teacher.hidden_states)
    _, trainer, _ = train(model, blocks, arguments(tmp_path / "other", max_steps=1), lora_config(lora_dropout=0.0),
                          distillation=Distillation(other, kl_weight=0.0, hidden_weight=2.0))
    assert losses(trainer)[0] == pytest.approx(by_hand.item(), rel=1e-5)
    assert by_hand > student.loss + 1e-3  # the hidden term counts


def sparse_values(model) -> dict:
    return {name: m.sparse_weight for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}


@pytest.mark.parametrize("with_lora", [True, False])
def test_training_the_kept_blocks_keeps_the_structure(tmp_path, with_lora):
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    before = {name: (w.block_mask.clone(), w.values.detach().clone()) for name, w in sparse_values(model).items()}
    config = lora_config(lora_dropout=0.0) if with_lora else None
    trained, trainer, _ = train(model, memorisable_blocks(n=8), arguments(tmp_path, max_steps=3, save_steps=100),
                                config, train_sparse_values=True, values_learning_rate=1e-3)
    after = {name.removeprefix("base_model.model.").replace(".base_layer", ""): w
             for name, w in sparse_values(trained).items()}
    assert after.keys() == before.keys()
    for name, (mask, values) in before.items():
        assert torch.equal(after[name].block_mask, mask), f"{name}: the structure changed"
        assert after[name].values.shape == values.shape and not torch.equal(after[name].values, values)
    # The optimizer holds the kept values (at their own rate) and, with LoRA, the adapter; nothing else.
    groups = trainer.optimizer.param_groups
    held = {id(p) for g in groups for p in g["params"]}
    expected = {id(w.values) for w in after.values()} | (
        {id(p) for n, p in trained.named_parameters() if "lora_" in n} if with_lora else set())
    assert held == expected
    values_group = next(g for g in groups if any(p is next(iter(after.values())).values for p in g["params"]))
    assert values_group["initial_lr"] == 1e-3


def test_trained_values_resume_to_the_same_loss_curve(tmp_path):
    def run(out, **kw):
        model = sparsify_model(make_tiny_llama(), sparsity=0.5)
        return train(model, memorisable_blocks(), arguments(out), lora_config(lora_dropout=0.0),
                     train_sparse_values=True, values_learning_rate=1e-3, **kw)

    _, trainer, _ = run(tmp_path / "whole")
    uninterrupted = losses(trainer)
    assert (tmp_path / "whole" / "checkpoint-10" / VALUES_FILE).is_file()
    trained, resumed, _ = run(tmp_path / "whole", resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-10"))
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(uninterrupted), rtol=0, atol=1e-5)
    # Resuming a checkpoint without trained values is refused by name.
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    _, plain, _ = train(model, memorisable_blocks(n=8), arguments(tmp_path / "plain", max_steps=2, save_steps=2),
                        lora_config(lora_dropout=0.0))
    with pytest.raises(ValueError, match=f"holds no trained block values \\({VALUES_FILE}\\)"):
        train(sparsify_model(make_tiny_llama(), sparsity=0.5), memorisable_blocks(n=8),
              arguments(tmp_path / "plain", max_steps=4, save_steps=2), lora_config(lora_dropout=0.0),
              train_sparse_values=True, resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))


def test_what_cannot_be_trained_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="nothing to train"):
        train(make_tiny_llama(), memorisable_blocks(n=2), arguments("unused"), None)
    with pytest.raises(ValueError, match="has no BlockSparseLinear layer"):
        train(make_tiny_llama(), memorisable_blocks(n=2), arguments("unused"), None, train_sparse_values=True)
    with pytest.raises(ValueError, match="training the kept block values under FSDP is not supported"):
        train(make_tiny_llama(), memorisable_blocks(n=2), arguments("unused"), None, train_sparse_values=True,
              fsdp=True)
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))  # as under torchrun
    with pytest.raises(ValueError, match=r"fsdp needs TrainingArguments\(save_only_model=True\)"):
        train(make_tiny_llama(), memorisable_blocks(n=2), arguments("unused"), lora_config(), fsdp=True)


def test_topk_kl_is_the_full_kl_at_k_equal_the_vocabulary_and_renormalises_below_it():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 6, 9, generator=gen), torch.randn(2, 6, 9, generator=gen)
    full = teacher.topk(9, dim=-1)
    torch.testing.assert_close(topk_kl(student, full.values, full.indices.int(), 1.5), logit_kl(student, teacher, 1.5))
    top = teacher.topk(3, dim=-1)
    p = torch.softmax(top.values[:, :-1], -1)
    q = torch.log_softmax(student[:, :-1], -1).gather(-1, top.indices[:, :-1])
    torch.testing.assert_close(topk_kl(student, top.values, top.indices.int(), 1.0),
                               (p * (p.log() - q)).sum(-1).mean())


def test_a_full_teacher_cache_gives_the_live_teachers_loss_curve(tmp_path):
    blocks = memorisable_blocks(n=16)
    teacher = make_tiny_llama(seed=1)
    cache = teacher_topk(teacher, blocks, k=256)  # the whole vocabulary: exactly the live KL
    save_teacher_cache(cache, tmp_path / "cache.safetensors")
    curves = {}
    for name, distillation in (("live", Distillation(teacher, kl_weight=0.7)),
                               ("cached", Distillation(None, kl_weight=0.7,
                                                       cache=load_teacher_cache(tmp_path / "cache.safetensors",
                                                                                blocks)))):
        model = sparsify_model(make_tiny_llama(), sparsity=0.5)
        _, trainer, _ = train(model, blocks, arguments(tmp_path / name, max_steps=4, save_steps=100),
                              lora_config(lora_dropout=0.0), distillation=distillation)
        curves[name] = losses(trainer)
    torch.testing.assert_close(torch.tensor(curves["cached"]), torch.tensor(curves["live"]), rtol=1e-5, atol=1e-5)
    # A cache of more blocks serves their first rows; one of other blocks is refused by name.
    assert torch.equal(load_teacher_cache(tmp_path / "cache.safetensors", blocks[:5])["values"], cache["values"][:5])
    with pytest.raises(ValueError, match="computed for other token blocks"):
        load_teacher_cache(tmp_path / "cache.safetensors", memorisable_blocks(n=16, seed=3))
    with pytest.raises(ValueError, match="a teacher cache holds logits only"):
        Distillation(None, hidden_weight=1.0, cache=cache)


def test_the_lm_loss_without_logits_is_the_models_own_and_the_head_comes_back(tmp_path):
    from blocksparse.integration.train import _loss_head, _trainer_class

    model = peft.get_peft_model(sparsify_model(make_tiny_llama(), sparsity=0.5), lora_config(lora_dropout=0.0))
    assert _loss_head(model) is not None  # the path under test, not Hugging Face's
    with torch.no_grad():  # a nonzero adapter, so that its gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trainer = _trainer_class()(model=model, args=arguments(tmp_path), train_dataset=TokenBlocks(memorisable_blocks()),
                               data_collator=default_data_collator)
    head = model.get_base_model().get_output_embeddings()
    inputs = default_data_collator([trainer.train_dataset[i] for i in range(2)])
    inputs["labels"][0, :5] = -100
    trained = [p for p in model.parameters() if p.requires_grad]
    for num_items in (None, torch.tensor(40)):
        ours = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
        theirs = Trainer.compute_loss(trainer, model, dict(inputs), num_items_in_batch=num_items)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        for got, want in zip(torch.autograd.grad(ours, trained), torch.autograd.grad(theirs, trained)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert model.get_base_model().get_output_embeddings() is head
    smoothing = _trainer_class()(model=model, args=arguments(tmp_path, label_smoothing_factor=0.1),
                                 train_dataset=TokenBlocks(memorisable_blocks()), data_collator=default_data_collator)
    torch.testing.assert_close(smoothing.compute_loss(model, dict(inputs)),  # the Trainer's smoothed loss
                               Trainer.compute_loss(smoothing, model, dict(inputs)), rtol=0, atol=0)
    assert not torch.allclose(smoothing.compute_loss(model, dict(inputs)), trainer.compute_loss(model, dict(inputs)))
    broken = dict(inputs, input_ids=inputs["input_ids"][:, :0])  # the forward raises
    with pytest.raises(Exception):
        trainer.compute_loss(model, broken)
    assert model.get_base_model().get_output_embeddings() is head


def test_under_bf16_training_the_heads_products_run_in_bf16(tmp_path, monkeypatch):
    import blocksparse.integration.train as train_module

    seen, real = [], train_module.linear_cross_entropy

    def spy(hidden, weight, labels, num_items_in_batch=None):
        seen.append((weight.dtype, torch.is_autocast_enabled("cpu")))
        return real(hidden, weight, labels, num_items_in_batch)

    monkeypatch.setattr(train_module, "linear_cross_entropy", spy)
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    _, trainer, _ = train(model, memorisable_blocks(), arguments(tmp_path, max_steps=3, bf16=True, save_strategy="no"),
                          lora_config(lora_dropout=0.0))
    assert seen == [(torch.bfloat16, True)] * 3
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


@pytest.mark.parametrize("with_lora", [True, False])
def test_after_bf16_training_the_model_computes_in_its_own_dtype_and_caches_again(tmp_path, with_lora):
    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    assert model.config.use_cache
    trained, _, _ = train(model, memorisable_blocks(), arguments(tmp_path, max_steps=2, bf16=True, save_strategy="no"),
                          lora_config(lora_dropout=0.0) if with_lora else None, train_sparse_values=not with_lora)
    seen = []
    base = trained.get_base_model() if with_lora else trained
    layer = base.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.inference_mode():
        trained(input_ids=memorisable_blocks(n=1))
    handle.remove()
    assert seen == [torch.float32]  # accelerate's autocast wrapper gone: fp32 weights compute in fp32
    assert base.config.use_cache
    with torch.inference_mode():  # the model's own forward, transformers' decorators included
        assert isinstance(trained(input_ids=memorisable_blocks(n=1), return_dict=False), tuple)


def test_own_forward_scores_mid_run_in_the_models_dtype_and_training_goes_on_in_bf16(tmp_path):
    from blocksparse.integration.train import own_forward

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layer = model.get_base_model().model.layers[0].mlp.down_proj
            handle = layer.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
            with torch.inference_mode():
                model(input_ids=memorisable_blocks(n=1))  # as the Trainer runs it: bf16 autocast
                with own_forward(model):
                    model(input_ids=memorisable_blocks(n=1))
                model(input_ids=memorisable_blocks(n=1))  # the wrapper is back for the next step
            handle.remove()

    model = sparsify_model(make_tiny_llama(), sparsity=0.5)
    train(model, memorisable_blocks(), arguments(tmp_path, max_steps=2, bf16=True, save_strategy="no"),
          lora_config(lora_dropout=0.0), callbacks=[Probe()])
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16] * 2
    with own_forward(nn.Linear(2, 2)) as plain:  # a model no wrapper was put on: left as it is
        assert "forward" not in plain.__dict__
