"""A compound (two-predictor) world for the prompt phase, on the "factor" questions of
prompt_phase_fixtures: `plan` writes a rule, `solve` answers from the question and the rule.

The student is a scripted DSPy custom engine (no model), answering from the request:
- plan ("question -> rule") writes rule "double" when its instruction is DOUBLE, "triple"
  when it is TRIPLE (unless `plan_triples=False`), else "one";
- solve ("question, rule -> answer") answers 2 for rule "double", 3 for "triple", else 1;
  with `solve_triples=True` it also answers 3 for any other rule when its own instruction
  is TRIPLE.

So with the defaults only the plan predictor matters (a plan instruction DOUBLE or TRIPLE
solves its half of the questions). With plan_triples=False, solve_triples=True each predictor
holds one half: evolving plan (DOUBLE) solves the doubles, evolving solve (TRIPLE) the triples.
"""

from __future__ import annotations

import re
import threading

import dspy
from dspy.lm15 import Message, Response, Usage

from prompt_phase_fixtures import DOUBLE, TRIPLE

PLAN, SOLVE = "plan", "solve"  # the predictor names, as named_predictors() gives them


class TwoStep(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("question -> rule")
        self.solve = dspy.Predict("question, rule -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        rule = self.plan(question=question).rule
        return self.solve(question=question, rule=rule)


class ScriptedStudent:
    """A DSPy custom engine: the two-step world's student LM (see the module docstring). It
    records the predictor of every call."""

    def __init__(self, plan_triples: bool = True, solve_triples: bool = False) -> None:
        self.plan_triples, self.solve_triples = plan_triples, solve_triples
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def complete(self, request):
        system, user = str(request.system or ""), request.messages[-1].text or ""  # system: the instruction
        if "starting with the field `[[ ## rule ## ]]`" in user:
            called, field = PLAN, "rule"
            value = ("double" if DOUBLE in system else
                     "triple" if self.plan_triples and TRIPLE in system else "one")
        elif "starting with the field `[[ ## answer ## ]]`" in user:
            called, field = SOLVE, "answer"
            match = re.search(r"\[\[ ## rule ## \]\]\n(.*)", user)
            rule = match.group(1).strip() if match else ""
            value = ("2" if rule == "double" else "3" if rule == "triple" else
                     "3" if self.solve_triples and TRIPLE in system else "1")
        else:
            raise AssertionError(f"unexpected request for the two-step student: {user[-200:]!r}")
        with self._lock:
            self.calls.append(called)
        content = f"[[ ## {field} ## ]]\n{value}\n\n[[ ## completed ## ]]"
        return Response(id=None, model=request.model, message=Message.assistant(content), finish_reason="stop",
                        usage=Usage(input_tokens=len(system.split()), output_tokens=3,
                                    total_tokens=len(system.split()) + 3))


def scripted_student_lm(**kwargs) -> tuple[dspy.LM, ScriptedStudent]:
    engine = ScriptedStudent(**kwargs)
    return dspy.LM("local/two-step-student", engine=engine, cache=False), engine
