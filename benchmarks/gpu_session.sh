#!/usr/bin/env bash
# The benchmark suite's most important GPU rows in under 10 minutes, the target rows first,
# each step under its own time limit so that a slow one cannot take the rest with it.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]
#
# OUT_DIR defaults to the OUT environment variable when it is set, else ./gpu_results.
# Writes OUT_DIR/<step>.json (rewritten after every row, so a step stopped by its limit
# keeps its finished rows; `python -m benchmarks.run --show FILE` prints the table) and one
# log, OUT_DIR/log.txt. Runs from the repository root without installing the project.
# On a machine without network access, wheels of missing Python packages (e.g. grain,
# array_record, portpicker) are installed from ./.whl when that folder exists: see
# benchmarks/RESULTS.md ("Running the GPU suite").
set -uo pipefail

out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
log=$out/log.txt
site=$(mktemp -d)
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl ||
        { echo "gpu_session: installing .whl/*.whl failed" >&2; exit 1; }
fi
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# step NAME SECONDS COMMAND...: run it with a limit, its output to the terminal and the log.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || echo "== $name ended with status $status" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import importlib.metadata as m, jax; print(jax.devices(), *(f"{p} {m.version(p)}" for p in
      ("jax", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "grain")))'
} 2>&1 | tee -a "$log"

run_suite() {
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" python3 -m benchmarks.run --suite gpu --json "$out/$name.json" "$@"
}
# BERT-large seq 512 MLM training in bf16: the 50% MFU and 1.3x-PyTorch targets, on the
# fast backend against SDPA (each row compiles a 24-layer train step twice on our side).
run_suite bert_large_train 150 --model bert-large-cased --workload train --backend cudnn \
    --peer sdpa
# NorBERT 4 base training against ModernBERT's 312k tokens/s per H100 (bert_jax rows only:
# the PyTorch peer needs the Hub's remote code).
run_suite norbert4_train 80 --model norbert4-base --workload train --backend cudnn --peer sdpa
# Variable-length inference at 0.9x of fixed length or more, and the forward rows.
run_suite bert_base_inference 100 --model bert-base-cased --workload forward \
    --workload variable --backend cudnn --peer sdpa
# Every attention backend against the reference on this GPU, and its speed.
step attention_backends 60 python3 -m benchmarks.attention_backends
# What time is left: BERT-large training's other implementations (reference and jax
# attention, eager PyTorch, torch.compile).
run_suite bert_large_train_all 150 --model bert-large-cased --workload train \
    --backend reference --backend jax --peer eager --peer compile
