"""Recovery training of a block-sparse (or dense) model on the Hugging Face Trainer.

    peft_model, trainer, output = train(model, token_blocks, training_arguments("out"), lora_config())

LoRA trains through `block_sparse_linear`; with `train_sparse_values` the kept
block values train too (or alone), their gradient taken at the stored blocks
only, so the structure never changes. `Distillation` adds a dense teacher's
logits (KL) and per-layer hidden states (SquareHead) to the loss. Under
torchrun the Trainer runs DDP (gloo on CPU): buffers are not re-broadcast each
step (the sparse structure is identical on every rank) and every trained
parameter is used, so `find_unused_parameters` is off. With `fsdp=True` it
runs FSDP2 instead (`blocksparse.integration.fsdp`): each rank holds its share
of the block values, the adapter and the optimizer state.

A NaN or infinite loss or trained parameter stops training at once, without
saving that step, and `train` raises NonFiniteTrainingError.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..prune.permute import check_order
from .lm_loss import linear_cross_entropy

# Written into every checkpoint-N after the Trainer has saved it: the run's `run_record`,
# and the trained block values when there are any (a PEFT checkpoint holds only the adapter).
RUN_RECORD = "blocksparse_run.json"
VALUES_FILE = "blocksparse_values.safetensors"


class NonFiniteTrainingError(RuntimeError):
    """The loss or a trained parameter became NaN or infinite: training stopped, nothing worth keeping."""


class TokenBlocks(torch.utils.data.Dataset):
    """Causal-LM examples from a LongTensor [N, block_size]: labels = input_ids (the model shifts).
    With a teacher cache (`teacher_topk`), each example carries its rows of it."""

    def __init__(self, blocks: torch.Tensor, teacher_cache: dict | None = None):
        if blocks.dim() != 2 or blocks.dtype != torch.long or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty LongTensor [N, block_size], "
                             f"got {blocks.dtype} {list(blocks.shape)}")
        if teacher_cache is not None:
            check_teacher_cache(teacher_cache, blocks)
        self.blocks, self.cache = blocks, teacher_cache

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        row = self.blocks[index]
        example = {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)}
        if self.cache is not None:
            example.update(teacher_values=self.cache["values"][index], teacher_indices=self.cache["indices"][index])
        return example


@torch.no_grad()
def teacher_topk(teacher: nn.Module, blocks: torch.Tensor, k: int, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """The teacher cache: `teacher`'s k largest next-token logits at every position of `blocks`
    [N, L] and their token ids, computed once so every epoch and recipe reuses them:
    {"input_ids": [N, L], "values": [N, L, k] fp32, "indices": [N, L, k] int32}, k * 8 bytes
    a token (64: 512 B, 160k tokens 82 MB)."""
    from tqdm.auto import tqdm

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = next(teacher.parameters()).device
    teacher.eval()
    values, indices = [], []
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="teacher cache", unit="batch"):
        logits = teacher(input_ids=blocks[start:start + batch_size].to(device)).logits.float()
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    return {"input_ids": blocks.clone(), "values": torch.cat(values), "indices": torch.cat(indices)}


def check_teacher_cache(cache: dict, blocks: torch.Tensor) -> None:
    """Raise ValueError unless `cache` (as `teacher_topk` makes it) is one of `blocks` [N, L]."""
    missing = {"input_ids", "values", "indices"} - set(cache)
    if missing:
        raise ValueError(f"teacher cache: missing {', '.join(sorted(missing))}")
    ids, values, indices = cache["input_ids"], cache["values"], cache["indices"]
    if tuple(ids.shape) != tuple(blocks.shape) or not torch.equal(ids, blocks):
        raise ValueError(f"teacher cache: it was computed for other token blocks ({list(ids.shape)}), not these "
                         f"{list(blocks.shape)}; delete it to recompute")
    if values.shape != indices.shape or values.shape[:2] != blocks.shape or values.dim() != 3:
        raise ValueError(f"teacher cache: values {list(values.shape)} and indices {list(indices.shape)} must both "
                         f"be [{blocks.shape[0]}, {blocks.shape[1]}, k]")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("teacher cache: its logits hold NaN or inf")


def save_teacher_cache(cache: dict, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in cache.items()}, str(path))


def load_teacher_cache(path: str | os.PathLike, blocks: torch.Tensor) -> dict:
    """A saved teacher cache, checked against `blocks`; a cache of more blocks whose first rows
    are these serves them (a shorter run over the same text)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cache = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"teacher cache {path}: not a readable safetensors file ({err})") from err
    n = blocks.shape[0]
    if all(name in cache for name in ("input_ids", "values", "indices")) and cache["input_ids"].shape[0] > n:
        cache = {name: t[:n] for name, t in cache.items()}
    try:
        check_teacher_cache(cache, blocks)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return cache


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


