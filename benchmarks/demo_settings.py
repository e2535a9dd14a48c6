"""Which setting lets demonstrations unlock what plain rollouts never find, on SmolLM2-135M-Instruct?

For each DSPy adapter, kind and number of demos, and kind of arithmetic question, measures on
training questions (the run's own renderer, engine and metric; T 0.8, K samples per question):
the parse rate (outputs the adapter can read), pass@1 and pass@K (questions with any success)
WITHOUT demos (what GRPO starts from) and WITH demos as a template (what P^2O's few-shot
candidates sample from). A setting is sharp when plain rollouts (almost) never score and demos
unlock some questions.

    python benchmarks/demo_settings.py --questions 12 --json benchmarks/results/demo_settings.json

Demos are drawn from OTHER training questions: "labelled" ones carry the gold answer only (DSPy's
LabeledFewShot; the reasoning field is left out), "worked" ones a one-line reasoning too ("a + b = c."),
"stepwise" ones the tens and units apart ("47 + 38 = 40 + 30 + 7 + 8 = 70 + 15 = 85.").
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

LEVELS = {0: "one-digit + one-digit", 1: "two-digit + two-digit", 2: "three-digit + three-digit",
          3: "two-digit x one-digit", 4: "two-digit x two-digit", 5: "two-digit + one-digit"}


def demo(row: dict, kind: str) -> dict:
    """A demo of `row`: "labelled" (gold answer only), "worked" (`a + b = c.`) or "stepwise" (tens and units
    apart: `47 + 38 = 40 + 30 + 7 + 8 = 70 + 15 = 85.`)."""
    out = {"question": row["question"], "answer": row["answer"]}
    if kind != "labelled":
        from arithmetic_data import worked_solution  # benchmarks/ is the script's folder

        a, op, b = row["question"].removeprefix("What is ").rstrip("?").split()
        out["reasoning"] = worked_solution(int(a), op, int(b), stepwise=kind == "stepwise")
    return out


def measure(engine, adapter_name: str, rows: list[dict], pool: list[dict], *, demos: int, kind: str, k: int,
            max_tokens: int, seed: int) -> dict:
    import dspy

    from dspy_p2o.engines.base import SamplingParams
    from dspy_p2o.program_eval import score_program
    from dspy_p2o.programs import MathCoT
    from dspy_p2o.renderer import make_adapter
    from dspy_p2o.rewards import math_metric
    from dspy_p2o.template import Template

    program = MathCoT()
    examples = [dspy.Example(id=f"q{i}", question=r["question"], answer=r["answer"]).with_inputs("question")
                for i, r in enumerate(rows)]
    assignments = None
    if demos:
        rng = random.Random(seed)
        instruction = program.cot.predict.signature.instructions
        assignments = {}
        for ex in examples:
            others = [r for r in pool if r["question"] != ex.question]
            chosen = [demo(r, kind) for r in rng.sample(others, demos)]
            assignments[ex.id] = [Template({"cot.predict": {"instruction": instruction, "demos": chosen}})]
    start = time.perf_counter()
    scores = score_program(engine, program, examples, math_metric, k=k, adapter=make_adapter(adapter_name),
                           sampling=SamplingParams(temperature=0.8, max_tokens=max_tokens, seed=seed),
                           assignments=assignments)
    samples = len(examples) * k
    return {"parse_rate": 1 - scores.format_failures / samples, "pass@1": scores.pass_at(1),
            f"pass@{k}": scores.pass_at(k), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=12, help="training questions per level")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--adapters", nargs="+", default=["chat", "json"])
    parser.add_argument("--levels", nargs="+", type=int, default=[0, 5, 1, 3], choices=sorted(LEVELS))
    parser.add_argument("--demos", nargs="+", default=["0", "labelled:2", "labelled:4", "worked:2", "worked:4"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.models import materialize

    torch.set_num_threads(2)
    engine = LocalEngine(materialize("smollm2-135m-instruct"), device="cpu", dtype="float32")
    from arithmetic_data import make_rows  # benchmarks/ is the script's folder

    results = []
    for level in args.levels:
        generated = make_rows(args.questions + 32, seed=0, levels=[level])  # the questions (arithmetic_data.py's)
        rows, pool = generated[:args.questions], generated[args.questions:]  # demos: other questions of the kind
        for adapter in args.adapters:
            for spec in args.demos:
                kind, _, n = spec.partition(":")
                row = measure(engine, adapter, rows, pool, demos=int(n or 0), kind=kind, k=args.k,
                              max_tokens=args.max_tokens, seed=args.seed)
                row.update(level=level, adapter=adapter, demos=spec)
                results.append(row)
                print(f"level {level} ({LEVELS[level]}), {adapter}, demos {spec}: parse {row['parse_rate']:.2f}, "
                      f"pass@1 {row['pass@1']:.3f}, pass@{args.k} {row[f'pass@{args.k}']:.3f} ({row['seconds']} s)",
                      flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
