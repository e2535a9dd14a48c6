#!/usr/bin/env bash
# The paper's Qwen3-4B runs on one node: vLLM on the first VLLM_GPUS GPUs, the accelerate
# trainer on the rest, its weights, gradients and AdamW state sharded over them with FSDP2 by
# default (DIST=fsdp2: trainer.sharding=fsdp2; DIST=ddp: a full replica per GPU; DIST=zero:
# DeepSpeed ZeRO-2, untested). fsdp2 and ddp are the multi-process paths tested on CPU with
# torchrun (see benchmarks/gpu/README.md).
#
#   benchmarks/gpu/run.sh self      # P^2O Self-Ref   (benchmarks/configs/p2o_self_ref.yaml)
#   benchmarks/gpu/run.sh teacher   # P^2O Teacher-Ref (benchmarks/configs/p2o_teacher_ref.yaml)
#   benchmarks/gpu/run.sh grpo      # the GRPO baseline
#   NUM_GPUS=8 VLLM_GPUS=2 MODEL=/models/Qwen3-4B benchmarks/gpu/run.sh self epochs=1
#
# Extra arguments are config overrides (key=value) passed to `dspy-p2o train`.
# The servers are started here and attached to by every trainer rank (vllm.url),
# so N ranks do not start N servers; they are stopped when this script exits. Each rank
# samples its share of every batch from the shared policy server; rank 0 syncs its weights.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHICH=${1:?usage: run.sh self|teacher|grpo [key=value ...]}; shift
case "$WHICH" in
  self) CONFIG=benchmarks/configs/p2o_self_ref.yaml ;;
  teacher) CONFIG=benchmarks/configs/p2o_teacher_ref.yaml ;;
  grpo) CONFIG=benchmarks/configs/grpo_baseline.yaml ;;
  *) echo "unknown run '$WHICH' (self|teacher|grpo)" >&2; exit 2 ;;
esac

MODEL=${MODEL:-Qwen/Qwen3-4B}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
VLLM_GPUS=${VLLM_GPUS:-1}                           # >1: tensor parallelism across them
DIST=${DIST:-fsdp2}                                 # fsdp2 | ddp | zero (untested)
POLICY_PORT=${POLICY_PORT:-8000}
REF_PORT=${REF_PORT:-8001}
RUN_DIR=${RUN_DIR:-runs/gpu-$WHICH-$(date +%Y%m%d-%H%M%S)}
LOGS="$RUN_DIR/servers"
mkdir -p "$LOGS"
# hex: a urlsafe key may start with '-', which vllm serve's argparse takes for an option
API_KEY=${API_KEY:-$(python -c "import secrets; print(secrets.token_hex(24))")}
export API_KEY MODEL

TRAIN_GPUS=$(seq -s, "$VLLM_GPUS" $(( NUM_GPUS - 1 )))
SERVE_GPUS=$(seq -s, 0 $(( VLLM_GPUS - 1 )))
NUM_TRAIN=$(( NUM_GPUS - VLLM_GPUS ))
(( NUM_TRAIN >= 1 )) || { echo "need at least one trainer GPU (NUM_GPUS=$NUM_GPUS, VLLM_GPUS=$VLLM_GPUS)" >&2; exit 2; }
case "$DIST" in
  fsdp2) ACCELERATE=multi_gpu; SHARDING=fsdp2 ;;
  ddp) ACCELERATE=multi_gpu; SHARDING=none ;;
  zero) ACCELERATE=zero; SHARDING=none ;;
  *) echo "unknown DIST '$DIST' (fsdp2|ddp|zero)" >&2; exit 2 ;;
esac

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT INT TERM

start() {  # ROLE PORT MEM -> background server in its own process group
  setsid env ROLE="$1" PORT="$2" MEM="$3" GPUS="$SERVE_GPUS" \
    benchmarks/gpu/serve.sh >"$LOGS/$1.log" 2>&1 &
  pids+=($!)
}
wait_healthy() {  # PORT NAME
  for _ in $(seq 1200); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "$2 server died:"; tail -n 40 "$LOGS/$2.log"; exit 1; }; done
    sleep 1
  done
  echo "$2 server not healthy after 20 min:"; tail -n 40 "$LOGS/$2.log"; exit 1
}

if [[ "$WHICH" == self ]]; then
  # policy + frozen initial model share the vLLM GPUs: 0.55 / 0.30 of each
  start policy "$POLICY_PORT" "${POLICY_MEM:-0.55}"
  start reference "$REF_PORT" "${REF_MEM:-0.30}"
  wait_healthy "$POLICY_PORT" policy
  wait_healthy "$REF_PORT" reference
  REF_KWARGS="
  reference:
    url: http://127.0.0.1:$REF_PORT
    api_key: $API_KEY"
else
  start policy "$POLICY_PORT" "${POLICY_MEM:-0.90}"
  wait_healthy "$POLICY_PORT" policy
  REF_KWARGS=""
fi

# The run's config: the benchmark config plus where the servers are (not on the command
# line: the API key must not show up in `ps`).
OVERLAY="$RUN_DIR/gpu_config.yaml"
umask 077
cat >"$OVERLAY" <<EOF
base: $(pwd)/$CONFIG
policy: $MODEL
engine: vllm
trainer:
  sharding: $SHARDING
vllm:
  url: http://127.0.0.1:$POLICY_PORT
  api_key: $API_KEY
  max_concurrency: 256
  request_timeout_s: 7200$REF_KWARGS
EOF

CUDA_VISIBLE_DEVICES="$TRAIN_GPUS" accelerate launch \
  --config_file "benchmarks/gpu/accelerate/$ACCELERATE.yaml" --num_processes "$NUM_TRAIN" \
  -m dspy_p2o.cli train --config "$OVERLAY" --run-dir "$RUN_DIR" "$@"