@dataclass(frozen=True)
class Distillation:
    """Distillation from a dense teacher, added to the LM loss:

    loss = (1 - kl_weight) * CE + kl_weight * T^2 * KL(softmax(t/T) || softmax(s/T))
           + hidden_weight * mean over decoder layers of ||h_s - h_t||^2 / ||h_t||^2

    (the second term is Minitron's logit KD; the third SquareHead's normalised
    per-layer MSE over the layers' output hidden states). Per-token means over the
    micro-batch, so the Trainer scales them for accumulation."""

    teacher: nn.Module | None
    kl_weight: float = 0.5
    temperature: float = 1.0
    hidden_weight: float = 0.0
    # The teacher's top-k logits of the training blocks (`teacher_topk`): the KL term then
    # runs over the cached top-k instead of a live teacher forward.
    cache: dict | None = None
    # The student's hidden channel k is the teacher's channel hidden_order[k] (a checkpoint
    # pruned with permuted channels: `checkpoint.hidden_channel_order`); None: the same order.
    hidden_order: torch.Tensor | None = None

    def __post_init__(self):
        if self.teacher is None and (self.cache is None or self.hidden_weight > 0):
            raise ValueError("distillation needs the teacher model (a teacher cache holds logits only, "
                             "not the hidden states)" if self.cache is not None else
                             "distillation needs a teacher model or a teacher cache")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"kl_weight must be in [0, 1], got {self.kl_weight}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            raise ValueError(f"hidden_weight must be a finite number >= 0, got {self.hidden_weight}")
        order = self.hidden_order
        if order is not None:
            check_order(order, "hidden_order")
            hidden_size = getattr(getattr(self.teacher, "config", None), "hidden_size", None)
            if hidden_size is not None and len(order) != hidden_size:
                raise ValueError(f"hidden_order orders {len(order)} channels; the teacher has {hidden_size}")


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per next-token position, averaged (the last
    position predicts no label and is left out, as the LM loss leaves it)."""
    t = temperature
    student = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean() * t * t


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """`logit_kl` against a teacher cache: the teacher's distribution renormalised over its
    cached top k, the student's full-vocabulary log-probabilities at those ids (with k = the
    vocabulary size, exactly `logit_kl`)."""
    t = temperature
    student = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1).gather(-1, indices[:, :-1].long())
    teacher = F.log_softmax(values[:, :-1].float() / t, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * t * t


def hidden_mse(student_hidden, teacher_hidden, order: torch.Tensor | None = None) -> torch.Tensor:
    """SquareHead: per decoder layer ||h_s - h_t||^2 / ||h_t||^2 over the micro-batch,
    averaged over the layers (HF's hidden_states[1:], the layers' outputs); the teacher's
    channels taken in `order` first (`Distillation.hidden_order`)."""
    teacher_hidden = teacher_hidden[1:]
    if order is not None:
        order = order.to(teacher_hidden[0].device)
        teacher_hidden = [t.index_select(-1, order) for t in teacher_hidden]
    losses = [(s.float() - t.float()).square().sum() / t.float().square().sum().clamp_min(1e-12)
              for s, t in zip(student_hidden[1:], teacher_hidden, strict=True)]
    return torch.stack(losses).mean()


def _trainer_class():
    import contextlib

    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from . import fsdp

    class RecoveryTrainer(Trainer):
        """Trainer with optional distillation (`Distillation`), the trained block values (if
        any) in their own optimizer group at their own learning rate, and FSDP2 (`sharded`:
        the model, and the teacher if any, were `fsdp.shard_model`ed, as `train` does). A
        sharded model is marked as sharded before the Trainer sees it, which keeps accelerate
        from wrapping it in DDP; its checkpoints are written and read here
        (`fsdp.save_sharded`), since the Trainer's own would hold DTensors. These overrides
        are of Trainer methods as of transformers 5.24 (tests: tests/commands/test_finetune.py,
        FSDP cases)."""

        def __init__(self, *args, distillation: Distillation | None = None, values=(),
                     values_learning_rate: float | None = None, sharded: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.sharded = sharded
            self.distillation = distillation
            if distillation is not None:
                if distillation.teacher is not None:
                    distillation.teacher.eval().requires_grad_(False)
                    if not sharded:  # sharded, `train` has placed it
                        distillation.teacher.to(self.args.device)
                # Its loss is a per-micro-batch mean: the Trainer scales it for accumulation.
                self.loss_is_scaled_for_ga = False
            self.values, self.values_learning_rate = list(values), values_learning_rate
            self._head_copy = None

        def _save(self, output_dir=None, state_dict=None):
            if not self.sharded:
                return super()._save(output_dir, state_dict)
            output_dir = output_dir or self.args.output_dir
            state = fsdp.full_trainable_state(self.model)  # every rank takes part; rank 0 gets it
            if self.is_world_process_zero():  # not `should_save`: with save_on_each_node others hold {}
                os.makedirs(output_dir, exist_ok=True)
                self.model.save_pretrained(output_dir, state_dict=state)

        def _save_checkpoint(self, model, trial):
            # The shards first: the Trainer's part ends with trainer_state.json (what marks a
            # checkpoint complete) and then deletes the older checkpoints.
            if self.sharded:
                folder = os.path.join(self._get_output_dir(trial=trial),
                                      f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                fsdp.save_sharded(folder, self.model, self.optimizer, self.lr_scheduler)
            super()._save_checkpoint(model, trial)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not self.sharded:  # else the weights come with the optimizer state, once it exists
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if not self.sharded:
                if checkpoint is not None and os.path.isdir(os.path.join(checkpoint, fsdp.SHARDED_DIR)):
                    raise ValueError(f"{checkpoint} was saved by an FSDP run (its optimizer state is in "
                                     f"{fsdp.SHARDED_DIR}/): resume it with --fsdp under torchrun, 2 or more processes")
                return super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None:
                fsdp.load_sharded(checkpoint, self.model, self.optimizer, self.lr_scheduler)

        def _load_rng_state(self, checkpoint):
            if not self.sharded:
                return super()._load_rng_state(checkpoint)
            if checkpoint is not None:
                fsdp.load_rng(checkpoint)

        @contextlib.contextmanager
        def _defer_fsdp_gradient_reduction(self):
            # The Trainer's version reads a transformers DistributedConfig this model has not.
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if self.values and self.values_learning_rate is not None and not optimizer.state:
                ids = {id(p) for p in self.values}
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in ids]
                optimizer.add_param_group({"params": self.values, "lr": self.values_learning_rate,
                                           "weight_decay": 0.0})
            return optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            d = self.distillation
            if d is None:
                # Label smoothing or a custom loss function: the Trainer's own path.
                own = return_outputs or self.sharded or self.label_smoother is not None or self.compute_loss_func
                head = None if own else _loss_head(self.accelerator.unwrap_model(model))
                if head is None:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                return self._lm_loss(model, inputs, num_items_in_batch, *head)
            hidden = d.hidden_weight > 0
            cached = inputs.pop("teacher_values", None), inputs.pop("teacher_indices", None)
            outputs = model(**inputs, output_hidden_states=hidden)
            teacher = None
            if hidden or (d.kl_weight > 0 and cached[0] is None):
                with torch.no_grad():
                    teacher = d.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                        output_hidden_states=hidden)
            loss = outputs.loss
            if d.kl_weight > 0:
                kl = (topk_kl(outputs.logits, *cached, d.temperature) if cached[0] is not None
                      else logit_kl(outputs.logits, teacher.logits, d.temperature))
                loss = (1 - d.kl_weight) * loss + d.kl_weight * kl
            if hidden:
                loss = loss + d.hidden_weight * hidden_mse(outputs.hidden_states, teacher.hidden_states,
                                                           d.hidden_order)
            return (loss, outputs) if return_outputs else loss

        def _lm_loss(self, model, inputs, num_items_in_batch, base, lm_head):
            # The model's own loss by `linear_cross_entropy`, without a logits tensor: for the
            # forward the head is an identity, so the "logits" are the final hidden states. The
            # Trainer's num_items_in_batch and token-averaging rules as its compute_loss applies
            # them to the model's loss.
            base.set_output_embeddings(nn.Identity())
            try:
                hidden = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            finally:
                base.set_output_embeddings(lm_head)
            counted = num_items_in_batch if self.model_accepts_loss_kwargs else None
            with self.accelerator.autocast():  # the head's products in the mixed precision the forward ran in
                weight, device = lm_head.weight, hidden.device.type
                if torch.is_autocast_enabled(device) and not weight.requires_grad:
                    # The frozen head's autocast copy, made again only when the weight changes.
                    key = (weight.data_ptr(), weight._version, torch.get_autocast_dtype(device))
                    if self._head_copy is None or self._head_copy[0] != key:
                        self._head_copy = key, weight.detach().to(key[2])
                    weight = self._head_copy[1]
                loss = linear_cross_entropy(hidden, weight, inputs["labels"], counted)
            if self.args.average_tokens_across_devices and counted is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss

    return RecoveryTrainer


def _loss_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(the causal LM, its lm_head) where the logits are lm_head(final hidden states), a
    plain linear (a family of blocksparse.families: no logit scaling or soft-capping), so
    `linear_cross_entropy` computes the model's loss; else None."""
    from ..families import FAMILIES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in FAMILIES:
        return None
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return base, head


