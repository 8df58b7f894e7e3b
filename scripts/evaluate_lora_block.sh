#!/usr/bin/env bash
# Perplexity of a block-sparse model with its LoRA adapter applied unmerged, compatible
# with the reference workflow (Wanda's lora_ft/evaluate_ppl.py --model ... --lora_weights ...).
# Settings come from the environment; extra arguments go to `blocksparse eval`, e.g.
#
#   OUTPUT_DIR=runs/lora50 scripts/evaluate_lora_block.sh
#   MODEL=runs/pruned50 OUTPUT_DIR=runs/lora50 DATASET=wikitext2 SEQLEN=4096 scripts/evaluate_lora_block.sh
#
#   OUTPUT_DIR   the adapter directory written by run_lora_finetune_block.sh  [runs/lora_block]
#   MODEL        the sparse base model the adapter was trained on   [the adapter's
#                base_model_name_or_path; a model sparsified on the fly was saved to
#                OUTPUT_DIR/sparse_base and recorded there]
#   DATASET      default | default-news | c4 | wikitext2 | a .txt/.jsonl path  [default]
#   SEQLEN       window length in tokens (Wanda: the model's context)         [512]
#   MAX_WINDOWS  score at most this many windows (empty: all)                 []
#   NO_ADAPTER=1 evaluate MODEL alone (the "before" number)
# The result is printed and written to OUTPUT_DIR/ppl_<dataset>_<seqlen>[_base].json.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

OUTPUT_DIR="${OUTPUT_DIR:-runs/lora_block}"
DATASET="${DATASET:-default}"
SEQLEN="${SEQLEN:-512}"
MAX_WINDOWS="${MAX_WINDOWS:-}"
NO_ADAPTER="${NO_ADAPTER:-}"

if [[ ! -f "$OUTPUT_DIR/adapter_config.json" ]]; then
  echo "evaluate_lora_block.sh: no adapter in OUTPUT_DIR=$OUTPUT_DIR (missing adapter_config.json)" >&2
  exit 2
fi
if [[ -z "${MODEL:-}" ]]; then
  MODEL="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["base_model_name_or_path"] or "")' \
    "$OUTPUT_DIR/adapter_config.json")"
  if [[ -z "$MODEL" ]]; then
    echo "evaluate_lora_block.sh: the adapter does not name its base model; set MODEL" >&2
    exit 2
  fi
fi

name="$(basename "$DATASET")"
args=(eval --model "$MODEL" --dataset "$DATASET" --seqlen "$SEQLEN")
if [[ -n "$MAX_WINDOWS" ]]; then args+=(--max-windows "$MAX_WINDOWS"); fi
if [[ -n "$NO_ADAPTER" ]]; then
  args+=(--json "$OUTPUT_DIR/ppl_${name%.*}_${SEQLEN}_base.json")
else
  args+=(--adapter "$OUTPUT_DIR" --json "$OUTPUT_DIR/ppl_${name%.*}_${SEQLEN}.json")
fi
if [[ -n "$NO_ADAPTER" ]]; then echo "evaluating $MODEL (no adapter) on $DATASET"
else echo "evaluating $MODEL + adapter $OUTPUT_DIR on $DATASET"; fi
exec "$PYTHON" -m blocksparse "${args[@]}" "$@"
