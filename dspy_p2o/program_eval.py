"""A program's accuracy on held-out questions: the one evaluation path of the loop's validation
and the toy worlds' tables.

The program is executed exactly as training rolls it out (`rollouts.collect_rollouts`: its own
`forward`, every predictor through the renderer and the policy engine), WITHOUT templates unless
`assignments` gives some, and scored by the program-level metric. One sample per question at
temperature 0 is greedy pass@1; k samples give the unbiased pass@k too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import dspy

from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.passk import mean_pass_at_k
from dspy_p2o.renderer import program_renderers
from dspy_p2o.rollouts import collect_rollouts
from dspy_p2o.template import Template

__all__ = ["ProgramScores", "score_program"]


@dataclass
class ProgramScores:
    """Per question, its samples' rewards; and how scoring went."""

    rewards: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0  # the metric or the program's own code raised (scored 0)
    format_failures: int = 0  # outputs outside the adapter's format (scored 0)

    def add(self, pairs: Sequence[tuple[str, float]]) -> None:
        for ident, reward in pairs:
            self.rewards.setdefault(ident, []).append(reward)

    def pass_at(self, k: int = 1) -> float:
        """Mean over questions of the unbiased pass@k; pass@1 is the mean reward (for a binary metric the
        same); nan without questions."""
        if not self.rewards:
            return float("nan")
        if k == 1:
            return sum(sum(r) / len(r) for r in self.rewards.values()) / len(self.rewards)
        return mean_pass_at_k(self.rewards.values(), k)


def score_program(engine: Any, program: dspy.Module, examples: Sequence[Any], metric: Callable, *,
                  sampling: SamplingParams, k: int = 1, adapter: dspy.Adapter | None = None,
                  assignments: Mapping[str, Sequence[Template]] | None = None,
                  max_live: int = 1024) -> ProgramScores:
    """k executions of `program` per example on `engine`, scored by `metric` (any DSPy metric; wrapped
    by `rewards.safe_metric` here)."""
    from dspy_p2o.rewards import safe_metric

    scores = ProgramScores()
    if not examples:
        return scores
    batch = collect_rollouts(engine, program, program_renderers(program, engine.tokenizer, adapter), examples,
                             safe_metric(metric), k=k, sampling=sampling, assignments=assignments, max_live=max_live)
    scores.add([(r.example_id, r.reward) for r in batch.rollouts])
    scores.failures, scores.format_failures = batch.failures, batch.format_failures
    return scores