def _all_finite(params) -> bool:
    """Whether every parameter is finite: one device sync, and under FSDP one all-reduce, so
    that every rank sees the same answer (each checks its own shards)."""
    from .fsdp import local_tensor

    params = list(params)
    finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in params]).all()
    if any(hasattr(p, "to_local") for p in params):
        import torch.distributed as dist

        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag
    return bool(finite)


def trained_block_values(model: nn.Module) -> dict[str, nn.Parameter]:
    """The block values of `model`'s BlockSparseLinear layers that are being trained, by name."""
    return {name: p for name, p in model.named_parameters() if name.endswith("sparse_weight.values") and p.requires_grad}


def load_block_values(model: nn.Module, checkpoint: str) -> None:
    """Copy the trained block values a checkpoint holds (VALUES_FILE) into `model`, in place
    (the optimizer keeps its parameters); names, shapes and dtypes must match."""
    from safetensors.torch import load_file

    path = os.path.join(checkpoint, VALUES_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint} holds no trained block values ({VALUES_FILE}): it comes from a run "
                         "that did not train them")
    saved, ours = load_file(path), trained_block_values(model)
    if saved.keys() != ours.keys():
        differ = sorted(saved.keys() ^ ours.keys())
        raise ValueError(f"{path}: its block values are not this model's ({len(differ)} names differ, "
                         f"e.g. {differ[0]!r})")
    for name, p in ours.items():
        if saved[name].shape != p.shape or saved[name].dtype != p.dtype:
            raise ValueError(f"{path}: {name} is {saved[name].dtype} {list(saved[name].shape)}, the model's "
                             f"{p.dtype} {list(p.shape)}")
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(saved[name])


