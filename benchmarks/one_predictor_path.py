"""The one-predictor path before and after a change: the same GRPO steps, their numbers and their cost.

Runs `--steps` full steps (collect_rollouts + GRPOTrainer.train_on, LocalEngine sharing the
trainer's module) on SmolLM2-135M-Instruct with real_model.py's prompts and loss settings, and
prints one JSON line: per step the mean reward, loss and grad norm (equal before and after when
the change keeps the behaviour: same seeds, same tokens, same update), and the wall and process
CPU seconds (CPU time is the fairer cost on a shared machine). Uses whatever `dspy_p2o` is
importable, so the same command measures two checkouts:

    PYTHONPATH=/path/to/old python benchmarks/one_predictor_path.py --json old.json
    PYTHONPATH=/path/to/new python benchmarks/one_predictor_path.py --json new.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from real_model import LOSS, examples, metric, renderer_for  # noqa: E402  (benchmarks/ is the script's dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import dspy_p2o
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.models import materialize
    from dspy_p2o.rollouts import collect_rollouts, make_reward_fn
    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

    config = TrainerConfig(**LOSS, micro_batch_tokens=4096, warmup_ratio=0.0, gradient_checkpointing=False)
    trainer = GRPOTrainer(str(materialize("smollm2-135m-instruct")), config=config, temperature=0.6)
    engine = LocalEngine(trainer.model, trainer.tokenizer)
    trainer.engine = engine
    renderer = renderer_for(trainer.tokenizer)
    reward_fn = make_reward_fn(renderer, metric)
    batch = examples(args.questions)
    steps = []
    for step in range(args.warmup + args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        rollouts = collect_rollouts(engine, renderer, batch, reward_fn, k=args.k, temperature=0.6,
                                    max_tokens=args.max_tokens, seed=step, progress=False)
        metrics = trainer.train_on(rollouts)
        steps.append({"reward_mean": metrics["reward_mean"], "loss": metrics.get("loss"),
                      "grad_norm": metrics.get("grad_norm"), "wall_s": time.perf_counter() - wall,
                      "cpu_s": time.process_time() - cpu})
    timed = steps[args.warmup:]
    doc = {"dspy_p2o": str(Path(dspy_p2o.__file__).parent), "args": vars(args) | {"json": str(args.json)},
           "steps": steps, "median_wall_s": statistics.median(s["wall_s"] for s in timed),
           "median_cpu_s": statistics.median(s["cpu_s"] for s in timed)}
    print(json.dumps(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
