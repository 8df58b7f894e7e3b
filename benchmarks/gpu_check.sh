#!/usr/bin/env bash
# The one script to run on a GPU machine (H100 / H200), inside ~8 minutes:
#   1. versions and the GPU           5. forced kernel schedules (G = 1/2/4/8) at prefill
#   2. the CUDA tests of the kernels  6. grouped masks, tiles autotuned (256 x 128 among them)
#   3. the kernel sweep (reduced)     7. the compile report (sm_90, registers / spills / wgmma)
#   4. the model benchmark (Llama-2-7B-shaped, random weights, 8 decoder layers)
#                                     8. a summary: step, status, seconds, headline speedups
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # OUT_DIR, else $OUT, else runs/gpu_check
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR] # the same plumbing, tiny settings, on a CPU
#   bash benchmarks/gpu_check.sh --pack [OUT_DIR]    # also: everything in one gpu_check.tar.gz,
#                                                    # keeping only it, summary.md and gpu_check.log
#
# GPU_CHECK_STEPS=kernels,model (a comma list of env,tests,kernels,model,schedules,tiles,compile)
# runs only those steps; the summary always comes last. GPU_CHECK_BUDGET=470 is the total
# number of seconds the steps may take (each step's own limit shrinks to fit it).
#
# It uses the machine's own python3 / torch / triton / transformers / peft (no network,
# nothing installed): the package comes from this checkout through PYTHONPATH. Set
# PYTHON=/path/to/python to choose another interpreter. Every step runs under its own
# `timeout`; a failing step is reported and the next one runs. Per-step logs go to
# OUT_DIR/logs, results to OUT_DIR/{kernels,schedules,tiles,model,compile}.

set -u

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
PACK=0
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --pack) PACK=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) if [ -n "$OUT_ARG" ]; then echo "gpu_check.sh: one output folder, got $OUT_ARG and $arg" >&2; exit 2; fi
           OUT_ARG="$arg" ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_ARG:-${OUT:-$REPO/runs/gpu_check}}"
mkdir -p "$OUT_DIR/logs" || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

# The interpreter: $PYTHON, else python3 if it has torch, else the checkout's .venv.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if ! python3 -c "import torch" >/dev/null 2>&1 && [ -x "$REPO/.venv/bin/python" ]; then
        PYTHON="$REPO/.venv/bin/python"
    fi
fi
case "$PYTHON" in /*) ;; */*) PYTHON="$PWD/$PYTHON" ;; esac  # still valid after the cd below
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
# Benchmarks must never time the Triton interpreter.
unset TRITON_INTERPRET BLOCKSPARSE_BACKEND
cd "$REPO" || exit 2

STEPS=()
STATUS=()
SECONDS_TAKEN=()
SCRIPT_START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-470}"  # seconds for all steps together (8 minutes with the summary)

ALL_STEPS="env,tests,kernels,model,schedules,tiles,compile"
WANTED="${GPU_CHECK_STEPS:-$ALL_STEPS}"
SELECTED=",$WANTED,"
for step in ${WANTED//,/ }; do
    case ",$ALL_STEPS," in *",$step,"*) ;; *) echo "gpu_check.sh: unknown step '$step' in GPU_CHECK_STEPS (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done

# run_step NAME TIMEOUT_S COMMAND...: run with a time limit, log to logs/NAME.log and the console.
run_step() {
    local name="$1" limit="$2"
    shift 2
    case "$SELECTED" in *",$name,"*) ;; *) return 0 ;; esac
    # Every step ends inside the total budget: its limit shrinks to what is left.
    local left=$(( BUDGET - ($(date +%s) - SCRIPT_START) ))
    if [ "$left" -lt 15 ]; then
        skip_step "$name" "total budget of ${BUDGET}s spent"
        return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo
    echo "=== $name (limit ${limit}s) ==="
    echo "+ $*"
    local start rc status
    start=$(date +%s)
    set -o pipefail
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/logs/$name.log"
    rc=$?
    set +o pipefail
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    STEPS+=("$name")
    STATUS+=("$status")
    SECONDS_TAKEN+=("$(( $(date +%s) - start ))")
    echo "--- $name: $status"
}

