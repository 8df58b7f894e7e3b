"""LoRA training of a block-sparse (or dense) model on the Hugging Face Trainer.

    peft_model, trainer, output = train_lora(model, token_blocks, training_arguments("out"), lora_config())

The block-sparse weights are buffers and never change; LoRA trains through
`block_sparse_linear`. `DistillTrainer` adds a KL term to a dense teacher. Under
torchrun the Trainer runs DDP (gloo on CPU): buffers are not re-broadcast each
step (the sparse structure is identical on every rank and frozen) and every
LoRA parameter is used, so `find_unused_parameters` is off.

A NaN or infinite loss or LoRA parameter stops training at once, without saving
that step, and `train_lora` raises NonFiniteTrainingError.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

# Written into every checkpoint-N after the Trainer has saved it: the run's `run_record`.
RUN_RECORD = "blocksparse_run.json"


class NonFiniteTrainingError(RuntimeError):
    """The loss or a trained parameter became NaN or infinite: training stopped, nothing worth keeping."""


class TokenBlocks(torch.utils.data.Dataset):
    """Causal-LM examples from a LongTensor [N, block_size]: labels = input_ids (the model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or blocks.dtype != torch.long or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty LongTensor [N, block_size], "
                             f"got {blocks.dtype} {list(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        row = self.blocks[index]
        return {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)}


def training_arguments(output_dir: str, **overrides):
    """TrainingArguments with this tool's defaults; `overrides` are TrainingArguments fields."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        num_train_epochs=1,
        warmup_steps=5,
        logging_steps=10,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=3,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every step
        ddp_broadcast_buffers=False,       # the frozen sparse structure is identical on all ranks
        logging_nan_inf_filter=False,      # the filter hides a NaN loss from the logs and the guard
        # Without a GPU, accelerate sets up torchrun's processes (gloo) only when told it runs on CPU.
        use_cpu=not torch.cuda.is_available(),
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """Trainer whose loss adds KL(teacher || student) over next-token distributions.

        loss = (1 - w) * CE + w * T^2 * KL(softmax(t/T) || softmax(s/T)), both per-token
        means over the micro-batch (so the Trainer scales them for accumulation).
        """

        loss_is_scaled_for_ga = False

        def __init__(self, *args, teacher=None, distill_weight=0.5, temperature=1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
            self.distill_weight = distill_weight
            self.temperature = temperature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                              attention_mask=inputs.get("attention_mask")).logits
            t = self.temperature
            student = F.log_softmax(outputs.logits[:, :-1].float() / t, dim=-1)
            teacher = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean() * t * t
            w = self.distill_weight
            loss = (1 - w) * outputs.loss + w * kl
            return (loss, outputs) if return_outputs else loss

    return Trainer, DistillTrainer


def _all_finite(params) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one device sync


def _callbacks():
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class StopOnNonFinite(TrainerCallback):
        """Stop at the first non-finite logged loss or trained parameter, and do not save that step.

        Both checks agree across DDP ranks: the logged loss is gathered over them, and the
        parameters take the same (all-reduced) step everywhere."""

        def __init__(self, params):
            self.params = params
            self.problem = None

        def _stop(self, control, problem):
            self.problem = self.problem or problem
            control.should_training_stop = True
            control.should_save = False

        def on_step_end(self, args, state, control, **kwargs):
            if not _all_finite(self.params):
                self._stop(control, f"non-finite LoRA parameters at step {state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                self._stop(control, f"loss {loss} at step {state.global_step}")

    class RecordRun(TrainerCallback):
        """Write the run record into each checkpoint once the Trainer has saved all of it."""

        def __init__(self, record):
            self.record = record

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
                with open(os.path.join(folder, RUN_RECORD), "w") as f:
                    json.dump(self.record, f, indent=2)

    return StopOnNonFinite, RecordRun


def train_lora(model, train_blocks: torch.Tensor, args, config=None, resume_from_checkpoint=None,
               teacher=None, distill_weight: float = 0.5, distill_temperature: float = 1.0,
               callbacks=None, run_record: dict | None = None):
    """Wrap `model` (block-sparse or dense) with LoRA and train it on `train_blocks` [N, L].

    args: TrainingArguments (see `training_arguments`); config: a LoraConfig
    (default: the reference recipe), registered here for BlockSparseLinear.
    run_record (JSON-able) goes into every checkpoint as RUN_RECORD.
    Returns (peft_model, trainer, train_output). The LoRA weights are drawn after
    seeding with `args.seed`, so runs with equal seeds start equal. Raises
    NonFiniteTrainingError when the loss or the LoRA parameters become NaN or inf.
    """
    from transformers import default_data_collator, set_seed

    from .peft import get_peft_model, lora_config

    set_seed(args.seed)
    model.config.use_cache = False
    peft_model = get_peft_model(model, config if config is not None else lora_config())
    if getattr(args, "gradient_checkpointing", False):
        peft_model.enable_input_require_grads()
    trainer_cls, distill_cls = _trainer_class()
    stop_on_non_finite, record_run = _callbacks()
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    guard = stop_on_non_finite(trained)
    callbacks = [guard, *(callbacks or []), *([record_run(run_record)] if run_record is not None else [])]
    kwargs = dict(model=peft_model, args=args, train_dataset=TokenBlocks(train_blocks),
                  data_collator=default_data_collator, callbacks=callbacks)
    if teacher is not None:
        trainer = distill_cls(teacher=teacher, distill_weight=distill_weight,
                              temperature=distill_temperature, **kwargs)
    else:
        trainer = trainer_cls(**kwargs)
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    problem = guard.problem
    if problem is None and not math.isfinite(output.training_loss):
        problem = f"mean training loss {output.training_loss}"
    if problem is None and not _all_finite(trained):
        problem = "non-finite LoRA parameters"
    if problem is not None:
        raise NonFiniteTrainingError(f"training diverged: {problem}")
    return peft_model, trainer, output
