"""LoRA training of a block-sparse (or dense) model on the Hugging Face Trainer.

    peft_model, trainer, output = train_lora(model, token_blocks, training_arguments("out"), lora_config())

The block-sparse weights are buffers and never change; LoRA trains through
`block_sparse_linear`. `DistillTrainer` adds a KL term to a dense teacher. Under
torchrun the Trainer runs DDP (gloo on CPU): buffers are not re-broadcast each
step (the sparse structure is identical on every rank and frozen) and every
LoRA parameter is used, so `find_unused_parameters` is off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def train_lora(model, train_blocks: torch.Tensor, args, config=None, resume_from_checkpoint=None,
               teacher=None, distill_weight: float = 0.5, distill_temperature: float = 1.0,
               callbacks=None):
    """Wrap `model` (block-sparse or dense) with LoRA and train it on `train_blocks` [N, L].

    args: TrainingArguments (see `training_arguments`); config: a LoraConfig
    (default: the reference recipe), registered here for BlockSparseLinear.
    Returns (peft_model, trainer, train_output). The LoRA weights are drawn after
    seeding with `args.seed`, so runs with equal seeds start equal.
    """
    from transformers import default_data_collator, set_seed

    from .peft import get_peft_model, lora_config

    set_seed(args.seed)
    model.config.use_cache = False
    peft_model = get_peft_model(model, config if config is not None else lora_config())
    if getattr(args, "gradient_checkpointing", False):
        peft_model.enable_input_require_grads()
    trainer_cls, distill_cls = _trainer_class()
    kwargs = dict(model=peft_model, args=args, train_dataset=TokenBlocks(train_blocks),
                  data_collator=default_data_collator, callbacks=callbacks)
    if teacher is not None:
        trainer = distill_cls(teacher=teacher, distill_weight=distill_weight,
                              temperature=distill_temperature, **kwargs)
    else:
        trainer = trainer_cls(**kwargs)
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return peft_model, trainer, output