skip_step() {
    case "$SELECTED" in *",$1,"*) ;; *) return 0 ;; esac
    echo
    echo "=== $1: skipped ($2) ==="
    STEPS+=("$1")
    STATUS+=("skipped: $2")
    SECONDS_TAKEN+=("0")
}

# ---------------------------------------------------------------- 1. environment
env_report() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(uname -n)  repo: $REPO"
    echo "python: $PYTHON"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" - <<'EOF'
import importlib, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
missing = []
for name in ("torch", "triton", "transformers", "peft", "numpy", "matplotlib", "safetensors", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:<13} {getattr(module, '__version__', '?')}")
    except Exception as err:  # report every missing piece, not only the first
        missing.append(name)
        print(f"  {name:<13} MISSING ({type(err).__name__}: {err})")
try:
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"  GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
              f"{p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
    else:
        print("  GPU: none visible to torch")
except Exception as err:
    print(f"  torch.cuda check failed: {err}")
for module in ("blocksparse", "blocksparse.kernels", "blocksparse.kernels.roofline", "blocksparse.integration.peft"):
    try:
        importlib.import_module(module)
        print(f"  import {module}: ok")
    except Exception as err:
        print(f"  import {module}: FAILED ({type(err).__name__}: {err})")
        missing.append(module)
if "torch" in missing or "blocksparse" in missing:
    sys.exit(1)
EOF
}

if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        >/dev/null 2>&1; then
    echo "gpu_check.sh: torch ($PYTHON) sees no CUDA device; on a CPU use --dry-run" >&2
    exit 2
fi
MODE="GPU"
[ "$DRY_RUN" = 1 ] && MODE="DRY RUN (CPU, tiny settings)"
echo "gpu_check: $MODE -> $OUT_DIR"

export PYTHON REPO
export -f env_report
run_step env 60 bash -c env_report

# ---------------------------------------------------------------- 2. CUDA tests
# The kernel tests: they run on CUDA tensors when a GPU is present (no interpreter).
TEST_FILES=()
for pattern in "tests/kernels/test_*.py" "tests/test_ops.py"; do
    for f in $pattern; do [ -f "$f" ] && TEST_FILES+=("$f"); done
