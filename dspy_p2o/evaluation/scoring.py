"""Answer extraction and checking: the one scoring path of `eval` and `score`.

The extracted answer of a completion is the program's answer field when the completion
parses in the DSPy adapter's format (unwrapped from a \\boxed{} when it holds one), else
the last \\boxed{} of the whole completion. It is checked against the gold answer with
math-verify (`dspy_p2o.rewards.check_answer`, in worker processes with a time limit).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import dspy
from tqdm.auto import tqdm

from dspy_p2o.rewards import DEFAULT_TIMEOUT, check_answer, extract_boxed

Parser = Callable[[str], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Extracted:
    answer: str | None
    source: str  # "field" (the program's answer field), "boxed" (last \boxed{}), or "none"


def answer_field_of(signature: type[dspy.Signature]) -> str:
    """The output field holding the final answer: `answer` when present, else the last output."""
    outputs = list(signature.output_fields)
    if not outputs:
        raise ValueError(f"signature {signature.__name__} has no output fields")
    return "answer" if "answer" in outputs else outputs[-1]


def adapter_parser(signature: type[dspy.Signature], adapter: dspy.Adapter | None = None) -> Parser:
    """A tokenizer-free parser with the same adapter the Renderer uses (for `score`)."""
    adapter = adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)

    def parse(text: str) -> dict[str, Any] | None:
        try:
            return adapter.parse(signature, text)
        except Exception:  # DSPy raises AdapterParseError (and others) for malformed output
            return None

    return parse


class AnswerExtractor:
    """Completion text -> final answer. `parse=None` (raw prompting) uses the last \\boxed{} only."""

    def __init__(self, parse: Parser | None = None, answer_field: str = "answer") -> None:
        self.parse = parse
        self.answer_field = answer_field

    def __call__(self, completion: str) -> Extracted:
        fields = self.parse(completion) if self.parse is not None else None
        value = None if fields is None else fields.get(self.answer_field)
        if value is not None and str(value).strip():
            text = str(value).strip()
            # A boxed answer field means its box; an unclosed box is no finished answer.
            return Extracted(extract_boxed(text) if "\\boxed" in text or "\\fbox" in text else text, "field")
        boxed = extract_boxed(completion)
        return Extracted(boxed, "boxed") if boxed is not None else Extracted(None, "none")


@dataclass(frozen=True)
class Scored:
    answer: str | None
    source: str
    correct: bool
    reason: str  # a rewards.Verdict reason: correct, wrong, empty, unparseable, gold_unparseable, timeout, error


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def score_completions(
    completions: Sequence[str],
    golds: Sequence[Any],
    extractor: AnswerExtractor,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[Scored]:
    """Extract and check each completion against its gold answer (same order).

    Checks run on a few threads; each thread borrows one math-verify worker process,
    so the threads only wait on pipes (the GIL is not the bottleneck).
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")

    def one(pair: tuple[str, Any]) -> Scored:
        completion, gold = pair
        extracted = extractor(completion or "")
        verdict = check_answer(extracted.answer, gold, timeout)
        return Scored(extracted.answer, extracted.source, verdict.correct, verdict.reason)

    pairs: Iterable = zip(completions, golds)
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        results = pool.map(one, pairs)
        return list(tqdm(results, total=len(completions), desc=desc, disable=not progress, leave=False))
