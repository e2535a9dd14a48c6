"""Example: the maths chain-of-thought program with two worked demos, for small models.

A 135M model (SmolLM2-135M-Instruct) never writes DSPy's output fields from the instruction
alone; two worked examples in the predictor give it the format, so what stays hard is the
arithmetic itself (benchmarks/RESULTS.md, "Which setting gives the model a signal"). Use it with
the JSON adapter: `program: programs/arithmetic_cot.py:build` and `adapter: json`
(benchmarks/configs/smollm2_cpu.yaml).
"""

from __future__ import annotations

import dspy

from dspy_p2o.programs import MathCoT

DEMOS = (
    dict(question="What is 3 + 4?", reasoning="3 + 4 = 7.", answer="7"),
    dict(question="What is 6 * 7?", reasoning="6 * 7 = 42.", answer="42"),
)


def build() -> dspy.Module:
    """A fresh MathCoT whose predictor carries the two demos."""
    program = MathCoT()
    program.cot.predict.demos = [dspy.Example(**demo) for demo in DEMOS]
    return program
