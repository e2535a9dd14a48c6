"""Rollouts: K sampled completions per question, scored, ready for the GRPO trainer.

A rollout remembers two prompts. `sampled_prompt_ids` is what the engine sampled from
(x, or the templated T(x, z) for a hard question); `prompt_ids` is always the original
x, the prompt the gradient is taken on under context distillation. The rollouts of one
question share `example_id`: that is the GRPO group.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import dspy
from tqdm.auto import tqdm


@dataclass
class Rollout:
    example_id: str  # rollouts of one question share it: the GRPO group
    prompt_ids: list[int]  # x: the gradient is taken on this prompt (context distillation)
    sampled_prompt_ids: list[int]  # the prompt the engine sampled from: x, or T(x, z)
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # from the engine, one per completion token
    reward: float
    template: str | None = None  # z for templated rollouts, None for plain ones
    completion_text: str = ""
    finish_reason: str = "stop"
    feedback: str = ""  # the metric's feedback (GEPA's error feedback F)

    @property
    def templated(self) -> bool:
        return self.template is not None


RewardFn = Callable[[dspy.Example, str], "tuple[float, str]"]


class MetricRewardFn:
    """(example, completion text) -> (score, feedback): parse with the renderer, score with the metric.

    The metric is wrapped in `safe_metric`, so an exception or an unparseable completion
    scores 0 with feedback instead of killing a run -- and every such failure is counted
    (`take_counts`), so a metric that always throws cannot pass for a reward of 0. Safe to
    call from several threads."""

    def __init__(self, renderer: Any, metric: Callable) -> None:
        from dspy_p2o.rewards import safe_metric

        self.renderer, self.scorer = renderer, safe_metric(metric)
        self._lock = threading.Lock()
        self._calls, self._failures, self._last_error = 0, 0, ""

    def __call__(self, example: dspy.Example, text: str) -> tuple[float, str]:
        result = self.scorer(example, self.renderer.prediction(text))
        error = getattr(result, "metric_error", None)
        with self._lock:
            self._calls += 1
            if error:
                self._failures, self._last_error = self._failures + 1, str(error)
        return float(result.score), str(getattr(result, "feedback", "") or "")

    def take_counts(self) -> tuple[int, int, str]:
        """(calls, failed calls, the last failure) since the last take; resets them."""
        with self._lock:
            counts = (self._calls, self._failures, self._last_error)
            self._calls, self._failures, self._last_error = 0, 0, ""
        return counts


def make_reward_fn(renderer: Any, metric: Callable) -> MetricRewardFn:
    """The reward function of a run: see MetricRewardFn."""
    return MetricRewardFn(renderer, metric)


def example_id(example: Any, index: int) -> str:
    """The example's `id` field when present, else its position in the batch."""
    value = example.get("id", None) if hasattr(example, "get") else None
    return str(value) if value is not None else f"#{index}"


@dataclass
class _Request:
    """One prompt sent to the engine with n samples, and what its samples become."""

    example_index: int
    prompt_ids: list[int]  # x
    sampled_prompt_ids: list[int]  # x or T(x, z)
    template: str | None
    n: int


def plan_requests(
    renderer: Any,
    examples: Sequence[Any],
    k: int,
    assignments: Mapping[str, Sequence[str]] | None = None,
    plain_per_group: int = 0,
) -> list[_Request]:
    """Per example: k samples of x, or (k - plain_per_group) samples of T(x, z_i) cycling
    through its assigned templates plus plain_per_group samples of x."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 <= plain_per_group <= k:
        raise ValueError(f"plain_per_group must be in [0, k={k}], got {plain_per_group}")
    assignments = assignments or {}
    requests: list[_Request] = []
    seen: set[str] = set()
    for i, example in enumerate(examples):
        eid = example_id(example, i)
        if eid in seen:
            raise ValueError(f"duplicate example id {eid!r} in the batch: GRPO groups would merge")
        seen.add(eid)
        inputs = renderer.inputs_of(example)
        x = renderer.render(inputs).token_ids
        templates = [z for z in assignments.get(eid, ()) if z]
        n_templated = k - plain_per_group if templates else 0
        if n_templated == 0:
            requests.append(_Request(i, x, x, None, k))
            continue
        counts: dict[str, int] = defaultdict(int)
        for j in range(n_templated):  # a different template per rollout while they last
            counts[templates[j % len(templates)]] += 1
        for z, n in counts.items():
            requests.append(_Request(i, x, renderer.render(inputs, instruction=z).token_ids, z, n))
        if plain_per_group:
            requests.append(_Request(i, x, x, None, plain_per_group))
    return requests


def collect_rollouts(
    engine: Any,
    renderer: Any,
    examples: Sequence[Any],
    reward_fn: RewardFn,
    *,
    k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_tokens: int = 256,
    seed: int | None = None,
    assignments: Mapping[str, Sequence[str]] | None = None,
    plain_per_group: int = 0,
    progress: bool = True,
) -> list[Rollout]:
    """Sample and score k rollouts per example (grouped by example, in example order).

    `assignments` maps an example id to its templates (GEPA's output for hard questions).
    All prompts needing the same n go to ONE batched `engine.generate` call.
    """
    requests = plan_requests(renderer, examples, k, assignments, plain_per_group)
    by_n: dict[int, list[int]] = defaultdict(list)
    for r, req in enumerate(requests):
        by_n[req.n].append(r)
    outputs: dict[int, Any] = {}
    for call, (n, members) in enumerate(sorted(by_n.items())):
        generated = engine.generate(
            [requests[r].sampled_prompt_ids for r in members], n=n, temperature=temperature, top_p=top_p,
            top_k=top_k, max_tokens=max_tokens, seed=None if seed is None else seed + call, progress=progress)
        outputs.update(zip(members, generated))

    rollouts: list[Rollout] = []
    bar = tqdm(total=sum(req.n for req in requests), desc="score", unit="rollout", leave=False, disable=not progress)
    for r, req in enumerate(requests):
        example = examples[req.example_index]
        for c in outputs[r].completions:
            score, feedback = reward_fn(example, c.text)
            rollouts.append(Rollout(
                example_id=example_id(example, req.example_index), prompt_ids=list(req.prompt_ids),
                sampled_prompt_ids=list(req.sampled_prompt_ids), completion_ids=list(c.token_ids),
                behaviour_logprobs=list(c.logprobs), reward=score, template=req.template,
                completion_text=c.text, finish_reason=c.finish_reason, feedback=feedback))
            bar.update(1)
    bar.close()
    return rollouts
