"""Phase 1 of P^2O with 1 vs N processes on the same global batch (CPU, one thread per process).

    python benchmarks/multi_process.py [--processes 1 2] [--train 16] [--batch 8] [--k 4] [--max-tokens 24]
                                      [--checkpoint-every 1] [--json out.json]

Builds (once, under --work) a tiny Qwen3 taught DSPy's output format for sums (as the tests'
format model), then runs `python -m dspy_p2o.cli train` under torchrun with each process
count on the same config (prompt phase off: phase 1 only; two epochs) and reads the run
directories back. Reported per process count, for epoch 2 (epoch 1 includes start-up):

- epoch_s: wall time of the epoch (between the epoch records of metrics.jsonl);
- rollouts_per_s: the global batch's rollouts of that epoch / epoch_s;
- rollout_s, train_s: rank 0's summed rollout and train time in that epoch;
- wait_frac/rankR: the fraction of the epoch rank R spent blocked at the loop's gathers
  (the reward gather after each batch's rollouts absorbs the ranks' rollout imbalance);
  the waits inside DDP's all-reduce and the trainer's summary gathers are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def closeness_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """Graded reward (1 at the right sum, less the further off): GRPO groups have variance."""
    try:
        return max(0.0, 1.0 - abs(int(str(pred.answer).strip()) - int(gold.answer)) / 10)
    except (TypeError, ValueError):
        return 0.0


def sum_program():
    import dspy

    return dspy.ChainOfThought("question -> answer")


def format_model(directory: Path) -> Path:
    """The tiny model (hidden 32, 2 layers) taught the ChatAdapter format on single-digit sums."""
    if (directory / "config.json").exists():
        return directory
    from dspy_p2o.tiny import build_tiny_model, teach_sum_format

    return teach_sum_format(build_tiny_model(directory.with_name("base"), hidden_size=32, num_layers=2), directory)


def write_config(work: Path, policy: Path, args) -> Path:
    import yaml

    rng = random.Random(1)
    data = work / "train.jsonl"
    rows = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(args.train)]
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in rows))
    config = work / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "policy": str(policy), "epochs": 2, "batch_size": args.batch, "k": args.k, "temperature": 1.0,
        "max_tokens": args.max_tokens, "progress": False, "method": "grpo",
        "checkpoint_every": args.checkpoint_every,
        "trainer": {"lr": 1e-3, "micro_batch_tokens": 2048},
        "data": {"train": str(data), "metric": "benchmarks.multi_process:closeness_metric",
                 "program": "benchmarks.multi_process:sum_program"}}))
    return config


def run(processes: int, config: Path, run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "dspy_p2o.cli", "train", "--config", str(config), "--run-dir", str(run_dir)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    total = time.perf_counter() - start
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in metrics if "epoch/epoch" in m]
    batches = [m for m in metrics if "train/reward_mean" in m and m["train/epoch"] == 2]
    epoch_s = epochs[1]["time"] - epochs[0]["time"]
    out = {"processes": processes, "total_s": total, "epoch_s": epoch_s,
           "rollouts": sum(m["train/rollouts"] for m in batches),
           "rollouts_per_s": sum(m["train/rollouts"] for m in batches) / epoch_s,
           "rollout_s": sum(m["train/time_rollout"] for m in batches),
           "train_s": sum(m["train/time_train"] for m in batches),
           "steps": epochs[1]["epoch/step"]}
    out.update({k.removeprefix("epoch/"): v for k, v in epochs[1].items() if k.startswith("epoch/wait_frac/")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train", type=int, default=16, help="training questions (one epoch)")
    parser.add_argument("--batch", type=int, default=8, help="questions per batch (global)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="batches between checkpoints (the loop's default 1; large = only around the prompt phase)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-multiprocess"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    config = write_config(args.work, format_model(args.work / "model"), args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = [run(n, config, args.work / f"{stamp}-{n}p") for n in args.processes]
    for r in results:
        waits = " ".join(f"{k}={v:.3f}" for k, v in r.items() if k.startswith("wait_frac/"))
        print(f"{r['processes']} process(es): epoch {r['epoch_s']:.1f} s, {r['rollouts_per_s']:.1f} rollouts/s "
              f"({r['rollouts']:.0f} rollouts, rank-0 rollout {r['rollout_s']:.1f} s, train {r['train_s']:.1f} s, "
              f"steps {r['steps']}) {waits}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
