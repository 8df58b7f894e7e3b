#!/usr/bin/env bash
# LoRA fine-tuning of a block-sparse model through the fused kernel, compatible with the
# reference workflow (Wanda's lora_ft/script.sh -> finetune_lm.py). Settings come from
# the environment; any extra arguments go to `blocksparse finetune` unchanged, e.g.
#
#   MODEL=runs/pruned50 OUTPUT_DIR=runs/lora50 MAX_TRAIN_SAMPLES=1000 scripts/run_lora_finetune_block.sh
#   NPROC=2 DATASET=c4 BLOCK_SIZE=1024 scripts/run_lora_finetune_block.sh --bf16
#
#   MODEL              sparse checkpoint dir (blocksparse prune), dense dir, or "default"
#                      (embedded SmolLM2-135M)                                  [default]
#   SPARSITY           sparsify a dense MODEL on the fly (magnitude; for trying things out,
#                      prune with Wanda for real runs); empty = use MODEL as is
#                                                     [0.5 when MODEL=default, else empty]
#   DATASET            default (embedded Wikipedia) | c4 | wikitext2 | a .txt/.jsonl path [default]
#   OUTPUT_DIR         adapter, checkpoints, train/eval results               [runs/lora_block]
#   BLOCK_SIZE         tokens per training sequence                           [1024]
#   MAX_TRAIN_SAMPLES  training sequences (reference: 1000 / 30000 / 100000)  [1000]
#   NUM_EPOCHS         epochs over them                                       [1]
#   MAX_STEPS          stop after this many optimizer steps (-1: epochs decide) [-1]
#   LORA_R, LORA_ALPHA, LORA_DROPOUT                                          [8, 16, 0.05]
#   TARGET_MODULES     comma-separated                                        [q_proj,v_proj]
#   LEARNING_RATE                                                             [1e-4]
#   BATCH_SIZE, GRAD_ACCUM  per-device batch and gradient accumulation        [1, 1]
#   NPROC              processes on this machine: > 1 runs under torchrun (DDP) [1]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

MODEL="${MODEL:-default}"
if [[ -z "${SPARSITY+x}" && "$MODEL" == "default" ]]; then SPARSITY=0.5; fi
SPARSITY="${SPARSITY:-}"
DATASET="${DATASET:-default}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/lora_block}"
BLOCK_SIZE="${BLOCK_SIZE:-1024}"
MAX_TRAIN_SAMPLES="${MAX_TRAIN_SAMPLES:-1000}"
NUM_EPOCHS="${NUM_EPOCHS:-1}"
MAX_STEPS="${MAX_STEPS:--1}"
LORA_R="${LORA_R:-8}"
LORA_ALPHA="${LORA_ALPHA:-16}"
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
TARGET_MODULES="${TARGET_MODULES:-q_proj,v_proj}"
LEARNING_RATE="${LEARNING_RATE:-1e-4}"
BATCH_SIZE="${BATCH_SIZE:-1}"
GRAD_ACCUM="${GRAD_ACCUM:-1}"
NPROC="${NPROC:-1}"

args=(finetune
  --model_name_or_path "$MODEL"
  --dataset_name "$DATASET"
  --output_dir "$OUTPUT_DIR"
  --block_size "$BLOCK_SIZE"
  --max_train_samples "$MAX_TRAIN_SAMPLES"
  --num_train_epochs "$NUM_EPOCHS"
  --max_steps "$MAX_STEPS"
  --lora_r "$LORA_R"
  --lora_alpha "$LORA_ALPHA"
  --lora_dropout "$LORA_DROPOUT"
  --target_modules "$TARGET_MODULES"
  --learning_rate "$LEARNING_RATE"
  --per_device_train_batch_size "$BATCH_SIZE"
  --gradient_accumulation_steps "$GRAD_ACCUM")
if [[ -n "$SPARSITY" ]]; then args+=(--sparsity "$SPARSITY"); fi

echo "fine-tuning $MODEL${SPARSITY:+ (sparsified to $SPARSITY)} on $DATASET -> $OUTPUT_DIR"
if (( NPROC > 1 )); then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m blocksparse "${args[@]}" "$@"
fi
exec "$PYTHON" -m blocksparse "${args[@]}" "$@"