done
if [ ${#TEST_FILES[@]} -eq 0 ]; then
    skip_step tests "no kernel test files found"
elif ! "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
    skip_step tests "pytest missing"
elif [ "$DRY_RUN" = 1 ]; then
    run_step tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only "${TEST_FILES[@]}"
else
    run_step tests 100 "$PYTHON" -m pytest -q -p no:cacheprovider -x --durations=5 \
        --junitxml="$OUT_DIR/logs/tests.xml" "${TEST_FILES[@]}"
fi

# ---------------------------------------------------------------- 3. kernel sweep
# 50 % first (the headline), all Llama-2-7B shapes, decode to prefill M, fwd and fwd+bwd.
if [ "$DRY_RUN" = 1 ]; then
    KERNEL_ARGS=(--device cpu --threads 1 --shapes 64x128 --m 1,32 --sparsity 0.5 --reps 2 --warmup 1)
    SCHEDULE_ARGS=(--device cpu --threads 1 --shapes 64x64 --m 128 --sparsity 0.5 --mode fwd --providers dense,ours
                   --schedules G2 --reps 1 --warmup 1)
    TILE_ARGS=(--device cpu --threads 1 --mask grouped --shapes 128x128 --m 128 --sparsity 0.5 --mode both
               --providers dense,ours --reps 1 --warmup 1)
else
    KERNEL_ARGS=(--shapes 4096x4096,11008x4096,4096x11008 --m 1,16,64,256,2048,4096 --sparsity 0.5,0.75
                 --mode both --rep-ms 40 --time-budget 110)
    SCHEDULE_ARGS=(--shapes 4096x4096,11008x4096 --m 2048 --sparsity 0.5,0.75 --mode fwd --providers dense,ours
                   --schedules G1,G2,G4,G8,G4nc --rep-ms 40 --time-budget 30)
    TILE_ARGS=(--mask grouped --shapes 4096x4096 --m 2048 --sparsity 0.5,0.75 --mode both --providers dense,ours
               --rep-ms 40 --time-budget 60)
fi
run_step kernels 130 "$PYTHON" benchmarks/bench_kernels.py --out "$OUT_DIR/kernels" "${KERNEL_ARGS[@]}"

# ---------------------------------------------------------------- 4. model benchmark
if [ "$DRY_RUN" = 1 ]; then
    MODEL_ARGS=(--device cpu --threads 1 --config tiny --quick --reps 1 --prompt-len 16 --decode-prompt 8 --new-tokens 2
                --train-len 16)
else
    MODEL_ARGS=(--config llama2-7b --num-layers 8 --prompt-len 2048 --decode-prompt 128 --new-tokens 32
                --decode-batch 1,16 --train-len 1024 --reps 3)
fi
run_step model 150 "$PYTHON" benchmarks/bench_model.py --out "$OUT_DIR/model" "${MODEL_ARGS[@]}"

# ---------------------------------------------------------------- 5. schedule variants (G) at prefill
run_step schedules 45 "$PYTHON" benchmarks/bench_kernels.py --out "$OUT_DIR/schedules" "${SCHEDULE_ARGS[@]}"

# ---------------------------------------------------------------- 6. grouped masks, autotuned tiles
# Masks whose groups of 8 block rows share their columns (the union is the density), every
# launch autotuned: autotune.md gives each candidate tile's time (forward and dX), the
# sm_90 wide tile 256 x 128 at one CTA per SM against 128 x 128 at two; ~16 compiles
# (4 tiles x 2 passes, forward and dX) come first, so it gets more time than its sweep.
run_step tiles 90 env BLOCKSPARSE_AUTOTUNE=1 "$PYTHON" benchmarks/bench_kernels.py --out "$OUT_DIR/tiles" \
    "${TILE_ARGS[@]}"

# ---------------------------------------------------------------- 7. compile report
if [ ! -f benchmarks/compile_report.py ]; then
    skip_step compile "benchmarks/compile_report.py not found"
elif [ "$DRY_RUN" = 1 ]; then
    run_step compile 60 "$PYTHON" benchmarks/compile_report.py --help
else
    mkdir -p "$OUT_DIR/compile"
    run_step compile 60 "$PYTHON" benchmarks/compile_report.py --arch 90 --jobs 8 \
        --json "$OUT_DIR/compile/compile_report.json"
fi

# ---------------------------------------------------------------- 8. summary
{
    echo "# gpu_check summary ($MODE)"
    echo
    echo "- when: $(date -u '+%Y-%m-%d %H:%M UTC'), total $(( $(date +%s) - SCRIPT_START )) s"
    echo "- output: $OUT_DIR"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    for i in "${!STEPS[@]}"; do
        echo "| ${STEPS[$i]} | ${STATUS[$i]} | ${SECONDS_TAKEN[$i]} |"
    done
    echo
    "$PYTHON" -m blocksparse.bench.common headline "$OUT_DIR" 2>&1 || echo "(headline numbers unavailable)"
} > "$OUT_DIR/summary.md"
echo
cat "$OUT_DIR/summary.md"

if [ "$PACK" = 1 ]; then
    ARCHIVE="$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
    if tar -czf "$ARCHIVE" -C "$OUT_DIR" --exclude=./gpu_check.log . ; then
        find "$OUT_DIR" -mindepth 1 ! -name summary.md ! -name gpu_check.log -delete
        chmod 644 "$ARCHIVE"
        mv "$ARCHIVE" "$OUT_DIR/gpu_check.tar.gz"
        echo "packed: $OUT_DIR/gpu_check.tar.gz (plus summary.md and gpu_check.log beside it)"
    else
        rm -f "$ARCHIVE"
        echo "packing failed; results left unpacked in $OUT_DIR"
    fi
fi

FAILED=0
for s in "${STATUS[@]}"; do
    case "$s" in ok|skipped*) ;; *) FAILED=1 ;; esac
done
exit $FAILED
