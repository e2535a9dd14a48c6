"""A real vLLM CPU server under dspy_p2o: start time, and the trainer/server log-prob difference per step.

    python benchmarks/vllm_cpu.py --json runs/vllm_cpu.json [--epochs 2] [--no-eager]

Builds the tests' format-trained tiny Qwen3 (tied embeddings, head_dim 32), runs
`dspy_p2o.compile(engine="vllm", reflection="self")` with MANAGED policy and reference
servers, and reports: the policy server's cold start, every optimiser step's
`train/sync_logprob_diff` (served vs trainer log-probs after the weight sync: float32
noise means the server serves the trained weights, tied head included), the run's wall
time, and whether any server process or /dev/shm weight dir outlived the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-eager", action="store_true", help="let vLLM compile (slower start)")
    args = parser.parse_args()

    import dspy
    import psutil

    import dspy_p2o
    from dspy_p2o.config import VLLMOptions
    from dspy_p2o.engines.vllm_server import VLLMServer
    from dspy_p2o.metrics import read_metrics
    from dspy_p2o.tiny import build_tiny_model, teach_sum_format
    from loop_fixtures import closeness_metric, sum_examples, tiny_overrides

    work = Path(tempfile.mkdtemp(prefix="vllm-cpu-bench-"))
    base = build_tiny_model(work / "base", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    model = teach_sum_format(base, work / "model")
    options = VLLMOptions(enforce_eager=not args.no_eager, kv_cache_memory_bytes=256 << 20,
                          env={"VLLM_CACHE_ROOT": str(work / "vllm-cache")})

    t0 = time.perf_counter()
    with VLLMServer(model, options):
        start_s = time.perf_counter() - t0

    children = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.perf_counter()
    result = dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(8, 0, "train"),
                              metric=closeness_metric, policy=model, engine="vllm", reflection="self",
                              run_dir=work / "run", vllm=options,
                              **tiny_overrides(tau=0.5, near_hard=False, epochs=args.epochs))
    result.close()
    wall = time.perf_counter() - t0
    diffs = [r["train/sync_logprob_diff"] for r in read_metrics(work / "run" / "metrics.jsonl")
             if "train/sync_logprob_diff" in r]
    left = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in children and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    out = {"server_start_s": round(start_s, 1), "enforce_eager": not args.no_eager, "compile_wall_s": round(wall, 1),
           "epochs": args.epochs, "steps": len(diffs), "sync_logprob_diff_max": max(diffs, default=None),
           "sync_logprob_diff_per_step": diffs, "leftover_server_processes": left,
           "leftover_shm_weight_dirs": [str(p) for p in Path("/dev/shm").glob(f"dspy-p2o-vllm-weights-{os.getpid()}-*")]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "sync_logprob_diff_per_step"}, indent=2))


if __name__ == "__main__":
    main()
