"""A tiny world for the prompt phase: a policy that follows a cue in its instruction, and a
scripted reflection LM that proposes instructions from the feedback it receives.

Questions ask for "the factor of n". Half of them want 2 ("double" questions), half 3
("triple"). The policy, fine-tuned in seconds, answers 1 under DSPy's default instruction,
2 under DOUBLE and 3 under TRIPLE (whatever n is), so every question is hard and each
helpful template solves exactly its half.
"""

from __future__ import annotations

import json
import re
import threading

import dspy
from dspy.lm15 import Message, Response, Usage

DOUBLE = "Double the number in the question."
TRIPLE = "Triple the number in the question."
NUMBERS = range(1, 7)


def make_program() -> dspy.Module:
    return dspy.Predict("question -> answer")


def question(n: int) -> str:
    return f"What is the factor of {n}?"


def hard_examples() -> list[dspy.Example]:
    out = []
    for kind, factor in (("d", 2), ("t", 3)):
        for n in NUMBERS:
            out.append(dspy.Example(id=f"{kind}{n}", question=question(n), answer=str(factor), factor=factor,
                                    n=n).with_inputs("question"))
    return out


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    answer = str(getattr(pred, "answer", "") or "").strip()
    if answer == gold.answer:
        return dspy.Prediction(score=1.0, feedback="Correct.")
    word = "double" if gold.factor == 2 else "triple"
    return dspy.Prediction(score=0.0, feedback=f"Incorrect: answered {answer!r}. The correct answer is {gold.answer}, "
                                               f"the {word} of {gold.n}.")


def build_policy(out_dir, steps: int = 60):
    """Fine-tune a tiny model to follow the cue; returns a LocalEngine on it."""
    import random

    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.renderer import Renderer
    from dspy_p2o.tiny import build_tiny_model, supervised_finetune

    program = make_program()
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    sig = program.signature
    rules = [(sig.instructions, 1), (DOUBLE, 2), (TRIPLE, 3)]
    texts = []
    for instruction, factor in rules:
        for n in NUMBERS:
            msgs = adapter.format(sig.with_instructions(instruction), [], {"question": question(n)})
            texts.append("".join(m["content"] for m in msgs)
                         + adapter.format_assistant_message_content(sig, {"answer": str(factor)}))
    model_dir = build_tiny_model(out_dir, texts * 4, vocab_size=1024, hidden_size=64, num_layers=2)
    engine = LocalEngine(model_dir)
    renderer = Renderer(program, engine.tokenizer)
    pairs = []
    for instruction, factor in rules:
        for n in NUMBERS:
            prompt = renderer.render({"question": question(n)}, instruction=instruction).token_ids
            text = adapter.format_assistant_message_content(sig, {"answer": str(factor)})
            pairs.append((prompt, engine.tokenizer(text, add_special_tokens=False)["input_ids"]
                          + [engine.tokenizer.eos_token_id]))
    random.Random(0).shuffle(pairs)
    supervised_finetune(engine.model, pairs, steps=steps, lr=5e-3, batch_size=8, pad_id=engine.pad_id)
    return engine


class ScriptedReflection:
    """A DSPy custom engine standing in for a reflection LM. It reads the failing examples'
    feedback in the request and proposes the template for the majority cue. It records every
    request, and can be told to fail (unreachable teacher) after some calls, or to propose the
    instructions of `cycle` in turn whatever the feedback says."""

    def __init__(self, fail_after: int | None = None, free_text: bool = False, cycle: tuple[str, ...] = ()) -> None:
        self.free_text = free_text  # reply with the bare instruction, outside any format
        self.cycle = tuple(cycle)
        self.requests: list[str] = []
        self.proposals: list[str] = []
        self.fail_after = fail_after
        self._lock = threading.Lock()

    def complete(self, request):
        text = "\n".join(m.text or "" for m in request.messages)
        with self._lock:
            self.requests.append(text)
            if self.fail_after is not None and len(self.requests) > self.fail_after:
                raise ConnectionError("scripted teacher unreachable")
            turn = len(self.requests) - 1
        doubles = len(re.findall(r"the double of", text))
        triples = len(re.findall(r"the triple of", text))
        proposal = DOUBLE if doubles >= triples else TRIPLE
        if self.cycle:
            proposal = self.cycle[turn % len(self.cycle)]
        with self._lock:
            self.proposals.append(proposal)
        if self.free_text:
            content = f"Sure! {proposal}"
        elif "[[ ## new_instruction ## ]]" in text:  # asked in DSPy's chat format
            content = f"[[ ## new_instruction ## ]]\n{proposal}\n\n[[ ## completed ## ]]"
        else:
            content = json.dumps({"new_instruction": proposal})
        return Response(id=None, model=request.model, message=Message.assistant(content), finish_reason="stop",
                        usage=Usage(input_tokens=len(text.split()), output_tokens=len(content.split()),
                                    total_tokens=len(text.split()) + len(content.split())))


def scripted_reflection_lm(**kwargs) -> tuple[dspy.LM, ScriptedReflection]:
    engine = ScriptedReflection(**kwargs)
    return dspy.LM("local/scripted-reflection", engine=engine, cache=False), engine
