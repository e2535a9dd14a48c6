"""The prompt phase's cost on a real model: one GEPA phase with the policy evaluated on the batched
rollout path (`PolicyStudent`: every evaluation one collection of the engine) and on DSPy's own path
(the engine's `dspy.LM`, one call per metric call from `num_threads` threads), side by side.

SmolLM2-135M-Instruct as the policy (fp32, the local engine), the laptop recipe's program, adapter,
metric and sampling (benchmarks/configs/smollm2_cpu.yaml: the two-demo arithmetic CoT, JSON, T 0.8,
<= 40 tokens), the first `--questions` arithmetic training questions as the hard set. The reflection LM
is `fixed` (an in-process LM proposing the same instruction every call: both paths do the same
reflection work, so the difference is the student's evaluation) or `self` (the frozen model, a second
engine loaded before the first phase, as Self-Ref does). Each path runs `--repeat` times, alternating.
Prints one table row per phase: wall and process CPU seconds (CPU time is the fairer cost on a shared
machine), the student's and the reflection's seconds, metric calls, and seconds per metric call.

    python benchmarks/prompt_phase_speed.py --questions 8 --budget 12 --dev 2 --minibatch 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parents[1]


class FixedReflection:
    """A DSPy custom engine proposing one instruction, in DSPy's chat format, at once."""

    TEXT = "Add or multiply the two numbers digit by digit, then give the result as the answer."

    def complete(self, request):
        from dspy.lm15 import Message, Response, Usage

        content = f"[[ ## new_instruction ## ]]\n{self.TEXT}\n\n[[ ## completed ## ]]"
        return Response(id=None, model=request.model, message=Message.assistant(content), finish_reason="stop",
                        usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--dev", type=int, default=2)
    parser.add_argument("--minibatch", type=int, default=2)
    parser.add_argument("--beam", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="DSPy path's evaluation threads (the recipe's)")
    parser.add_argument("--reflection", choices=("fixed", "self"), default="fixed")
    parser.add_argument("--paths", nargs="+", default=["batched", "dspy"], choices=("batched", "dspy"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import dspy

    from dspy_p2o.config import PromptPhaseConfig
    from dspy_p2o.data import load_trainset
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.engines.base import SamplingParams
    from dspy_p2o.models import materialize
    from dspy_p2o.programs import get_program
    from dspy_p2o.prompt_phase import PolicyStudent, run_prompt_phase
    from dspy_p2o.renderer import make_adapter, program_renderers
    from dspy_p2o.rewards import math_metric

    model = materialize("smollm2-135m-instruct")
    engine = LocalEngine(model, dtype="float32")
    program = get_program(str(ROOT / "programs/arithmetic_cot.py") + ":build")
    hard = load_trainset(ROOT / "benchmarks/data/arithmetic/train.jsonl", limit=args.questions)
    adapter = make_adapter("json")
    sampling = SamplingParams(temperature=0.8, max_tokens=40)
    if args.reflection == "self":
        pi_init = LocalEngine(model, dtype="float32")
        reflection = pi_init.dspy_lm(temperature=1.0, max_tokens=256)
    else:
        reflection = dspy.LM("local/fixed-reflection", engine=FixedReflection(), cache=False)
    config = PromptPhaseConfig(min_hard=2, dev_size=args.dev, budget=args.budget, beam_width=args.beam,
                               num_threads=args.threads, reflection_minibatch_size=args.minibatch)
    rows = []
    print("| path | run | wall s | CPU s | student s | reflection s | metric calls (GEPA + hard_train) | "
          "wall s per call | templates |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in range(args.repeat):
        for path in args.paths:
            student = (PolicyStudent(engine, program_renderers(program, engine.tokenizer, adapter), sampling)
                       if path == "batched" else engine.dspy_lm(temperature=0.8, max_tokens=40))
            with tempfile.TemporaryDirectory() as log_dir, dspy.context(adapter=adapter):
                wall, cpu = time.perf_counter(), time.process_time()
                out = run_prompt_phase(program.deepcopy(), hard, student=student, reflection_lm=reflection,
                                       metric=math_metric, config=config, k=3, seed=run, log_dir=log_dir)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            cost = out.cost
            calls = cost["metric_calls_gepa"] + cost["metric_calls_hard_train"]
            row = {"path": path, "run": run, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "calls": calls,
                   "student_s": cost["student_time_s"], "reflection_s": cost["reflection_time_s"],
                   "templates": len(out.pool), "cost": cost}
            rows.append(row)
            student_s = f"{row['student_s']:.1f}" if path == "batched" else "(in threads)"
            print(f"| {path} | {run} | {wall:.1f} | {cpu:.1f} | {student_s} | {row['reflection_s']:.1f} | "
                  f"{calls} ({cost['metric_calls_gepa']} + {cost['metric_calls_hard_train']}) | "
                  f"{wall / max(calls, 1):.2f} | {len(out.pool)} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
