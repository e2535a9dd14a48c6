"""A compound-program world: the factor questions of prompt_phase_fixtures, answered in steps.

`plan` names a rule for the question ("times 1", "times 2", "times 3"), `solve` applies the rule it is
given, and in the three-step program `check` -- called only for questions about an even number --
judges the answer. The tiny policy, fine-tuned in seconds, plans "one" under DSPy's default
instruction (so every question is hard), "times 2" under DOUBLE and "times 3" under TRIPLE, and
solves and checks correctly whatever rule it is given: the right instruction is needed in step 1.
"""

from __future__ import annotations

import random

import dspy

from prompt_phase_fixtures import DOUBLE, NUMBERS, TRIPLE, hard_examples, metric, question  # noqa: F401

RULES = {"times 1": 1, "times 2": 2, "times 3": 3}  # rule -> the answer solve gives under it


class PlanSolve(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("question -> rule")
        self.solve = dspy.Predict("question, rule -> answer")

    def forward(self, question):
        rule = self.plan(question=question).rule
        return self.solve(question=question, rule=rule)


class PlanSolveCheck(PlanSolve):
    """PlanSolve plus an optional third call: `check` runs only for questions about an even number."""

    def __init__(self) -> None:
        super().__init__()
        self.check = dspy.Predict("question, answer -> verdict")

    def forward(self, question):
        solved = super().forward(question=question)
        n = int(question.rsplit(" ", 1)[1].rstrip("?"))
        if n % 2 == 0:
            self.check(question=question, answer=solved.answer)
        return solved


def rule_for(instruction: str | None) -> str:
    return {DOUBLE: "times 2", TRIPLE: "times 3"}.get(instruction, "times 1")


def build_policy(out_dir, steps: int = 400, lr: float = 3e-3, hidden_size: int = 128):
    """Fine-tune a tiny model on the three predictors' calls; returns a LocalEngine on it."""
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.renderer import Renderer
    from dspy_p2o.tiny import build_tiny_model, supervised_finetune

    program = PlanSolveCheck()
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    calls = []  # (predictor, inputs, instruction or None, outputs)
    for n in NUMBERS:
        q = question(n)
        for instruction in (None, DOUBLE, TRIPLE):
            calls.append((program.plan, {"question": q}, instruction, {"rule": rule_for(instruction)}))
        for rule, factor in RULES.items():
            calls.append((program.solve, {"question": q, "rule": rule}, None, {"answer": str(factor)}))
            calls.append((program.check, {"question": q, "answer": str(factor)}, None, {"verdict": "ok"}))
    texts = []
    for predictor, inputs, instruction, outputs in calls:
        sig = predictor.signature if instruction is None else predictor.signature.with_instructions(instruction)
        texts.append("".join(m["content"] for m in adapter.format(sig, [], inputs))
                     + adapter.format_assistant_message_content(sig, outputs))
    model_dir = build_tiny_model(out_dir, texts * 3, vocab_size=1024, hidden_size=hidden_size, num_layers=2)
    engine = LocalEngine(model_dir)
    pairs = []
    for predictor, inputs, instruction, outputs in calls:
        renderer = Renderer(predictor, engine.tokenizer, adapter=adapter)
        prompt = renderer.render(inputs, instruction=instruction).token_ids
        text = adapter.format_assistant_message_content(predictor.signature, outputs)
        pairs.append((prompt, engine.tokenizer(text, add_special_tokens=False)["input_ids"]
                      + [engine.tokenizer.eos_token_id]))
    random.Random(0).shuffle(pairs)
    supervised_finetune(engine.model, pairs, steps=steps, lr=lr, batch_size=8, pad_id=engine.pad_id)
    return engine


def save_policy(tmp_path_factory) -> str:
    engine = build_policy(tmp_path_factory.mktemp("compound") / "base")
    out = tmp_path_factory.mktemp("compound") / "policy"
    engine.model.save_pretrained(out)
    engine.tokenizer.save_pretrained(out)
    return str(out)
