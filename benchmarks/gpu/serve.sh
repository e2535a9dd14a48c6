#!/usr/bin/env bash
# Launch one vLLM server for dspy_p2o in the foreground (run it in the background, or let
# run.sh do it). ROLE=policy serves the model being trained (dev mode on: weight reload
# through /collective_rpc); ROLE=reference serves the frozen initial model that reflects
# in GEPA for reflection="self" (no dev mode: nobody may change its weights).
#
#   ROLE=policy    GPUS=0 PORT=8000 MODEL=Qwen/Qwen3-4B API_KEY=... benchmarks/gpu/serve.sh
#   ROLE=reference GPUS=0 PORT=8001 MEM=0.25 MODEL=Qwen/Qwen3-4B API_KEY=... benchmarks/gpu/serve.sh
#
# A LoRA run (trainer.lora) syncs adapters, loaded at run time: give the policy server
# LORA_RANK=<trainer.lora.r> (--enable-lora --max-lora-rank, VLLM_ALLOW_RUNTIME_LORA_UPDATING);
# it serves the base model under its own name too, which is Self-Ref's pi_init: no reference server.
#
# Several GPUs in GPUS (e.g. "0,1") become tensor parallelism (TP=2). DP=2 instead runs two
# data-parallel engine replicas (faster for a 4B model) -- UNTESTED with weight reload:
# check that /collective_rpc reaches every replica on your vLLM version before using it.
set -euo pipefail

ROLE=${ROLE:-policy}
MODEL=${MODEL:?set MODEL to a hub id or a local model directory}
GPUS=${GPUS:-0}
PORT=${PORT:-8000}
API_KEY=${API_KEY:?set API_KEY (e.g. API_KEY=$(python -c "import secrets; print(secrets.token_hex(24))"))}
MEM=${MEM:-0.45}               # fraction of each GPU's memory this server may take
MAX_MODEL_LEN=${MAX_MODEL_LEN:-16384}
NGPU=$(awk -F, '{print NF}' <<<"$GPUS")
DP=${DP:-}
if [[ -n "$DP" ]]; then TP=${TP:-$(( NGPU / DP ))}; else TP=${TP:-$NGPU}; DP=1; fi

args=(
  "$MODEL"
  --host 127.0.0.1 --port "$PORT" --api-key "$API_KEY"
  --served-model-name "$ROLE"
  --logprobs-mode processed_logprobs     # log-probs of the distribution actually sampled from
  --generation-config vllm               # the model's generation_config.json must not change sampling
  --gpu-memory-utilization "$MEM"
  --tensor-parallel-size "$TP" --data-parallel-size "$DP"
  --max-model-len "$MAX_MODEL_LEN"
  --dtype bfloat16
)
if [[ "$ROLE" == policy ]]; then
  export VLLM_SERVER_DEV_MODE=1          # /pause, /collective_rpc reload_weights, /reset_prefix_cache, /resume
  if [[ "${WEIGHT_SYNC:-reload}" == nccl ]]; then
    args+=(--weight-transfer-config '{"backend": "nccl"}')
  fi
  if [[ -n "${LORA_RANK:-}" ]]; then     # vLLM's ranks: 1 8 16 32 64 128 256 320 512 (one >= trainer.lora.r)
    export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
    args+=(--enable-lora --max-lora-rank "$LORA_RANK")
  fi
fi
export CUDA_VISIBLE_DEVICES="$GPUS"
exec vllm serve "${args[@]}" ${EXTRA_ARGS:-}
