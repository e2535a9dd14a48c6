"""Per-process memory of the trainer: one process, 2 processes with DDP, 2 processes with FSDP2.

    python benchmarks/sharding.py [--hidden 512] [--layers 8] [--work runs/bench-sharding] [--json out.json]
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/sharding.py   # freed memory back to the OS: RSS = live

Builds (once, under --work) a random-init Qwen3-shaped model of the given size, then for each layout
runs one GRPO batch (16 rollouts of 4 groups, one optimiser step) under torchrun with the trainer of
`dspy_p2o` (`trainer.sharding` none or fsdp2) and reports, per process, at the optimiser step:
- the bytes of parameters, gradients and AdamW state it holds (a DTensor counts its local shard:
  `dspy_p2o.trainer.sharding.training_state_bytes`), and those bytes per model parameter;
- its resident memory (RSS): once the trainer is built (model loaded, sharded or wrapped), after
  the batch (gradients and AdamW state now exist) and at its peak (ru_maxrss), and how much the batch
  added. RSS also holds the runtime, activations, and memory the process freed but the C allocator
  kept: each process loads the whole model from disk before sharding it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = (("1 process", 1, "none"), ("2 processes, DDP", 2, "none"), ("2 processes, FSDP2", 2, "fsdp2"))


def build_model(directory: Path, hidden: int, layers: int) -> Path:
    if (directory / "config.json").exists():
        return directory
    from dspy_p2o.tiny import build_tiny_model

    return build_tiny_model(directory, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                            num_kv_heads=max(1, hidden // 128), head_dim=64)


def batch(vocab: int):
    """16 short rollouts in 4 groups with varied rewards and lengths, one templated group (short, so
    that activations stay small beside the parameters, gradients and AdamW state)."""
    import torch

    from dspy_p2o.batch import Rollout

    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(10, vocab - 1, (n,), generator=g).tolist()

    groups = []
    for q in range(4):
        x, x_tilde = ids(16 + 4 * q), ids(24 + 4 * q)
        groups.append([Rollout.of_call(f"q{q}", x, x_tilde if q == 0 else x, ids(8 + k), [-1.0] * (8 + k),
                                       float(k % 2), "z" if q == 0 else None) for k in range(4)])
    return groups


def worker(model_dir: str, out: Path, sharding: str) -> None:
    """One process of a layout (under torchrun): one batch, then this process's numbers as JSON."""
    import psutil

    from dspy_p2o.collectives import shard
    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig
    from dspy_p2o.trainer.sharding import training_state_bytes

    trainer = GRPOTrainer(model_dir, config=TrainerConfig(lr=1e-5, sharding=sharding))
    built = psutil.Process().memory_info().rss
    acc = trainer.accelerator
    seen, step = {}, trainer.optimizer.step

    def measuring_step(*args, **kwargs):
        result = step(*args, **kwargs)
        seen.update(training_state_bytes(trainer.model, trainer.optimizer.optimizer))  # grads still held
        return result

    trainer.optimizer.step = measuring_step
    mine = shard(batch(len(trainer.tokenizer)), acc.process_index, acc.num_processes)
    start = time.perf_counter()
    trainer.train_on([r for group in mine for r in group])
    parameters = sum(p.numel() for p in trainer.model.parameters())
    result = {"rank": acc.process_index, "processes": acc.num_processes, "sharding": sharding,
              "parameters": parameters, **seen, "train_s": time.perf_counter() - start,
              "rss_built": built, "rss": psutil.Process().memory_info().rss,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))


def run(model_dir: Path, processes: int, sharding: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(Path(__file__).resolve()), "--worker", str(model_dir), str(out), sharding]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{processes} processes ({sharding}) failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2], Path(sys.argv[3]), sys.argv[4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-sharding"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = build_model(args.work / f"model-{args.hidden}x{args.layers}", args.hidden, args.layers)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {name: run(model, n, sharding, args.work / f"{stamp}-{n}-{sharding}") for name, n, sharding in LAYOUTS}
    mb = 1e6
    print(f"model: {results['1 process'][0]['parameters'] / 1e6:.1f} M parameters (fp32)")
    print("| layout | rank | params MB | grads MB | AdamW MB | total MB | bytes / parameter | RSS built MB "
          "| RSS after the batch MB (added) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ranks in results.items():
        for r in ranks:
            total = r["params"] + r["grads"] + r["optimizer"]
            print(f"| {name} | {r['rank']} | {r['params'] / mb:.1f} | {r['grads'] / mb:.1f} | {r['optimizer'] / mb:.1f} "
                  f"| {total / mb:.1f} | {total / r['parameters']:.2f} | {r['rss_built'] / mb:.0f} "
                  f"| {r['rss'] / mb:.0f} ({(r['rss'] - r['rss_built']) / mb:+.0f}) | {r['peak_rss'] / mb:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
