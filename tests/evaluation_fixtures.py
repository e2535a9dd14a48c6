"""Helpers shared by the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

from dspy_p2o.data import load_benchmark


def gold_text(answer) -> str:
    """A gold answer as a model would box it: OlympiadBench's list joined, `$` kept as math-verify sees it."""
    return ", ".join(answer) if isinstance(answer, (list, tuple)) else str(answer)


def write_gold_predictions(path: Path, benchmark: str, key: str = "index", every: int = 1) -> int:
    """Each benchmark row's own gold as a boxed completion; returns the number of lines."""
    examples = load_benchmark(benchmark)[::every]
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            ref = ex.index if key == "index" else ex.id
            completion = f"Reasoning goes here.\nSo the final answer is \\boxed{{{gold_text(ex.answer)}}}."
            f.write(json.dumps({key: ref, "completion": completion}) + "\n")
    return len(examples)
