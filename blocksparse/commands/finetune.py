"""`blocksparse finetune`: LoRA recovery of a block-sparse model on the Hugging Face Trainer.

The flags are those of the reference workflow (Wanda's `lora_ft/finetune_lm.py`,
itself transformers' `run_clm`), in `--snake_case` or `--kebab-case`:

    blocksparse finetune --model_name_or_path runs/pruned50 --dataset_name c4 \\
        --block_size 1024 --max_train_samples 30000 --learning_rate 1e-4 --output_dir runs/lora

The model is a sparse checkpoint (`blocksparse prune`), the embedded default or
a dense directory; a dense model with `--sparsity S` is sparsified on the fly
(per-block-row magnitude; for development, not a substitute for Wanda pruning).
LoRA (r=8, alpha=16, dropout 0.05 on q_proj/v_proj by default) trains through
`block_sparse_linear`; the block-sparse weights stay frozen unless
`--train_sparse_values` trains the kept blocks too (`--lora_r 0`: alone); their
structure never changes.
The output directory receives the adapter (`adapter_config.json` +
`adapter_model.safetensors`, whose `base_model_name_or_path` names the base
model), Trainer checkpoints (`checkpoint-N/`, for `--resume_from_checkpoint`),
`train_results.json` and `eval_results.json` (held-out perplexity,
non-overlapping windows of `--eval_seqlen` tokens). A model sparsified on the
fly is saved as a sparse checkpoint in `sparse_base/`, since the adapter only
fits that model; so is the model whose kept blocks were trained (the adapter's
base is then `sparse_base/`).

Several devices: run the same command under `torchrun --nproc_per_node N`
(DDP; gloo on CPU; see `blocksparse.integration.train`); add `--fsdp` to shard
the block values, the adapter and the optimizer state over the ranks (FSDP2,
each decoder layer gathered in turn; `blocksparse.integration.fsdp`), for
models one device cannot hold.

`--block_size` is run_clm's: tokens per training sequence. The sparse block
edge of `--sparsity` is `--sparse_block_size`.

`--recipe NAME` takes the defaults of what trains, the loss and the learning
rate from one of the measured recovery recipes (`integration/recipes.py`,
README "Recovery, measured"), e.g. `--recipe values_kd_hidden` for the kept
blocks trained with distillation; flags given explicitly still win, and
without it every default is the reference workflow's.

`--distill` adds a KL term to the dense teacher's next-token distribution
(`--distill_weight`) and, with `--distill_hidden_weight`, SquareHead's per-layer
normalised hidden-state MSE (`--teacher_model`; by default the model a pruned
checkpoint was made from, or the dense model itself when it was sparsified on
the fly).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import time

from ..dtypes import DTYPES
from ..format import SUPPORTED_BLOCK_SIZES
from ..integration.recipes import RECOVERY_RECIPES
from .args import CLIError, add_dataset_flag, add_dtype_flag, add_flag, check_finite, write_json

EVAL_RESULTS = "eval_results.json"
# The reference workflow's defaults of the flags a --recipe sets (Wanda's lora_ft; the recipe
# named "seed" is its adapter at a swept rate, not these values).
REFERENCE_DEFAULTS = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 1e-4, "distill_weight": 0.5,
                 "distill_hidden_weight": 0.0}
SPARSE_BASE = "sparse_base"  # where a model sparsified on the fly is saved, inside --output_dir
# A --block_size this small is a sparse block edge typed into run_clm's flag.
MIN_SEQUENCE_TOKENS = 65
# The flags that define a run, recorded in each of its checkpoints: `--resume_from_checkpoint`
# refuses another run's. Length (--max_steps, --num_train_epochs), checkpointing, logging,
# evaluation and output flags may change between resumptions.
RUN_FLAGS = ("recipe", "model_name_or_path", "sparsity", "sparse_block_size", "dtype", "dataset_name", "block_size",
             "max_train_samples", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate",
             "per_device_train_batch_size", "gradient_accumulation_steps", "warmup_steps", "lr_scheduler_type",
             "weight_decay", "seed", "bf16", "fp16", "distill", "teacher_model", "distill_weight",
             "distill_temperature", "distill_hidden_weight", "train_sparse_values", "sparse_values_learning_rate",
             "teacher_cache_topk")


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "finetune", help="LoRA fine-tuning of a block-sparse model (HF Trainer, PEFT)",
        description="LoRA recovery of a block-sparse model through the fused kernel, with the flags "
                    "of Wanda's lora_ft/finetune_lm.py (run_clm). Under torchrun it trains with DDP.")
    model = parser.add_argument_group("model")
    add_flag(model, "--model_name_or_path", default="default",
             help="'default' (embedded SmolLM2-135M-Instruct), a sparse checkpoint directory "
                  "(blocksparse prune) or a dense model directory (default: %(default)s)")
    add_flag(model, "--config_name", default=None,
             help="accepted for run_clm compatibility; the model directory's own config is used")
    add_flag(model, "--sparsity", type=float, default=None,
             help="sparsify a dense model on the fly at this block sparsity (magnitude, per block row)")
    add_flag(model, "--sparse_block_size", type=int, default=16, choices=SUPPORTED_BLOCK_SIZES,
             help="block size for --sparsity (default: %(default)s)")
    add_dtype_flag(model, "dtype the model is loaded in")

    data = parser.add_argument_group("data")
    add_dataset_flag(data, "--dataset_name", what="training text (its train split; eval split for the final "
                                                 "perplexity)")
    add_flag(data, "--dataset_config_name", default=None, help="accepted for run_clm compatibility; unused")
    add_flag(data, "--block_size", type=int, default=1024,
             help="tokens per training sequence, as in run_clm (default: %(default)s); the sparse block "
                  "edge is --sparse_block_size")
    add_flag(data, "--max_train_samples", type=int, default=None,
             help="train on at most this many sequences (default: all)")
    add_flag(data, "--eval_seqlen", type=int, default=None,
             help="window of the final held-out perplexity (default: --block_size)")
    add_flag(data, "--max_eval_samples", type=int, default=None,
             help="score at most this many eval windows (default: all)")

    add_flag(parser, "--recipe", default=None, choices=sorted(RECOVERY_RECIPES),
             help="a measured recovery recipe (README, 'Recovery, measured'): what it trains, its loss and its "
                  "learning rate become the defaults of --lora_r, --lora_alpha, --target_modules, "
                  "--learning_rate, --distill*, --train_sparse_values and --sparse_values_learning_rate; "
                  "values given explicitly win (its --distill and --train_sparse_values it turns on; pick "
                  "another recipe to leave them off) (default: none, the reference workflow's defaults)")
    lora = parser.add_argument_group("LoRA")
    add_flag(lora, "--lora_r", type=int, default=None,
             help=f"rank; 0 = no adapter (with --train_sparse_values) (default: the --recipe's, else "
                  f"{REFERENCE_DEFAULTS['lora_r']})")
    add_flag(lora, "--lora_alpha", type=float, default=None,
             help=f"alpha; scaling = alpha / r (default: the --recipe's alpha / r times r, else "
                  f"{REFERENCE_DEFAULTS['lora_alpha']:g})")
    add_flag(lora, "--lora_dropout", type=float, default=None,
             help=f"dropout on the LoRA input (default: the --recipe's, else {REFERENCE_DEFAULTS['lora_dropout']:g})")
    add_flag(lora, "--target_modules", default=None,
             help="comma-separated module names to adapt (default: the model family's, q_proj,v_proj "
                  "for Llama, Mistral and Qwen2; all seven projections for a --recipe that adapts them)")

    train = parser.add_argument_group("training (TrainingArguments)")
    add_flag(train, "--output_dir", required=True, help="adapter, checkpoints and results go here")
    add_flag(train, "--num_train_epochs", type=float, default=1.0, help="(default: %(default)s)")
    add_flag(train, "--max_steps", type=int, default=-1, help="overrides --num_train_epochs when > 0")
    add_flag(train, "--learning_rate", type=float, default=None,
             help=f"(default: the --recipe's, else {REFERENCE_DEFAULTS['learning_rate']:g})")
    add_flag(train, "--per_device_train_batch_size", type=int, default=1, help="(default: %(default)s)")
    add_flag(train, "--per_device_eval_batch_size", type=int, default=1,
             help="windows per forward pass in the final eval (default: %(default)s)")
    add_flag(train, "--gradient_accumulation_steps", type=int, default=1, help="(default: %(default)s)")
    add_flag(train, "--warmup_steps", type=int, default=5, help="(default: %(default)s)")
    add_flag(train, "--lr_scheduler_type", default="linear", help="(default: %(default)s)")
    add_flag(train, "--weight_decay", type=float, default=0.0, help="(default: %(default)s)")
    add_flag(train, "--seed", type=int, default=42, help="(default: %(default)s)")
    add_flag(train, "--logging_steps", type=int, default=10, help="(default: %(default)s)")
    add_flag(train, "--save_steps", type=int, default=50, help="checkpoint every N steps (default: %(default)s)")
    add_flag(train, "--save_total_limit", type=int, default=3, help="checkpoints kept (default: %(default)s)")
    add_flag(train, "--resume_from_checkpoint", default=None,
             help="a checkpoint-N directory, or 'last' for the newest one in --output_dir")
    add_flag(train, "--overwrite_output_dir", action="store_true",
             help="start afresh even if --output_dir holds checkpoints")
    add_flag(train, "--bf16", action="store_true",
             help="bf16 mixed precision (autocast; GPU, or a CPU with native bf16)")
    add_flag(train, "--fp16", action="store_true", help="fp16 mixed precision (GPU)")
    add_flag(train, "--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    add_flag(train, "--fsdp", action="store_true",
             help="under torchrun: shard the model, adapter and optimizer state over the ranks (FSDP2) instead "
                  "of replicating them (DDP); LoRA only")
    add_flag(train, "--do_train", action="store_true", help="accepted for run_clm compatibility (always trains)")
    add_flag(train, "--do_eval", action="store_true", help="accepted for run_clm compatibility (always evaluates)")
    add_flag(train, "--no_eval", action="store_true", help="skip the final held-out perplexity")
    add_flag(train, "--eval_base", action="store_true",
             help="also measure the perplexity without the adapter (written to eval_results.json)")

    distill = parser.add_argument_group("distillation (optional)")
    add_flag(distill, "--distill", action="store_true",
             help="add a KL term to a dense teacher's logits")
    add_flag(distill, "--teacher_model", default=None,
             help="dense teacher (default: the model a pruned checkpoint records in prune_report.json, "
                  "or the dense model itself when --sparsity sparsifies it)")
    add_flag(distill, "--distill_weight", type=float, default=None,
             help=f"weight of the KL term; CE gets 1 - weight (default: the --recipe's, else "
                  f"{REFERENCE_DEFAULTS['distill_weight']})")
    add_flag(distill, "--distill_temperature", type=float, default=1.0, help="(default: %(default)s)")
    add_flag(distill, "--teacher_cache", default=None,
             help="a safetensors file of the teacher's top-k logits of the training blocks: used when it "
                  "exists and matches, else computed once and written (the KL term then needs no teacher "
                  "forward per step)")
    add_flag(distill, "--teacher_cache_topk", type=int, default=64,
             help="logits per position kept in a new --teacher_cache (default: %(default)s; 8 bytes each)")
    add_flag(distill, "--distill_hidden_weight", type=float, default=None,
             help=f"weight of the per-layer hidden-state term (SquareHead), added to the rest "
                  f"(default: the --recipe's, else {REFERENCE_DEFAULTS['distill_hidden_weight']})")

    values = parser.add_argument_group("sparse fine-tuning (optional)")
    add_flag(values, "--train_sparse_values", action="store_true",
             help="train the kept block values too (the block structure stays fixed); with --lora_r 0 alone")
    add_flag(values, "--sparse_values_learning_rate", type=float, default=None,
             help="learning rate of the block values (default: --learning_rate, times the --recipe's ratio "
                  "where it has one)")
    parser.set_defaults(func=run)
    return parser


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _checkpoints(output_dir: str) -> list[str]:
    found = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    return sorted((p for p in found if p.rsplit("-", 1)[1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[1]))


def apply_recipe(args) -> None:
    """Fill the flags left unset (None) from --recipe, else from REFERENCE_DEFAULTS, in place. A
    recipe's LoRA targets other than the family's default are resolved by `_lora_targets`
    once the model is loaded; its store_true flags (--distill, --train_sparse_values) it
    only turns on."""
    from ..integration.train import Distillation

    spec = RECOVERY_RECIPES[args.recipe] if args.recipe is not None else {}
    lora, distill = spec.get("lora"), spec.get("distill")
    if args.recipe is not None and args.lora_r is None:
        args.lora_r = lora["r"] if lora else 0  # a recipe without LoRA trains the kept blocks alone
    if lora and args.lora_alpha is None:  # the recipe's scaling alpha / r, at the rank asked for
        args.lora_alpha = lora["alpha"] / lora["r"] * args.lora_r
    if lora and args.lora_dropout is None:
        args.lora_dropout = lora["dropout"]
    if args.learning_rate is None and "lr" in spec:
        args.learning_rate = spec["lr"]
    if distill:
        args.distill = True
        if args.distill_weight is None:  # what recover() builds: Distillation's defaults where it is silent
            args.distill_weight = distill.get("kl_weight", Distillation.kl_weight)
        if args.distill_hidden_weight is None:
            args.distill_hidden_weight = distill.get("hidden_weight", Distillation.hidden_weight)
    if spec.get("values"):
        args.train_sparse_values = True
        if args.sparse_values_learning_rate is None and "values_lr_ratio" in spec:
            args.sparse_values_learning_rate = args.learning_rate * spec["values_lr_ratio"]
    for name, value in REFERENCE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check_args(args) -> None:
    check_finite(args, "_")
    for name in ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.lora_r < (0 if args.train_sparse_values else 1):
        raise CLIError(f"--lora_r must be >= 1 (or 0 with --train_sparse_values: no adapter), got {args.lora_r}")
    by_recipe = f" (--recipe {args.recipe})" if args.recipe else ""
    if args.eval_base and args.lora_r == 0:
        raise CLIError(f"--eval_base compares with and without the adapter; --lora_r 0{by_recipe} trains none")
    if args.sparse_values_learning_rate is not None and not args.train_sparse_values:
        raise CLIError("--sparse_values_learning_rate needs --train_sparse_values")
    if args.sparse_values_learning_rate is not None and args.sparse_values_learning_rate <= 0:
        raise CLIError(f"--sparse_values_learning_rate must be > 0, got {args.sparse_values_learning_rate}")
    if args.block_size < MIN_SEQUENCE_TOKENS:
        raise CLIError(f"--block_size {args.block_size} is tokens per training sequence (run_clm's flag); "
                       f"a value below {MIN_SEQUENCE_TOKENS} looks like a sparse block edge: pass that as "
                       f"--sparse_block_size")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise CLIError(f"--max_train_samples must be >= 1, got {args.max_train_samples}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise CLIError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if not 0.0 <= args.distill_weight <= 1.0:
        raise CLIError(f"--distill_weight must be in [0, 1], got {args.distill_weight}")
    if args.distill_temperature <= 0:
        raise CLIError(f"--distill_temperature must be > 0, got {args.distill_temperature}")
    if args.distill_hidden_weight < 0:
        raise CLIError(f"--distill_hidden_weight must be >= 0, got {args.distill_hidden_weight}")
    if args.distill_hidden_weight > 0 and not args.distill:
        raise CLIError("--distill_hidden_weight needs --distill")
    if args.teacher_cache is not None and not args.distill:
        raise CLIError("--teacher_cache needs --distill")
    if args.teacher_cache_topk < 1:
        raise CLIError(f"--teacher_cache_topk must be >= 1, got {args.teacher_cache_topk}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise CLIError(f"--output_dir {args.output_dir!r} is a file; expected a directory")
    if args.bf16 and args.fp16:
        raise CLIError("give --bf16 or --fp16, not both")
    if args.fsdp and args.train_sparse_values:
        raise CLIError(f"--fsdp trains LoRA adapters; --train_sparse_values{by_recipe} under FSDP is not supported "
                       "yet")
    if args.fsdp and args.fp16:
        raise CLIError("--fsdp with --fp16: the loss scaler would check for infs per rank, not over the shards; "
                       "use --bf16")


def _run_settings(args) -> dict:
    return {name: getattr(args, name) for name in RUN_FLAGS}


def _sharded(args) -> bool:
    """Whether this run shards the model: --fsdp with several processes (torchrun sets WORLD_SIZE)."""
    return args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _check_same_run(checkpoint: str, args) -> None:
    """Refuse a checkpoint whose run record (if any) names other RUN_FLAGS settings, or whose
    optimizer state this run cannot read (sharded by FSDP, or not)."""
    from ..integration.fsdp import SHARDED_DIR
    from ..integration.train import RUN_RECORD

    saved_sharded = os.path.isdir(os.path.join(checkpoint, SHARDED_DIR))
    if saved_sharded and not _sharded(args):
        raise CLIError(f"{checkpoint} was saved by an FSDP run (its optimizer state is in {SHARDED_DIR}/): resume "
                       "it with --fsdp under torchrun, 2 or more processes")
    if _sharded(args) and not saved_sharded:
        raise CLIError(f"{checkpoint} was saved without FSDP (no {SHARDED_DIR}/): resume it without --fsdp")

    record = os.path.join(checkpoint, RUN_RECORD)
    if not os.path.isfile(record):
        return
    with open(record) as f:
        theirs = json.load(f)
    ours = json.loads(json.dumps(_run_settings(args)))  # compared as the record holds them
    changed = [f"--{name} {theirs.get(name)} there, {ours[name]} now" for name in RUN_FLAGS
               if theirs.get(name) != ours[name]]
    if changed:
        raise CLIError(f"{checkpoint} belongs to another run ({'; '.join(changed)}): give the same settings to "
                       "resume it, or --overwrite_output_dir to start afresh")


def _resolve_resume(args) -> str | None:
    from ..integration.train import RUN_RECORD

    existing = _checkpoints(args.output_dir)
    if args.resume_from_checkpoint in ("last", "true", "True"):
        # Complete: the Trainer wrote trainer_state.json last, and the run record after it.
        complete = [p for p in existing
                    if all(os.path.isfile(os.path.join(p, name)) for name in ("trainer_state.json", RUN_RECORD))]
        if not complete:
            found = f" ({', '.join(map(os.path.basename, existing))} incomplete)" if existing else ""
            raise CLIError(f"--resume_from_checkpoint last: no complete checkpoint-N directory in "
                           f"{args.output_dir!r}{found}")
        newer = [os.path.basename(p) for p in existing[existing.index(complete[-1]) + 1:]]
        if newer and _is_main_process():
            print(f"note: passing over incomplete {', '.join(newer)} (no trainer_state.json or {RUN_RECORD})")
        _check_same_run(complete[-1], args)
        return complete[-1]
    if args.resume_from_checkpoint is not None:
        if not os.path.isfile(os.path.join(args.resume_from_checkpoint, "trainer_state.json")):
            raise CLIError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a Trainer "
                           "checkpoint directory (no trainer_state.json)")
        _check_same_run(args.resume_from_checkpoint, args)
        return args.resume_from_checkpoint
    if existing and not args.overwrite_output_dir:
        raise CLIError(f"{args.output_dir!r} already holds {os.path.basename(existing[-1])}: pass "
                       "--resume_from_checkpoint last to continue or --overwrite_output_dir to start afresh")
    return None


def _load(args):
    """(model, tokenizer, teacher, weights_from, teacher_weights_from): the model to adapt,
    sparsified if asked, and the distillation teacher. Sharded on several ranks, a local
    safetensors model comes as its skeleton and *weights_from is its path: each rank reads
    its own shards once the model is sharded, so no rank holds it whole."""
    from ..integration.checkpoint import pruned_from
    from ..integration.model import ModelNotFoundError, load_model, load_skeleton
    from ..nn import BlockSparseLinear
    from ..sparsify import sparsify_model

    weights_from = teacher_weights_from = None
    try:
        # --sparsity sparsifies the dense weights here: they are read whole then.
        path = os.path.expanduser(args.model_name_or_path)
        found = load_skeleton(path, dtype=DTYPES[args.dtype]) if _sharded(args) and args.sparsity is None else None
        if found is None:
            model, tokenizer = load_model(args.model_name_or_path, dtype=DTYPES[args.dtype])
        else:
            from transformers import AutoTokenizer

            weights_from = path
            model, tokenizer = found[0], found[1] or AutoTokenizer.from_pretrained(path)
    except (ModelNotFoundError, ValueError, OSError) as err:
        raise CLIError((str(err).splitlines() or [type(err).__name__])[0]) from err
    is_sparse = any(isinstance(m, BlockSparseLinear) for m in model.modules())
    teacher = None
    if args.sparsity is not None:
        if is_sparse:
            raise CLIError(f"{args.model_name_or_path!r} is already block-sparse; drop --sparsity")
        if args.distill and args.teacher_model is None:
            teacher = copy.deepcopy(model)
        try:
            sparsify_model(model, sparsity=args.sparsity, block_size=args.sparse_block_size)
        except ValueError as err:
            raise CLIError(str(err)) from err
    elif not is_sparse and _is_main_process():
        print(f"note: {args.model_name_or_path!r} has no block-sparse layers; training plain LoRA "
              "(pass a sparse checkpoint, or --sparsity S to sparsify on the fly)")
    if args.distill and teacher is None:
        source = args.teacher_model or pruned_from(args.model_name_or_path)
        if source is None:
            raise CLIError("--distill needs --teacher_model (the dense model the checkpoint was pruned from)")
        try:
            # A teacher cache is computed from the teacher before training: read whole then.
            found = (load_skeleton(os.path.expanduser(source), dtype=DTYPES[args.dtype])
                     if _sharded(args) and not args.teacher_cache else None)
            if found is None:
                teacher, _ = load_model(source, dtype=DTYPES[args.dtype])
            else:
                teacher, teacher_weights_from = found[0], os.path.expanduser(source)
        except (ModelNotFoundError, ValueError) as err:
            raise CLIError(f"--teacher_model: {err}") from err
    return model, tokenizer, teacher, weights_from, teacher_weights_from


def _lora_targets(model, recipe: str | None) -> tuple[str, ...]:
    """The LoRA targets when --target_modules is not given: the family's default, or all its
    projections for a recipe that adapts them."""
    from ..families import UnsupportedModelError, family_of

    every = recipe is not None and RECOVERY_RECIPES[recipe].get("lora", {}).get("targets") == "all"
    try:
        family = family_of(model)
        return family.projections if every else family.lora_targets
    except UnsupportedModelError as err:
        raise CLIError(f"{err}; or name the modules to adapt with --target_modules") from err


def run(args) -> int:
    from ..integration.fsdp import end_process_group

    code = _run(args)
    end_process_group()  # under torchrun; a rank whose run failed raises past it, as before
    return code


def _run(args) -> int:
    from ..integration.checkpoint import hidden_channel_order, is_sparse_checkpoint, save_sparse_pretrained
    from ..integration.data import DatasetError, eval_tokens, train_token_blocks
    from ..integration.evaluate import count_windows, perplexity
    from ..integration.fsdp import full_trainable_state
    from ..integration.model_card import adapter_card, write_card
    from ..integration.peft import lora_config
    from ..integration.train import Distillation, NonFiniteTrainingError, train, training_arguments

    apply_recipe(args)
    _check_args(args)
    started = time.perf_counter()
    resume = _resolve_resume(args)
    model, tokenizer, teacher, weights_from, teacher_weights_from = _load(args)
    eval_seqlen = args.eval_seqlen or args.block_size
    try:
        blocks = train_token_blocks(tokenizer, args.dataset_name, args.block_size, args.max_train_samples)
        held_out = None
        if not args.no_eval:
            held_out = eval_tokens(tokenizer, args.dataset_name)
            count_windows(held_out.shape[1], eval_seqlen, args.max_eval_samples)
    except (DatasetError, ValueError) as err:
        raise CLIError(str(err)) from err
    if resume is None and args.overwrite_output_dir and _is_main_process():
        # An earlier run's checkpoints would be resumed by a later `last`, and its sparse base
        # may be another sparsification.
        for stale in _checkpoints(args.output_dir) + [os.path.join(args.output_dir, SPARSE_BASE)]:
            shutil.rmtree(stale, ignore_errors=True)
    base_name = args.model_name_or_path
    if args.sparsity is not None:
        # The adapter only fits this sparsified model: keep it beside the adapter.
        base_name = os.path.join(args.output_dir, SPARSE_BASE)
        if _is_main_process() and not is_sparse_checkpoint(base_name):
            save_sparse_pretrained(model, tokenizer, base_name,
                                   report={"method": "magnitude", "sparsity": args.sparsity,
                                           "block_size": args.sparse_block_size,
                                           "source": args.model_name_or_path})
    use_lora = args.lora_r > 0
    targets = ([t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules
               else list(_lora_targets(model, args.recipe))) if use_lora else []
    # Only what is asked for: TrainingArguments warns about deprecated fields even when False.
    device_args = {name: True for name in ("bf16", "fp16", "gradient_checkpointing") if getattr(args, name)}
    train_args = training_arguments(
        args.output_dir, num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type, weight_decay=args.weight_decay, seed=args.seed,
        logging_steps=args.logging_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, **device_args,
        **({"save_only_model": True} if _sharded(args) else {}))  # FSDP's optimizer state is saved sharded
    trains = ([f"LoRA on {','.join(targets)}"] if use_lora else []) + (
        ["the kept block values"] if args.train_sparse_values else [])
    if _is_main_process():
        recipe = f"recipe {args.recipe}: " if args.recipe else ""
        print(f"train: {blocks.shape[0]} sequences x {args.block_size} tokens (--block_size: tokens per "
              f"sequence) = {blocks.numel()} tokens from {args.dataset_name!r} | {recipe}{' + '.join(trains)} | "
              f"world size {train_args.world_size}{_fsdp_note(args, train_args)}")
    config = lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, targets) if use_lora else None
    distillation = None
    if teacher is not None:
        cache = _teacher_cache(args, teacher, blocks) if args.teacher_cache else None
        try:  # a checkpoint pruned with permuted channels: the teacher's hidden states in its order
            order = hidden_channel_order(args.model_name_or_path) if args.distill_hidden_weight > 0 else None
            distillation = Distillation(teacher, kl_weight=args.distill_weight, temperature=args.distill_temperature,
                                        hidden_weight=args.distill_hidden_weight, cache=cache, hidden_order=order)
        except ValueError as err:  # a malformed recorded order, or one of another size
            raise CLIError(str(err)) from err
    try:
        trained, trainer, output = train(
            model, blocks, train_args, config, train_sparse_values=args.train_sparse_values,
            values_learning_rate=args.sparse_values_learning_rate, distillation=distillation,
            resume_from_checkpoint=resume, run_record=_run_settings(args), fsdp=args.fsdp,
            weights_from=weights_from, teacher_weights_from=teacher_weights_from)
    except ValueError as err:  # e.g. no module matches --target_modules
        raise CLIError(str(err)) from err
    except NonFiniteTrainingError as err:
        raise CLIError(f"{err}; nothing was saved (NaN or inf in the model's weights? "
                       "else lower --learning_rate)") from err

    if args.train_sparse_values:
        base_name = os.path.join(args.output_dir, SPARSE_BASE)  # the adapter fits the trained blocks
    if use_lora:
        # Record where the adapter belongs; `blocksparse eval --model` needs the same base.
        trained.peft_config["default"].base_model_name_or_path = base_name
    # A sharded model's forward and gathers need every rank: all of them stay for the adapter's
    # gathering and the evaluation (each scores the same windows), rank 0 writes.
    sharded = trainer.sharded
    if not (trainer.is_world_process_zero() or sharded):
        return 0
    main = trainer.is_world_process_zero()
    if use_lora:
        # The adapter alone, as safetensors (trainer.save_model would add a pickled training_args.bin).
        state = full_trainable_state(trained) if sharded else None
        if main:
            trained.save_pretrained(args.output_dir, state_dict=state)
    metrics = dict(output.metrics, train_samples=blocks.shape[0], train_tokens_per_epoch=blocks.numel(),
                   model=args.model_name_or_path, sparsity=args.sparsity, dataset=args.dataset_name)
    trainer.save_metrics("train", metrics)

    if held_out is not None:
        evaluated = "lora" if use_lora else "trained"
        results = dict(model=args.model_name_or_path, sparsity=args.sparsity, dataset=args.dataset_name,
                       split="eval", seqlen=eval_seqlen, adapter=args.output_dir if use_lora else None,
                       steps=trainer.state.global_step)
        evaluate = dict(tokens=held_out, seqlen=eval_seqlen, max_windows=args.max_eval_samples,
                        batch_size=args.per_device_eval_batch_size, progress=main)
        if args.eval_base:
            with trained.disable_adapter():
                results["base"] = perplexity(trained, **evaluate)
        results[evaluated] = perplexity(trained, **evaluate)
        if not main:
            return 0
        results["perplexity"] = results[evaluated]["ppl"]
        results["seconds"] = round(time.perf_counter() - started, 1)
        write_json(os.path.join(args.output_dir, EVAL_RESULTS), results)
        base = f" (without adapter {results['base']['ppl']:.3f})" if args.eval_base else ""
        print(f"held-out perplexity{' with adapter' if use_lora else ''}: {results['perplexity']:.3f}{base} | "
              f"{results[evaluated]['windows']} windows x {eval_seqlen} tokens")
    if not main:
        return 0
    tokens = round(blocks.numel() * (trainer.state.epoch or 0))  # epochs as the Trainer counts them
    if args.train_sparse_values:
        _save_trained_base(trained.unload() if use_lora else trained, tokenizer, base_name, args, trainer, tokens,
                           results.get("trained", results.get("base")) if held_out is not None else None,
                           eval_seqlen)
    if use_lora:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": targets}
        training = {"tokens": tokens, "steps": trainer.state.global_step, "learning_rate": args.learning_rate,
                    "dataset": args.dataset_name, "seconds": output.metrics.get("train_runtime")}
        write_card(args.output_dir, adapter_card(base_name, lora, training,
                                                 results if held_out is not None else None, args.output_dir))
    saved = " and ".join((["adapter"] if use_lora else []) + ([f"trained model ({base_name})"]
                                                               if args.train_sparse_values else []))
    print(f"{saved} saved to {args.output_dir} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def _fsdp_note(args, train_args) -> str:
    if not args.fsdp:
        return ""
    if train_args.world_size == 1:
        return " (--fsdp: one process, nothing to shard)"
    return f" | FSDP: each rank holds 1/{train_args.world_size} of the weights, adapter and optimizer state"


def _teacher_cache(args, teacher, blocks) -> dict:
    """The --teacher_cache of these training blocks: read when the file exists, else computed and
    written (by the main process, atomically)."""
    from ..integration.train import load_teacher_cache, save_teacher_cache, teacher_topk

    if os.path.exists(args.teacher_cache):
        try:
            return load_teacher_cache(args.teacher_cache, blocks)
        except ValueError as err:
            raise CLIError(str(err)) from err
    cache = teacher_topk(teacher, blocks, args.teacher_cache_topk, batch_size=args.per_device_train_batch_size)
    if _is_main_process():
        partial = f"{args.teacher_cache}.partial"
        save_teacher_cache(cache, partial)
        os.replace(partial, args.teacher_cache)
        print(f"teacher cache: top {args.teacher_cache_topk} logits of {blocks.numel()} tokens written to "
              f"{args.teacher_cache}")
    return cache


def _save_trained_base(model, tokenizer, path: str, args, trainer, tokens: int, evaluation: dict | None,
                       eval_seqlen: int) -> None:
    """The model whose kept blocks were trained, as a sparse checkpoint: its pruning record
    (the source checkpoint's prune report, or the on-the-fly sparsification) and the training."""
    from ..integration.checkpoint import REPORT_NAME, save_sparse_pretrained

    if args.sparsity is not None:
        report = {"method": "magnitude", "sparsity": args.sparsity, "block_size": args.sparse_block_size,
                  "source": args.model_name_or_path}
    else:
        try:
            with open(os.path.join(args.model_name_or_path, REPORT_NAME)) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {}
        report = {"source": args.model_name_or_path, **(report if isinstance(report, dict) else {})}
    trained = {"tokens": tokens, "steps": trainer.state.global_step, "dataset": args.dataset_name,
               "learning_rate": args.sparse_values_learning_rate or args.learning_rate,
               "with_lora": args.lora_r > 0}
    if evaluation is not None:  # this checkpoint alone (no adapter)
        trained.update(ppl=evaluation["ppl"], windows=evaluation["windows"], seqlen=eval_seqlen,
                       eval_dataset=args.dataset_name)
    save_sparse_pretrained(model, tokenizer, path, report={**report, "trained_values": trained})
