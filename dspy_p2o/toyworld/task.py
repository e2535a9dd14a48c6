"""The toy world: a verifiable letter-transformation task as a DSPy program.

A question is a tag and a letter (``"#K g"``); the tag decides which rule maps the
letter to the answer (``mirror`` -> ``"t"``); the program reasons "Rule: mirror." before it
answers. The base policy is pretrained to apply
the rules of a few *easy* tags on its own and to apply the rule an instruction names
("Transform the letter. Rule: mirror."). For each *hard* tag it was taught a wrong rule
instead (its *belief*, which never gives the right answer), so no rollout solves a hard
question until the prompt names the true rule -- the situation P^2O is built for: GRPO
sees only zero-reward groups there, GEPA can find instructions that unlock them, and
context distillation can move that knowledge into the weights.

Everything is decided by one seed: which tags are easy or hard, which rule each uses and
believes, and the questions of each split (each tag's letters split between train and
test, stable ids).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import dspy

SYMBOLS = "abcdefghijklmnopqrstuvwxyz"  # a question transforms one letter
TAGS = tuple(f"#{c}" for c in "ABCDEFGHJKLMNPQRSTUVWXYZ")  # 24 tags; each is one token in the policy's tokenizer
DEFAULT_RULE = "copy"


def _shift_map(f: Callable[[int], int]) -> Callable[[str], str]:
    return lambda s: "".join(SYMBOLS[f(SYMBOLS.index(c)) % len(SYMBOLS)] for c in s)


# Each rule is a permutation of the alphabet without fixed points: easy to execute once the rule is
# named, never the default's answer. One letter per question keeps every lookup the policy needs
# content-based (find the letter, the tag, the rule name): with two-digit questions the tiny policy
# had to discover position-based attention first and pretraining stalled on a plateau (RESULTS.md).
RULES: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "next": _shift_map(lambda i: i + 1),
    "prev": _shift_map(lambda i: i - 1),
    "skip": _shift_map(lambda i: i + 2),
    "back": _shift_map(lambda i: i - 2),
    "hop": _shift_map(lambda i: i + 3),
    "leap": _shift_map(lambda i: i + 5),
    "mirror": _shift_map(lambda i: 25 - i),
    "rotate": _shift_map(lambda i: i + 13),
    "swap": _shift_map(lambda i: i ^ 1),
}


BASE_INSTRUCTION = "Transform the letter."
_RULE_RE = re.compile(r"Rule: ([a-z]+)\.")


def make_instruction(rule: str | None, base: str = BASE_INSTRUCTION) -> str:
    """The instruction naming `rule` (the program's own instruction when None): what GEPA should discover."""
    if rule is None:
        return base
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; the rules are {sorted(RULES)}")
    return f"{base} Rule: {rule}."


def parse_instruction(instruction: str | None) -> str | None:
    """The rule an instruction names (the first known one), or None."""
    for name in _RULE_RE.findall(instruction or ""):
        if name in RULES:
            return name
    return None


def apply_rule(rule: str, letter: str) -> str:
    return RULES[rule](letter)


def rules_disagree(a: str, b: str) -> bool:
    """True when rules `a` and `b` give different answers on every letter (a belief that never scores)."""
    return all(apply_rule(a, c) != apply_rule(b, c) for c in SYMBOLS)


def parse_question(question: str) -> tuple[str, str]:
    """(tag, letter) of a question, with a clear error on anything else."""
    parts = str(question).split()
    if len(parts) != 2 or parts[0] not in TAGS or len(parts[1]) != 1 or parts[1] not in SYMBOLS:
        raise ValueError(f"not a toy-world question: {question!r} (expected '<tag> <letter>', e.g. '#K g')")
    return parts[0], parts[1]


class ToySignature(dspy.Signature):
    """Transform the letter."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def reasoning_text(rule: str) -> str:
    """The policy's reasoning before it answers: the rule it applies."""
    return f"Rule: {rule}."


class ToyProgram(dspy.Module):
    """The DSPy program the toy world trains: chain of thought over one signature, as for maths.

    The reasoning names a rule, then the answer applies it. Measured (RESULTS.md §5): when the
    policy had to answer directly, training memorised (tag, letter) pairs instead of re-pointing
    a tag, and held-out letters were lost; with the rule written first, what a template unlocks
    is one token per tag that distillation can move into the weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.solve = dspy.ChainOfThought(ToySignature)

    @property
    def predictor(self) -> dspy.Predict:
        return self.solve.predict

    def forward(self, question: str) -> dspy.Prediction:
        return self.solve(question=question)


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction:
    """Exact match of the answer, with GEPA-style feedback that shows the gold answer."""
    answer = getattr(pred, "answer", None) if pred is not None else None
    answer = None if answer is None else str(answer).strip()
    if answer == gold.answer:
        return dspy.Prediction(score=1.0, feedback=f"Correct: the answer to '{gold.question}' is {gold.answer}.")
    got = "no parseable answer" if answer is None else f"'{answer}'"
    return dspy.Prediction(score=0.0, feedback=f"Wrong: the answer to '{gold.question}' is {gold.answer}, got {got}.")


def greedy_accuracy(engine: Any, program: dspy.Module, examples: Sequence[dspy.Example], *, max_tokens: int,
                    template: Callable[[dspy.Example], Any] | None = None) -> float:
    """pass@1 of ONE greedy execution of `program` per example, scored by `metric`: the loop's own
    validation path (`program_eval.score_program`), WITHOUT templates, or under `template(example)`
    (a `template.Template`, e.g. the oracle instruction)."""
    from dspy_p2o.engines.base import SamplingParams
    from dspy_p2o.program_eval import score_program

    assignments = None
    if template is not None:
        assignments = {e.id: [template(e)] for e in examples}
    scores = score_program(engine, program, examples, metric, assignments=assignments,
                           sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return scores.pass_at(1)


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world: each tag gets `train_per_tag` train and `test_per_tag` held-out questions
    (distinct letters)."""

    num_easy: int = 3
    num_hard: int = 3
    train_per_tag: int = 13
    test_per_tag: int = 13

    def __post_init__(self) -> None:
        non_default = len(RULES) - 1
        if self.num_easy + 2 * self.num_hard > non_default:
            raise ValueError(f"num_easy + 2 * num_hard must be <= {non_default} (the non-default rules: each easy "
                             "tag, each hard tag and each hard tag's belief gets a rule of its own)")
        if min(self.num_easy, self.num_hard, self.train_per_tag, self.test_per_tag) < 1:
            raise ValueError("every WorldConfig size must be >= 1")
        if self.train_per_tag + self.test_per_tag > len(SYMBOLS):
            raise ValueError(f"train_per_tag + test_per_tag must be <= {len(SYMBOLS)} (the letters)")


@dataclass
class World:
    """One seeded world: the tag->rule map, the easy/hard tags, the base policy's beliefs and the splits."""

    seed: int
    easy_rules: dict[str, str]  # tag -> rule the base policy applies on its own
    hard_rules: dict[str, str]  # tag -> rule only an instruction unlocks
    beliefs: dict[str, str] = field(default_factory=dict)  # hard tag -> the wrong rule the base policy applies
    train: list[dspy.Example] = field(default_factory=list)
    test: list[dspy.Example] = field(default_factory=list)

    @property
    def rules(self) -> dict[str, str]:
        return {**self.easy_rules, **self.hard_rules}

    def oracle_instruction(self, tag: str) -> str:
        """The instruction naming `tag`'s rule: the best template GEPA could find for its questions."""
        return make_instruction(self.rules[tag])

    def split(self, name: str, kind: str | None = None) -> list[dspy.Example]:
        examples = {"train": self.train, "test": self.test}[name]
        return [e for e in examples if kind is None or e.kind == kind]


def make_example(tag: str, letter: str, rule: str, kind: str, split: str, seed: int) -> dspy.Example:
    ex = dspy.Example(question=f"{tag} {letter}", answer=apply_rule(rule, letter), kind=kind, tag=tag,
                      id=f"toy{seed}-{split}-{tag[1:]}{letter}")
    return ex.with_inputs("question")


def build_world(seed: int = 0, config: WorldConfig | None = None) -> World:
    """A seeded world: random easy/hard tags, rules and beliefs; each tag's letters split between train and test.

    Every easy rule, hard rule and belief is a different rule, and each belief disagrees with its
    tag's true rule on every letter. Distinct beliefs keep the hard tags apart in the base policy:
    when all of them copied (benchmarks/toyworld/RESULTS.md), a tag re-pointed by training dragged the others to the same rule.
    """
    config = config or WorldConfig()
    rng = random.Random(f"toyworld-{seed}")
    tags = list(TAGS)
    rng.shuffle(tags)
    rules = [r for r in RULES if r != DEFAULT_RULE]
    n_easy, n_hard = config.num_easy, config.num_hard
    for _ in range(1000):
        rng.shuffle(rules)
        hard, beliefs = rules[n_easy: n_easy + n_hard], rules[n_easy + n_hard: n_easy + 2 * n_hard]
        if all(rules_disagree(h, b) for h, b in zip(hard, beliefs)):
            break
    else:  # pragma: no cover - the rules admit many valid draws
        raise RuntimeError("could not draw beliefs that disagree with the hard rules")
    hard_tags = tags[n_easy: n_easy + n_hard]
    world = World(seed, dict(zip(tags[:n_easy], rules[:n_easy])), dict(zip(hard_tags, hard)),
                  dict(zip(hard_tags, beliefs)))
    for tag, rule in world.rules.items():
        kind = "easy" if tag in world.easy_rules else "hard"
        letters = rng.sample(SYMBOLS, config.train_per_tag + config.test_per_tag)
        world.train += [make_example(tag, c, rule, kind, "train", seed) for c in letters[: config.train_per_tag]]
        world.test += [make_example(tag, c, rule, kind, "test", seed) for c in letters[config.train_per_tag:]]
    rng.shuffle(world.train)
    rng.shuffle(world.test)
    return world
