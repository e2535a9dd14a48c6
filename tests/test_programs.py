"""The built-in maths program, loading programs by name/path, and the metric end to end."""

from __future__ import annotations

import dspy
import pytest
from dspy.utils import DummyLM

from dspy_p2o.data import load_benchmark
from dspy_p2o.programs import MathCoT, MathSignature, get_program
from dspy_p2o.rewards import math_metric


def test_signature_fields():
    assert list(MathSignature.input_fields) == ["question"]
    assert list(MathSignature.output_fields) == ["answer"]
    desc = MathSignature.output_fields["answer"].json_schema_extra["desc"]
    assert "final answer only" in desc and "no units or words" in desc
    assert MathSignature.instructions.strip()


def test_math_cot_adds_reasoning():
    program = MathCoT()
    [(name, predictor)] = program.named_predictors()
    assert list(predictor.signature.output_fields) == ["reasoning", "answer"]
    assert predictor.signature.instructions == MathSignature.instructions


def test_get_program_builtin():
    assert isinstance(get_program("math_cot"), MathCoT)
    assert get_program("math_cot") is not get_program("math_cot")  # a fresh program each time


def test_get_program_from_file(tmp_path):
    path = tmp_path / "my_prog.py"
    path.write_text(
        "import dspy\n"
        "program = dspy.Predict('question -> answer')\n"
        "def make():\n"
        "    return dspy.ChainOfThought('question -> answer')\n"
        "class Holder:\n"
        "    Inner = dspy.Predict\n"
        "not_a_program = 3\n"
    )
    assert isinstance(get_program(f"{path}:program"), dspy.Predict)
    assert isinstance(get_program(f"{path}:make"), dspy.ChainOfThought)
    with pytest.raises(TypeError, match="not_a_program"):
        get_program(f"{path}:not_a_program")
    with pytest.raises(AttributeError, match="missing"):
        get_program(f"{path}:missing")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        get_program(f"{tmp_path}/nope.py:program")


def test_get_program_from_module():
    assert isinstance(get_program("dspy_p2o.programs:MathCoT"), MathCoT)
    with pytest.raises(ImportError, match="no_such_module"):
        get_program("no_such_module:thing")


@pytest.mark.parametrize("spec, message", [("raw", "unknown program"), ("gsm_solver", "unknown program"), ("", "non-empty")])
def test_get_program_rejects_bad_names(spec, message):
    with pytest.raises(ValueError, match=message):
        get_program(spec)


def test_math_cot_with_math_metric_end_to_end():
    example = load_benchmark("math500", limit=1)[0]  # gold: \left( 3, \frac{\pi}{2} \right)
    lm = DummyLM([
        {"reasoning": "r = 3 and theta = pi/2.", "answer": r"\left(3, \frac{\pi}{2}\right)"},
        {"reasoning": "r = 3 and theta = pi.", "answer": r"(3, \pi)"},
    ])
    program = MathCoT()
    with dspy.context(lm=lm):
        right = program(**example.inputs())
        wrong = program(**example.inputs())
    assert right.reasoning.startswith("r = 3")
    assert math_metric(example, right).score == 1.0
    result = math_metric(example, wrong)
    assert result.score == 0.0 and r"(3, \pi)" in result.feedback and r"\frac{\pi}{2}" in result.feedback
