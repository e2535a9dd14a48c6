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


WORDS = {1: "one", 2: "two", 3: "three"}  # the fewshot world's answers: a distinct token a demo can show


def answer_of(factor: int, words: bool = False) -> str:
    return WORDS[factor] if words else str(factor)


def hard_examples(words: bool = False) -> list[dspy.Example]:
    out = []
    for kind, factor in (("d", 2), ("t", 3)):
        for n in NUMBERS:
            out.append(dspy.Example(id=f"{kind}{n}", question=question(n), answer=answer_of(factor, words),
                                    factor=factor, n=n).with_inputs("question"))
    return out


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    answer = str(getattr(pred, "answer", "") or "").strip()
    if answer == gold.answer:
        return dspy.Prediction(score=1.0, feedback="Correct.")
    word = "double" if gold.factor == 2 else "triple"
    return dspy.Prediction(score=0.0, feedback=f"Incorrect: answered {answer!r}. The correct answer is {gold.answer}, "
                                               f"the {word} of {gold.n}.")


def build_policy(out_dir, steps: int | None = None, demos: bool = False):
    """Fine-tune a tiny model to follow the cue; returns a LocalEngine on it. With `demos` (the fewshot
    world) it answers in words and also follows a demonstration: shown one demo (another question with
    its answer) it answers what the demo answered, so a double question's demo solves the doubles."""
    import random

    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.renderer import Renderer
    from dspy_p2o.tiny import build_tiny_model, supervised_finetune

    program = make_program()
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    sig = program.signature
    rules = [(sig.instructions, 1), (DOUBLE, 2), (TRIPLE, 3)]
    calls = [(question(n), instruction, None, factor) for instruction, factor in rules for n in NUMBERS]
    if demos:  # the instruction rules as often as the demos: the plain answer must stay "one"
        examples = hard_examples(words=True)
        calls = calls * 7 + [(q.question, sig.instructions, d, d.factor) for q in examples for d in examples
                             if d.id != q.id]
    texts, pairs = [], []
    for q, instruction, demo, factor in calls:
        msgs = adapter.format(sig.with_instructions(instruction), [demo] if demo else [], {"question": q})
        texts.append("".join(m["content"] for m in msgs)
                     + adapter.format_assistant_message_content(sig, {"answer": answer_of(factor, demos)}))
    model_dir = build_tiny_model(out_dir, texts * 4, vocab_size=1024, hidden_size=64, num_layers=2)
    engine = LocalEngine(model_dir)
    renderer = Renderer(program, engine.tokenizer)
    for q, instruction, demo, factor in calls:
        prompt = renderer.render({"question": q}, instruction=instruction, demos=[demo] if demo else []).token_ids
        text = adapter.format_assistant_message_content(sig, {"answer": answer_of(factor, demos)})
        pairs.append((prompt, engine.tokenizer(text, add_special_tokens=False)["input_ids"]
                      + [engine.tokenizer.eos_token_id]))
    random.Random(0).shuffle(pairs)
    # demo-following (an induction over ~60 tokens) needs a gentler, longer run than the instruction cue
    supervised_finetune(engine.model, pairs, steps=steps or (300 if demos else 60), lr=2e-3 if demos else 5e-3,
                        batch_size=8, pad_id=engine.pad_id)
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


class SamplingReflection:
    """A reflection LM that SAMPLES its proposal -- from `random.Random(request seed)` when the request
    carries a seed, from an unseeded generator otherwise -- and takes a random time to answer, so calls
    made side by side finish in any order. It records the highest number of calls in flight at once."""

    CHOICES = (DOUBLE, TRIPLE, "Answer with the factor.", "Think step by step.")

    def __init__(self) -> None:
        self.seeds: list[int | None] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def complete(self, request):
        import random
        import time

        seed = request.config.seed
        with self._lock:
            self.seeds.append(seed)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(random.random() * 0.05)  # unseeded: the finishing order varies from run to run
            proposal = (random.Random(seed) if seed is not None else random.Random()).choice(self.CHOICES)
        finally:
            with self._lock:
                self.in_flight -= 1
        content = f"[[ ## new_instruction ## ]]\n{proposal}\n\n[[ ## completed ## ]]"
        return Response(id=None, model=request.model, message=Message.assistant(content), finish_reason="stop",
                        usage=Usage(input_tokens=100, output_tokens=10, total_tokens=110))


def sampling_reflection_lm() -> tuple[dspy.LM, SamplingReflection]:
    engine = SamplingReflection()
    return dspy.LM("local/sampling-reflection", engine=engine, cache=False, temperature=1.0), engine
