"""What the trainer trains on: rollouts and their predictor calls (a leaf: no DSPy, no torch).

A rollout is one execution of the program on a question with the policy LM. It records every
predictor call of its trace as a `Call`, which remembers two prompts: `sampled_prompt_ids` is
what the engine sampled from (x_p, or the templated T(x_p, z_p) for a hard question) and
`prompt_ids` is always x_p, the call rendered under its predictor's ORIGINAL instruction and
demos -- the prompt the gradient is taken on under context distillation. The program-level
metric gives the rollout's reward; the rollouts of one question share `example_id`: that is the
GRPO group, and every call of a rollout takes its rollout's advantage (trainer/grpo.py).

`GlobalBatch` is what every process knows of the whole batch under N processes: one token-free
`Outcome` per rollout, gathered once per batch by the loop and read by hard mining and the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dspy_p2o.template import Prompt, Template

__all__ = ["Call", "CallShape", "GlobalBatch", "Outcome", "Rollout"]


@dataclass
class Call:
    """One predictor call of a rollout: what the trainer takes a gradient on."""

    predictor: str  # the predictor's name in its program (`named_predictors()`)
    prompt_ids: list[int]  # x_p: the gradient is taken on this prompt (context distillation)
    sampled_prompt_ids: list[int]  # the prompt the engine sampled from: x_p, or T(x_p, z_p)
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # from the engine, one per completion token
    template: Prompt | str | None = None  # z_p for a templated call, None for a plain one
    completion_text: str = ""
    finish_reason: str = "stop"
    inputs: dict[str, Any] | None = None  # the predictor's input fields of this call (what DSPy's trace records)

    @property
    def templated(self) -> bool:
        return self.template is not None


@dataclass
class Rollout:
    example_id: str  # rollouts of one question share it: the GRPO group
    calls: list[Call]  # every predictor call of the execution, in call order (may be empty)
    reward: float  # the program-level metric's score of the execution
    template: Template | Any = None  # z the rollout was sampled under; None: plain
    feedback: str = ""  # the metric's feedback (GEPA's error feedback F)
    prediction: Any = None  # the program's output (what the metric scored); None when the execution failed

    @property
    def templated(self) -> bool:
        return self.template is not None

    @classmethod
    def of_call(cls, example_id: str, prompt_ids: list[int], sampled_prompt_ids: list[int], completion_ids: list[int],
                behaviour_logprobs: list[float], reward: float, template: Any = None, *,
                predictor: str = "predict", completion_text: str = "", finish_reason: str = "stop",
                feedback: str = "") -> "Rollout":
        """A one-call rollout (a one-predictor program)."""
        call = Call(predictor, list(prompt_ids), list(sampled_prompt_ids), list(completion_ids),
                    list(behaviour_logprobs), template, completion_text, finish_reason)
        return cls(example_id, [call], reward, template, feedback)


@dataclass(frozen=True)
class CallShape:
    """What every process knows of a call (a trained sequence) of the global batch: no token ids."""

    prompt_len: int  # x_p
    sampled_prompt_len: int  # the prompt it was sampled from: x_p, or T(x_p, z_p)
    completion_len: int
    templated: bool
    truncated: bool

    @classmethod
    def of(cls, call: Call) -> "CallShape":
        return cls(len(call.prompt_ids), len(call.sampled_prompt_ids), len(call.completion_ids), call.templated,
                   call.finish_reason == "length")


@dataclass(frozen=True)
class Outcome:
    """What every process knows of a rollout of the global batch."""

    example_id: str  # the GRPO group
    reward: float
    templated: bool
    rank: int  # the process that holds the rollout
    calls: tuple[CallShape, ...] = ()

    @classmethod
    def of(cls, rollout: Rollout, rank: int) -> "Outcome":
        return cls(rollout.example_id, float(rollout.reward), rollout.templated, rank,
                   tuple(CallShape.of(c) for c in rollout.calls))


@dataclass(frozen=True)
class GlobalBatch:
    """Every rollout of a batch in rank order (the shares of all processes, concatenated) and where
    this process's share starts in it."""

    outcomes: tuple[Outcome, ...]
    first: int  # index of this process's first rollout in `outcomes`
    local: int = field(default=0)  # this process's number of rollouts

    @classmethod
    def gather(cls, rollouts: Sequence[Rollout], rank: int,
               gather: Callable[[list[Any]], list[Any]] = lambda items: list(items)) -> "GlobalBatch":
        """The global batch from this process's `rollouts` (`gather`: every process's list, concatenated
        in rank order; the identity for one process)."""
        outcomes = tuple(gather([Outcome.of(r, rank) for r in rollouts]))
        first = next((i for i, o in enumerate(outcomes) if o.rank == rank), len(outcomes))
        return cls(outcomes, first, len(rollouts))

    def __len__(self) -> int:
        return len(self.outcomes)
