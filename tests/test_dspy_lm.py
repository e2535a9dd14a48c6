"""Real DSPy programs served by the local engine through DSPy's custom-engine hook."""

import dspy
import pytest

from dspy_p2o.engines import LocalEngine


@pytest.fixture(scope="module")
def engine(format_model_dir):
    return LocalEngine(format_model_dir)


def test_chain_of_thought_call_parses(engine):
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=engine.dspy_lm(temperature=0.0, max_tokens=48)):
        pred = program(question="What is 2 + 2?")
    assert pred.answer is not None and pred.answer.strip().isdigit()
    assert pred.reasoning


def test_n_samples_through_dspy(engine):
    program = dspy.ChainOfThought("question -> answer")
    lm = engine.dspy_lm(temperature=1.0, max_tokens=48)
    with dspy.context(lm=lm):
        pred = program(question="What is 3 + 3?", config={"n": 3})
    assert len(pred.completions.answer) == 3
    outputs = lm("What is 3 + 3?", n=3)
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    usage = lm.history[-1]["usage"]
    assert usage.get("prompt_tokens", usage.get("input_tokens", 0)) > 0


def test_threaded_evaluate_is_batched_and_correctly_mapped(engine):
    """Many concurrent DSPy calls go through one engine; each caller gets its own answer."""
    program = dspy.ChainOfThought("question -> answer")
    devset = [dspy.Example(question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question")
              for a in range(4) for b in range(4)]
    with dspy.context(lm=engine.dspy_lm(temperature=0.0, max_tokens=48)):
        sequential = [program(question=ex.question).answer for ex in devset]
        result = dspy.Evaluate(devset=devset, metric=lambda g, p, t=None: p.answer == g.answer, num_threads=8)(program)
    threaded = [pred.answer for _, pred, _ in result.results]
    assert threaded == sequential