def _callbacks():
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class StopOnNonFinite(TrainerCallback):
        """Stop at the first non-finite logged loss or trained parameter, and do not save that step.

        Both checks agree across DDP ranks: the logged loss is gathered over them, and the
        parameters take the same (all-reduced) step everywhere."""

        def __init__(self, model):
            self.model = model
            self.problem = None

        def trained(self) -> list:
            return [p for p in self.model.parameters() if p.requires_grad]

        def _stop(self, control, problem):
            self.problem = self.problem or problem
            control.should_training_stop = True
            control.should_save = False

        def on_step_end(self, args, state, control, **kwargs):
            if not _all_finite(self.trained()):
                self._stop(control, f"non-finite trained parameters at step {state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                self._stop(control, f"loss {loss} at step {state.global_step}")

    class RecordRun(TrainerCallback):
        """Write the run record and the trained block values (a PEFT checkpoint holds only the
        adapter) into each checkpoint once the Trainer has saved all of it."""

        def __init__(self, model, record):
            self.model, self.record = model, record

        def on_save(self, args, state, control, **kwargs):
            from safetensors.torch import save_file

            if state.is_world_process_zero:
                folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
                values = trained_block_values(self.model)
                if values:
                    save_file({name: p.detach().contiguous().cpu() for name, p in values.items()},
                              os.path.join(folder, VALUES_FILE))
                if self.record is not None:  # last: it marks the checkpoint complete
                    with open(os.path.join(folder, RUN_RECORD), "w") as f:
                        json.dump(self.record, f, indent=2)

    return StopOnNonFinite, RecordRun


# Where accelerate keeps a model's own forward while its mixed-precision wrapper replaces it.
_ORIGINAL_FORWARD = "_original_forward"


@contextlib.contextmanager
def own_forward(model: nn.Module):
    """`model` computing in its own dtype inside the block, as `train` returns it: the
    mixed-precision wrapper accelerate puts on the forward during a bf16/fp16 run (autocast,
    outputs cast to fp32) set aside, e.g. to score the model mid-run in its own precision."""
    original = model.__dict__.get(_ORIGINAL_FORWARD)
    if original is None:  # no mixed precision: nothing wraps the forward
        yield model
        return
    wrapped = model.forward
    model.forward = original
    try:
        yield model
    finally:
        model.forward = wrapped


def train(model, train_blocks: torch.Tensor, args, lora=None, *, train_sparse_values: bool = False,
          values_learning_rate: float | None = None, distillation: Distillation | None = None,
          resume_from_checkpoint=None, callbacks=None, run_record: dict | None = None, fsdp: bool = False,
          weights_from: str | None = None, teacher_weights_from: str | None = None):
    """Train `model` (block-sparse or dense) on `train_blocks` [N, L]: a LoRA adapter
    (`lora`, a LoraConfig, registered here for BlockSparseLinear), the kept block values
    (`train_sparse_values`: every BlockSparseLinear's values, structure fixed, at
    `values_learning_rate`, default args.learning_rate), or both; nothing else trains.

    args: TrainingArguments (see `training_arguments`); distillation: a dense teacher
    and the loss weights (`Distillation`). run_record (JSON-able) goes into every
    checkpoint as RUN_RECORD, the trained block values as VALUES_FILE (resumed from
    there). fsdp: with several processes (torchrun), shard the model (and the teacher) with
    FSDP2 (`blocksparse.integration.fsdp`); needs args.save_only_model there, as the optimizer
    state is saved sharded by that module, not by the Trainer (one process: no effect). LoRA
    only: trained block values are saved whole, which is not built under FSDP. weights_from:
    with fsdp on several ranks, `model` is `model.load_skeleton(weights_from)` and each rank
    reads its own shards of that checkpoint once the model is sharded (teacher_weights_from:
    the same for the distillation teacher, which is sharded too). Returns
    (model, trainer, train_output), model the PeftModel when `lora` is given (sharded with
    `fsdp`). LoRA weights are drawn after seeding with `args.seed`, so runs with equal
    seeds start equal. Raises NonFiniteTrainingError when the loss or a trained
    parameter becomes NaN or inf.
    """
    from transformers import default_data_collator, set_seed

    from ..nn import BlockSparseLinear
    from .peft import get_peft_model

    if lora is None and not train_sparse_values:
        raise ValueError("nothing to train: give a LoRA config, train_sparse_values=True, or both")
    if fsdp and train_sparse_values:
        raise ValueError("fsdp trains LoRA adapters; training the kept block values under FSDP is not supported yet")
    sharded = fsdp and args.world_size > 1
    if (weights_from is not None or teacher_weights_from is not None) and not sharded:
        raise ValueError("weights_from fills a sharded skeleton: it needs fsdp on several processes")
    if sharded and not args.save_only_model:
        raise ValueError("fsdp needs TrainingArguments(save_only_model=True): the optimizer state is saved "
                         "sharded (blocksparse.integration.fsdp), not by the Trainer")
    if sharded and args.fp16:
        raise ValueError("fsdp with fp16: the loss scaler would check for infs per rank, not over the shards; "
                         "use bf16")
    set_seed(args.seed)
    use_cache = model.config.use_cache
    model.config.use_cache = False
    if lora is not None:
        model = get_peft_model(model, lora)  # freezes everything but the adapter
    else:
        model.requires_grad_(False)
    if train_sparse_values:
        layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
        if not layers:
            raise ValueError("train_sparse_values: the model has no BlockSparseLinear layer")
        for layer in layers:
            layer.sparse_weight.values.requires_grad_(True)
        if resume_from_checkpoint is not None:
            load_block_values(model, resume_from_checkpoint)
    if getattr(args, "gradient_checkpointing", False):
        model.enable_input_require_grads()
    if sharded:
        from .fsdp import load_weights, shard_model

        shard_model(model)
        if weights_from is not None:
            load_weights(model, weights_from)
        teacher = distillation.teacher if distillation is not None else None
        if teacher is not None:  # each rank holds 1/world_size of it too
            shard_model(teacher.eval().requires_grad_(False))
            if teacher_weights_from is not None:
                load_weights(teacher, teacher_weights_from)
        model.is_distributed_loading_by_transformers = True  # the Trainer then leaves it unwrapped
    trainer_cls = _trainer_class()
    stop_on_non_finite, record_run = _callbacks()
    guard = stop_on_non_finite(model)
    callbacks = [guard, *(callbacks or []), record_run(model, run_record)]
    cache = distillation.cache if distillation is not None else None
    trainer = trainer_cls(model=model, args=args, train_dataset=TokenBlocks(train_blocks, cache),
                          data_collator=default_data_collator, callbacks=callbacks, distillation=distillation,
                          values=list(trained_block_values(model).values()),
                          values_learning_rate=values_learning_rate, sharded=sharded)
    try:
        output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        # The Trainer leaves accelerate's mixed-precision wrapper on the forward (under bf16 every
        # later call, evaluation and timing included, ran in autocast) and the KV cache off: the
        # model returned computes in its own dtype (`own_forward`, for good) and caches as it did
        # before training. (accelerate's unwrap_model(keep_fp32_wrapper=False) would also strip
        # transformers' own decorators from the forward.)
        original = model.__dict__.pop(_ORIGINAL_FORWARD, None)
        if original is not None:
            model.forward = original
        model.config.use_cache = use_cache
    problem = guard.problem
    finite = _all_finite(guard.trained())  # on every rank: under FSDP it is a collective
    if problem is None and not math.isfinite(output.training_loss):
        problem = f"mean training loss {output.training_loss}"
    if problem is None and not finite:
        problem = "non-finite trained parameters"
    if problem is not None:
        raise NonFiniteTrainingError(f"training diverged: {problem}")
    return model, trainer, output
