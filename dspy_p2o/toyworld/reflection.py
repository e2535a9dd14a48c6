"""A reflection LM for the toy world, served to GEPA as an ordinary `dspy.LM`.

It plays the teacher of P^2O's phase 2 without a neural network: it reads the prompt
GEPA sends (the current instruction and, per example, the question, the policy's answer
and the metric's feedback, which states the gold answer), picks one tag among the failed
examples, infers the rules consistent with that tag's (letter -> gold) pairs and writes an
instruction naming one of them. It is deliberately noisy -- it names a wrong rule, infers
from a single example, or returns the instruction unchanged -- so GEPA's evaluation and
Pareto selection have real work to do (and an instruction that serves one tag fails the
others, so the Pareto front has to keep several). It learns a question's rule only from
the examples it is shown; it never sees the world.
"""

from __future__ import annotations

import json
import random
import re
import threading
from dataclasses import dataclass

import dspy
from dspy.lm15 import Message, Request, Response, Usage

from dspy_p2o.toyworld.task import BASE_INSTRUCTION, RULES, apply_rule, make_instruction

_CODE_BLOCK = re.compile(r"```\n?(.*?)```", re.S)
# DSPy's GEPA asks through its ProposeInstruction signature (ChatAdapter fields); gepa alone, with ``` blocks.
_CURRENT_FIELD = re.compile(r"\[\[ ## current_instruction ## \]\]\n(.*?)\n\n\[\[ ## ", re.S)
_OUTPUT_FIELD = "[[ ## new_instruction ## ]]"
# The metric's feedback on a failure states the gold answer: "Wrong: the answer to '#K g' is h, ..."
_FAILED = re.compile(r"Wrong: the answer to '(#[A-Z]) ([a-z])' is ([a-z])")


@dataclass(frozen=True)
class ReflectionNoise:
    """How often the proposer errs."""

    wrong_rule: float = 0.3  # name a rule that the examples contradict
    one_example: float = 0.2  # infer from one example only (a partial reading of the feedback)
    unchanged: float = 0.1  # propose the current instruction again


def infer_rules(pairs: list[tuple[str, str]]) -> list[str]:
    """Rules consistent with every (letter, gold) pair of one tag."""
    return [r for r in RULES if all(apply_rule(r, d) == g for d, g in pairs)]


class ToyReflection:
    """The `engine=` object behind `reflection_lm()`: `complete(request) -> Response`."""

    def __init__(self, seed: int = 0, noise: ReflectionNoise | None = None) -> None:
        self.noise = noise or ReflectionNoise()
        self.seed = seed
        self._rng = random.Random(f"toy-reflection-{seed}")
        self._lock = threading.Lock()  # DSPy may call from several threads; the rng is shared
        self.calls = 0

    def reply(self, prompt: str, call_seed: int | None = None) -> str:
        """The answer in the format the prompt asks for: DSPy's JSON or chat fields, or gepa's code block."""
        instruction = self.propose(prompt, call_seed)
        if "Respond with a JSON object" in prompt and '"new_instruction"' in prompt:
            return json.dumps({"new_instruction": instruction})
        if _OUTPUT_FIELD in prompt:
            return f"{_OUTPUT_FIELD}\n{instruction}\n\n[[ ## completed ## ]]"
        return f"```\n{instruction}\n```"

    def propose(self, prompt: str, call_seed: int | None = None) -> str:
        """A new instruction for GEPA's reflection prompt. A call that carries a seed (the prompt phase seeds
        each reflection task, which run side by side) draws from its own generator, so what it proposes
        does not depend on the order of the calls; an unseeded call draws from the shared one."""
        # the last match: DSPy's system message first shows the field with a "{current_instruction}" placeholder
        fields = [f for f in _CURRENT_FIELD.findall(prompt) if f.strip() != "{current_instruction}"]
        blocks = _CODE_BLOCK.findall(prompt)
        current = fields[-1].strip() if fields else blocks[0].strip() if blocks else BASE_INSTRUCTION
        failed: dict[str, list[tuple[str, str]]] = {}
        for tag, letter, gold in _FAILED.findall(prompt):
            failed.setdefault(tag, []).append((letter, gold))
        with self._lock:
            self.calls += 1
            rng = self._rng if call_seed is None else random.Random(f"toy-reflection-{self.seed}-{call_seed}")
            noise = self.noise
            if not failed or rng.random() < noise.unchanged:
                return current
            tag = rng.choice(sorted(failed))
            pairs = failed[tag] if rng.random() >= noise.one_example else [rng.choice(failed[tag])]
            candidates = infer_rules(pairs)
            if not candidates or rng.random() < noise.wrong_rule:
                rule = rng.choice([r for r in RULES if r not in candidates])
            else:
                rule = rng.choice(candidates)
        return make_instruction(rule)

    def complete(self, request: Request) -> Response:
        from dspy_p2o.engines.dspy_lm import request_messages

        prompt = "\n".join(m["content"] for m in request_messages(request))
        text = self.reply(prompt, request.config.seed)
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
