"""A reflection LM for the toy world, served to GEPA as an ordinary `dspy.LM`.

It plays the teacher of P^2O's phase 2 without a neural network: it reads the prompt
GEPA sends (the current instruction and, per example, the question, the policy's answer
and the metric's feedback, which states the gold answer), infers for each tag the rules
consistent with that tag's (digits -> gold) pairs, and writes an instruction naming them.
It is deliberately noisy -- it names a wrong rule for a tag, leaves tags out, or drops
clauses it was given -- so GEPA's evaluation and Pareto selection have real work to do.
It learns a question's rule only from the examples it is shown; it never sees the world.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass

import dspy
from dspy.lm15 import Message, Request, Response, Usage

from dspy_p2o.toyworld.task import BASE_INSTRUCTION, DEFAULT_RULE, RULES, apply_rule, make_instruction, parse_instruction

_CODE_BLOCK = re.compile(r"```\n?(.*?)```", re.S)
# The metric's feedback states the gold answer: "... the answer to '#K 3719' is 9173 ..."
_GOLD = re.compile(r"answer to '(#[A-Z]) (\d+)' is (\d+)")


@dataclass(frozen=True)
class ReflectionNoise:
    """How often the proposer is wrong: per tag it infers, and per clause it was given."""

    wrong_rule: float = 0.3  # name a rule that the examples contradict
    omit_tag: float = 0.25  # leave a tag it could have named out of the proposal
    drop_clause: float = 0.2  # forget a clause of the current instruction


def infer_rules(pairs: list[tuple[str, str]]) -> list[str]:
    """Non-default rules consistent with every (digits, gold) pair of one tag."""
    return [r for r in RULES if r != DEFAULT_RULE and all(apply_rule(r, d) == g for d, g in pairs)]


class ToyReflection:
    """The `engine=` object behind `reflection_lm()`: `complete(request) -> Response`."""

    def __init__(self, seed: int = 0, noise: ReflectionNoise | None = None) -> None:
        self.noise = noise or ReflectionNoise()
        self._rng = random.Random(f"toy-reflection-{seed}")
        self._lock = threading.Lock()  # DSPy may call from several threads; the rng is shared
        self.calls = 0

    def propose(self, prompt: str) -> str:
        """A new instruction (inside a code block) for GEPA's reflection prompt."""
        blocks = _CODE_BLOCK.findall(prompt)
        current = blocks[0].strip() if blocks else BASE_INSTRUCTION
        by_tag: dict[str, list[tuple[str, str]]] = {}
        for tag, digits, gold in _GOLD.findall(prompt):
            by_tag.setdefault(tag, []).append((digits, gold))
        with self._lock:
            self.calls += 1
            rng = self._rng
            clauses = {t: r for t, r in parse_instruction(current).items() if rng.random() >= self.noise.drop_clause}
            for tag, pairs in sorted(by_tag.items()):
                candidates = infer_rules(pairs)
                if not candidates or rng.random() < self.noise.omit_tag:
                    continue
                if rng.random() < self.noise.wrong_rule:
                    clauses[tag] = rng.choice([r for r in RULES if r not in candidates])
                else:
                    clauses[tag] = rng.choice(candidates)
        return "```\n" + make_instruction(clauses) + "\n```"

    def complete(self, request: Request) -> Response:
        from dspy_p2o.engines.dspy_lm import request_messages

        prompt = "\n".join(m["content"] for m in request_messages(request) if m["role"] == "user")
        text = self.propose(prompt)
        return Response(id=None, model=request.model, message=Message.assistant(text), finish_reason="stop",
                        usage=Usage(input_tokens=len(prompt.split()), output_tokens=len(text.split())))

    def stream(self, request: Request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def reflection_lm(seed: int = 0, noise: ReflectionNoise | None = None) -> dspy.LM:
    """The toy world's reflection LM as a cache-free `dspy.LM` (pass it to GEPA / the prompt phase)."""
    return dspy.LM("local/toyworld-reflection", engine=ToyReflection(seed, noise), cache=False)
