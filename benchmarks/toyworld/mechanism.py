"""Mechanism study: what does context distillation need to move a template's effect into the weights?

With the CORRECT template hand-assigned to every hard training question (no GEPA), one
GRPO trainer per setting samples K rollouts per question -- (K - plain) from T(x, z) and
`plain` from x -- takes the gradient on x, and we measure held-out accuracy WITHOUT a
template after every epoch. Settings: plain rollouts per templated group (0, 1, K/2) x
template-ratio handling (mask with the authors' bounds, soft, off).

    python benchmarks/toyworld/mechanism.py --seeds 0 1 2 --epochs 4 --out benchmarks/toyworld/mechanism.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

MAX_TOKENS = 12  # the toy world's answers are a few tokens


def run_setting(world, policy_dir: Path, *, plain: int, ratio: str, k: int, epochs: int, lr: float,
                mini_batch: int, temperature: float, seed: int, max_grad_norm: float = 1.0) -> dict:
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.engines.base import SamplingParams
    from dspy_p2o.renderer import program_renderers
    from dspy_p2o.rewards import safe_metric
    from dspy_p2o.rollouts import collect_rollouts
    from dspy_p2o.template import Template
    from dspy_p2o.toyworld.task import ToyProgram, greedy_accuracy, metric
    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

    config = TrainerConfig(lr=lr, warmup_ratio=0.0, mini_batch_size=mini_batch, template_ratio=ratio,
                           max_grad_norm=max_grad_norm)
    trainer = GRPOTrainer(str(policy_dir), config=config, temperature=temperature, seed=seed)
    engine = LocalEngine(trainer.model, trainer.tokenizer)  # shares the trainer's module: no weight sync needed
    program = ToyProgram()
    renderers = program_renderers(program, engine.tokenizer)
    scored = safe_metric(metric)
    (name,) = renderers
    assignments = {e.id: [Template({name: world.oracle_instruction(e.tag)})] for e in world.split("train", "hard")}
    hard_test, easy_test = world.split("test", "hard"), world.split("test", "easy")
    curve = []
    kept = []
    for epoch in range(epochs):
        sampling = SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, seed=seed * 1000 + epoch)
        rollouts = collect_rollouts(engine, program, renderers, world.train, scored, k=k, sampling=sampling,
                                    assignments=assignments, plain_per_group=plain)
        metrics = trainer.train_on(rollouts.rollouts, after_step=lambda: engine.sync_weights(trainer.model))
        kept.append(1.0 - metrics.get("template_masked_frac", 0.0))
        curve.append(greedy_accuracy(engine, program, hard_test, max_tokens=MAX_TOKENS))
        print(f"  plain={plain} ratio={ratio} epoch {epoch + 1}: templated reward "
              f"{metrics.get('reward_mean_templated', float('nan')):.2f}, held-out hard acc {curve[-1]:.3f}", flush=True)
    return {"plain": plain, "ratio": ratio, "seed": seed, "lr": lr, "max_grad_norm": max_grad_norm, "hard_acc_per_epoch": curve,
            "hard_acc": curve[-1], "easy_acc": greedy_accuracy(engine, program, easy_test, max_tokens=MAX_TOKENS),
            "kept": kept}


def main() -> None:
    from dspy_p2o.toyworld.policy import pretrain_policy, torch_threads
    from dspy_p2o.toyworld.task import build_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--plain", type=int, nargs="+", default=None, help="plain rollouts per group (default 0 1 K/2)")
    parser.add_argument("--ratio", nargs="+", default=["mask", "soft", "off"])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0 disables clipping")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/toyworld/mechanism.json"))
    args = parser.parse_args()
    plains = args.plain if args.plain is not None else [0, 1, args.k // 2]
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["seed"], r["plain"], r["ratio"]) for r in rows}
    for seed in args.seeds:
        world = build_world(seed)
        policy_dir = pretrain_policy(world, cache_dir=args.cache_dir)
        for plain, ratio in itertools.product(plains, args.ratio):
            if (seed, plain, ratio) in done:
                continue
            torch.manual_seed(seed)
            t0 = time.time()
            with torch_threads(1):  # tiny model: extra threads only contend (see toyworld.policy.torch_threads)
                row = run_setting(world, policy_dir, plain=plain, ratio=ratio, k=args.k, epochs=args.epochs, lr=args.lr,
                                  mini_batch=args.mini_batch, temperature=args.temperature, seed=seed,
                                  max_grad_norm=args.max_grad_norm)
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            args.out.write_text(json.dumps(rows, indent=1))  # never lose finished settings
            print(json.dumps(row), flush=True)
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| plain per group | template ratio | hard acc (no template) | easy acc | seeds |",
             "|---:|---|---|---|---:|"]
    keys = sorted({(r["plain"], r["ratio"]) for r in rows})
    for plain, ratio in keys:
        sel = [r for r in rows if (r["plain"], r["ratio"]) == (plain, ratio)]
        lines.append(f"| {plain} | {ratio} | {_ms([r['hard_acc'] for r in sel])} | {_ms([r['easy_acc'] for r in sel])} "
                     f"| {len(sel)} |")
    return "\n".join(lines)


def _ms(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    spread = 100 * (statistics.stdev(values) if len(values) > 1 else 0.0)
    return f"{mean:.1f} ± {spread:.1f}"


if __name__ == "__main__":
    main()
