"""The one-predictor path through the rollout collector: the same GRPO steps, their numbers and their cost.

Runs `--steps` full steps (collect_rollouts + GRPOTrainer.train_on, LocalEngine sharing the
trainer's module) on SmolLM2-135M-Instruct with real_model.py's prompts and loss settings, and
prints one JSON line: per step the mean reward, loss and grad norm, and the wall and process CPU
seconds of the rollouts, of the collector's own part of them (the rollouts minus the time inside
`engine.generate`) and of the whole step (CPU time is the fairer cost on a shared machine). A step
whose groups all have one reward trains nothing (loss null): compare full steps that trained.
Uses whatever `dspy_p2o` is importable, so the same command measures two checkouts: one with the
program-executing collector, `collect_rollouts(engine, program, renderers, examples, metric, k=,
sampling=)`, and one from before it (commit 7049a7f and older), whose direct one-predictor collector
`collect_rollouts(engine, renderer, examples, reward_fn, ...)` rendered the prompt without running the
program's forward. Seeds of a batch are derived differently in the two, so the samples (and rewards)
differ: compare the times.

    PYTHONPATH=/path/to/old python benchmarks/one_predictor_path.py --json old.json
    PYTHONPATH=/path/to/new python benchmarks/one_predictor_path.py --json new.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from real_model import LOSS, examples, metric, program, renderer_for, renderers_for  # noqa: E402  (benchmarks/ is the script's dir)


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
    import dspy_p2o.rollouts as rollouts_module
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.models import materialize
    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

    config = TrainerConfig(**LOSS, micro_batch_tokens=4096, warmup_ratio=0.0, gradient_checkpointing=False)
    trainer = GRPOTrainer(str(materialize("smollm2-135m-instruct")), config=config, temperature=0.6)
    engine = LocalEngine(trainer.model, trainer.tokenizer)  # shares the trainer's module
    in_engine = _time_calls(engine)  # the collector's own cost = rollout time - time inside engine.generate
    batch = examples(args.questions)
    if hasattr(rollouts_module, "make_reward_fn"):  # the direct collector (7049a7f and older)
        collector = "direct"
        trainer.engine = engine
        renderer = renderer_for(trainer.tokenizer)
        reward_fn = rollouts_module.make_reward_fn(renderer, metric)

        def collect(step: int):
            return rollouts_module.collect_rollouts(engine, renderer, batch, reward_fn, k=args.k, temperature=0.6,
                                                    max_tokens=args.max_tokens, seed=step, progress=False)

        def train(rollouts):
            return trainer.train_on(rollouts)
    else:  # the program-executing collector
        from dspy_p2o.engines.base import SamplingParams
        from dspy_p2o.rewards import safe_metric

        collector = "program"
        prog = program()
        renderers = renderers_for(prog, trainer.tokenizer)
        scored = safe_metric(metric)

        def collect(step: int):
            sampling = SamplingParams(temperature=0.6, max_tokens=args.max_tokens, seed=step)
            return rollouts_module.collect_rollouts(engine, prog, renderers, batch, scored, k=args.k,
                                                    sampling=sampling).rollouts

        def train(rollouts):
            return trainer.train_on(rollouts, after_step=lambda: engine.sync_weights(trainer.model))
    steps = []
    for step in range(args.warmup + args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        in_engine.update(wall_s=0.0, cpu_s=0.0)
        rollouts = collect(step)
        rollout_wall, rollout_cpu = time.perf_counter() - wall, time.process_time() - cpu
        metrics = train(rollouts)
        steps.append({"reward_mean": metrics["reward_mean"], "loss": metrics.get("loss"),
                      "grad_norm": metrics.get("grad_norm"), "tokens": sum(len(c.completion_ids) for r in rollouts
                                                                           for c in r.calls),
                      "rollout_wall_s": rollout_wall, "rollout_cpu_s": rollout_cpu,
                      "generate_wall_s": in_engine["wall_s"], "generate_cpu_s": in_engine["cpu_s"],
                      "collector_wall_s": rollout_wall - in_engine["wall_s"],
                      "collector_cpu_s": rollout_cpu - in_engine["cpu_s"],
                      "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
    timed = steps[args.warmup:]
    doc = {"dspy_p2o": str(Path(dspy_p2o.__file__).parent), "collector": collector,
           "args": vars(args) | {"json": str(args.json)}, "torch_threads": torch.get_num_threads(), "steps": steps,
           **{f"median_{key}": statistics.median(s[key] for s in timed)
              for key in ("rollout_wall_s", "rollout_cpu_s", "collector_wall_s", "collector_cpu_s", "wall_s", "cpu_s")}}
    print(json.dumps(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


def _time_calls(engine) -> dict[str, float]:
    """Accumulate the wall and process CPU seconds spent inside `engine.generate` (reset by the caller)."""
    spent = {"wall_s": 0.0, "cpu_s": 0.0}
    generate = engine.generate

    def timed(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return generate(*args, **kwargs)
        finally:
            spent["wall_s"] += time.perf_counter() - wall
            spent["cpu_s"] += time.process_time() - cpu

    engine.generate = timed
    return spent


if __name__ == "__main__":
    main()
