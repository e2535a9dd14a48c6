"""Rollouts: K sampled executions per question, scored, ready for the GRPO trainer.

A rollout is one execution of the program on a question with the policy LM. It records every
predictor call of its trace as a `Call`, which remembers two prompts: `sampled_prompt_ids` is
what the engine sampled from (x_p, or the templated T(x_p, z_p) for a hard question) and
`prompt_ids` is always x_p, the call rendered under its predictor's ORIGINAL instruction --
the prompt the gradient is taken on under context distillation. The program-level metric
gives the rollout's reward; the rollouts of one question share `example_id`: that is the
GRPO group, and every call of a rollout takes its rollout's advantage (trainer/grpo.py).

Two collectors, one data model and one plan (`plan_executions`: which rollouts of a
question are templated):
- `collect_rollouts` (here): a ONE-predictor program. No execution is needed -- the
  predictor's render is the program's prompt -- so all prompts go to one batched
  `engine.generate` per distinct n, each prompt sampled n times from one prefill. Each
  rollout has one call.
- `program_rollouts.collect_program_rollouts`: a program with several predictors, executed.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import dspy
from tqdm.auto import tqdm


@dataclass
class Call:
    """One predictor call of a rollout: what the trainer takes a gradient on."""

    predictor: str  # the predictor's name in its program (`named_predictors()`)
    prompt_ids: list[int]  # x_p: the gradient is taken on this prompt (context distillation)
    sampled_prompt_ids: list[int]  # the prompt the engine sampled from: x_p, or T(x_p, z_p)
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # from the engine, one per completion token
    template: str | None = None  # z_p for a templated call, None for a plain one
    completion_text: str = ""
    finish_reason: str = "stop"

    @property
    def templated(self) -> bool:
        return self.template is not None


@dataclass
class Rollout:
    example_id: str  # rollouts of one question share it: the GRPO group
    calls: list[Call]  # every predictor call of the execution, in call order (may be empty)
    reward: float  # the program-level metric's score of the execution
    template: Any = None  # z (str, or dict predictor -> instruction) the rollout was sampled under; None: plain
    feedback: str = ""  # the metric's feedback (GEPA's error feedback F)

    @property
    def templated(self) -> bool:
        return self.template is not None

    @classmethod
    def of_call(cls, example_id: str, prompt_ids: list[int], sampled_prompt_ids: list[int], completion_ids: list[int],
                behaviour_logprobs: list[float], reward: float, template: str | None = None, *,
                predictor: str = "predict", completion_text: str = "", finish_reason: str = "stop",
                feedback: str = "") -> "Rollout":
        """A one-call rollout (a one-predictor program)."""
        call = Call(predictor, list(prompt_ids), list(sampled_prompt_ids), list(completion_ids),
                    list(behaviour_logprobs), template, completion_text, finish_reason)
        return cls(example_id, [call], reward, template, feedback)


RewardFn = Callable[[dspy.Example, str], "tuple[float, str]"]


class MetricRewardFn:
    """(example, completion text) -> (score, feedback): parse with the renderer, score with the metric.
    `score(example, prediction)` scores a program's own output (compound programs).

    The metric is wrapped in `safe_metric`, so an exception or an unparseable completion
    scores 0 with feedback instead of killing a run -- and every such failure is counted
    (`take_counts`), as is an execution of the program that failed (`failed`), so a metric or
    program that always throws cannot pass for a reward of 0. Safe to call from several threads."""

    def __init__(self, renderer: Any, metric: Callable) -> None:
        from dspy_p2o.rewards import safe_metric

        self.renderer, self.scorer = renderer, safe_metric(metric)
        self._lock = threading.Lock()
        self._calls, self._failures, self._last_error = 0, 0, ""

    def __call__(self, example: dspy.Example, text: str) -> tuple[float, str]:
        return self.score(example, self.renderer.prediction(text))

    def score(self, example: dspy.Example, prediction: dspy.Prediction) -> tuple[float, str]:
        result = self.scorer(example, prediction)
        self._count(getattr(result, "metric_error", None))
        return float(result.score), str(getattr(result, "feedback", "") or "")

    def failed(self, error: str) -> tuple[float, str]:
        """An execution that raised before the metric could score it: 0, counted as a failure."""
        self._count(error)
        return 0.0, error

    def _count(self, error: Any) -> None:
        with self._lock:
            self._calls += 1
            if error:
                self._failures, self._last_error = self._failures + 1, str(error)

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
    through its assigned templates plus plain_per_group samples of x (`plan_executions`), as one
    request per distinct prompt."""
    counts: dict[tuple[int, str | None], int] = {}
    for i, z in plan_executions(examples, k, assignments, plain_per_group):
        counts[(i, z)] = counts.get((i, z), 0) + 1
    requests: list[_Request] = []
    inputs: dict[int, dict[str, Any]] = {}
    x: dict[int, list[int]] = {}
    for (i, z), n in counts.items():
        if i not in inputs:
            inputs[i] = renderer.inputs_of(examples[i])
            x[i] = renderer.render(inputs[i]).token_ids
        sampled = x[i] if z is None else renderer.render(inputs[i], instruction=z).token_ids
        requests.append(_Request(i, x[i], sampled, z, n))
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
            rollouts.append(Rollout.of_call(
                example_id(example, req.example_index), req.prompt_ids, req.sampled_prompt_ids, c.token_ids,
                c.logprobs, score, req.template, predictor=renderer.name, completion_text=c.text,
                finish_reason=c.finish_reason, feedback=feedback))
            bar.update(1)
    bar.close()
    return rollouts


def instruction_for(template: Any, predictor: str) -> str | None:
    """z_p: the instruction a template gives predictor `predictor`, None when it gives none. A str
    template belongs to a one-predictor program; a dict maps predictor names to instructions."""
    if template is None or isinstance(template, str):
        return template
    return template.get(predictor)


def plan_executions(examples: Sequence[Any], k: int, assignments: Mapping[str, Sequence[Any]] | None = None,
                    plain_per_group: int = 0) -> list[tuple[int, Any]]:
    """(example index, template or None) per execution, grouped by example: k executions of x, or
    (k - plain_per_group) under its assigned templates, cycling through them, plus plain_per_group of x
    -- the same split as `plan_requests`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 <= plain_per_group <= k:
        raise ValueError(f"plain_per_group must be in [0, k={k}], got {plain_per_group}")
    assignments = assignments or {}
    plan: list[tuple[int, Any]] = []
    seen: set[str] = set()
    for i, example in enumerate(examples):
        eid = example_id(example, i)
        if eid in seen:
            raise ValueError(f"duplicate example id {eid!r} in the batch: GRPO groups would merge")
        seen.add(eid)
        templates = [z for z in assignments.get(eid, ()) if z]
        n_templated = k - plain_per_group if templates else 0
        plan.extend((i, templates[j % len(templates)]) for j in range(n_templated))
        plan.extend((i, None) for _ in range(k - n_templated))
    return plan
