"""Rollouts: K executions of the program per question, every predictor call recorded, scored.

The one collector, for programs of one predictor or many (`collect_rollouts`): the program's own
`forward` runs -- whatever it does before, between and after its predictor calls is what training
sees, as serving does -- with its predictors replaced (in a copy) by `_RecordingPredict`. A call
renders x_p (the predictor's ORIGINAL instruction and demos) and, under the execution's template,
T(x_p, z_p) (`template.Template`: z_p's instruction and demos), asks the engine for a completion,
records the `batch.Call` and returns what DSPy's predictor would (the parsed fields).

The K executions of every question run concurrently, each in its own thread. A call blocks until
every running execution is blocked on a call (or finished); that round of calls goes to the engine
as one batch: a prompt several executions share is sampled n times from one prefill, and prompts
asked equally often share one `engine.generate`. Rounds form at these quiescent points only, so
which calls share a batch -- and, with a seed, what is sampled -- does not depend on thread timing.
A one-predictor program is one round: each question's prompt sampled K times from one prefill.

Scoring (`RolloutBatch` reports it): the program-level metric scores each execution's output. An
output outside the adapter's format ends the execution as DSPy's own parse error would; it scores
0 and is the POLICY's failure (`format_failures`, never a metric failure). A metric or program
code that raises scores 0 and is counted (`failures`), so a metric that always throws cannot pass
for a reward of 0.
"""

from __future__ import annotations

import contextvars
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import dspy
from dspy.utils.exceptions import AdapterParseError

from dspy_p2o.batch import Call, Rollout
from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.renderer import Renderer, program_input_fields
from dspy_p2o.seeds import derive_seed
from dspy_p2o.template import Template

__all__ = ["PromptTooLong", "RolloutBatch", "collect_rollouts", "example_id", "over_long", "plan_executions"]

_EXECUTION: contextvars.ContextVar["_Execution | None"] = contextvars.ContextVar("dspy_p2o_execution", default=None)


@dataclass
class RolloutBatch:
    """What one collection gives: the rollouts (grouped by example, in example order) and how scoring went."""

    rollouts: list[Rollout]
    scored: int = 0  # executions the metric scored, plus executions whose program code raised
    failures: int = 0  # of those: the metric or the program's own code raised (scored 0)
    last_failure: str = ""
    format_failures: int = 0  # executions ended by an output outside the adapter's format (scored 0)

    def __iter__(self):
        return iter(self.rollouts)

    def __len__(self) -> int:
        return len(self.rollouts)

    def __getitem__(self, index):
        return self.rollouts[index]


class PromptTooLong(ValueError):
    """A rendered call (template and demos included) plus max_tokens does not fit the policy's context."""


def over_long(renderers: Mapping[str, Renderer], examples: Sequence[Any], *, program_inputs: Sequence[str],
              context_length: int | None, max_tokens: int,
              template_for: Callable[[Any], Template | None] | None = None) -> list[tuple[str, int]]:
    """(id, prompt tokens) of every example whose first call cannot fit the policy's context with
    `max_tokens` of completion: rendered through each predictor whose inputs are all program inputs
    (the calls a program can make first; later calls depend on earlier outputs and are checked as
    they are made, `PromptTooLong`), under `template_for(example)` when given (its instruction and
    demos: T(x, z)), else as the program has it."""
    if not context_length or not examples:
        return []
    first_calls = [r for r in renderers.values() if set(r.input_fields) <= set(program_inputs)]
    out = []
    for i, example in enumerate(examples):
        z = template_for(example) if template_for is not None else None
        lengths = [len(_render_first(r, example, z).token_ids) for r in first_calls]
        if lengths and max(lengths) + max_tokens > context_length:
            out.append((example_id(example, i), max(lengths)))
    return out


def _render_first(renderer: Renderer, example: Any, template: Template | None):
    inputs = {f: example[f] for f in renderer.input_fields}
    part = template.get(renderer.name) if template is not None else None
    if part is None:
        return renderer.render(inputs)
    return renderer.render(inputs, instruction=part.instruction, demos=_demos(part))


def example_id(example: Any, index: int) -> str:
    """The example's `id` field when present, else its position in the batch."""
    value = example.get("id", None) if hasattr(example, "get") else None
    return str(value) if value is not None else f"#{index}"


def plan_executions(examples: Sequence[Any], k: int, assignments: Mapping[str, Sequence[Template]] | None = None,
                    plain_per_group: int = 0) -> list[tuple[int, Template | None]]:
    """(example index, template or None) per execution, grouped by example: k executions of x, or
    (k - plain_per_group) under its assigned templates, cycling through them, plus plain_per_group of x."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 <= plain_per_group <= k:
        raise ValueError(f"plain_per_group must be in [0, k={k}], got {plain_per_group}")
    assignments = assignments or {}
    plan: list[tuple[int, Template | None]] = []
    seen: set[str] = set()
    for i, example in enumerate(examples):
        eid = example_id(example, i)
        if eid in seen:
            raise ValueError(f"duplicate example id {eid!r} in the batch: GRPO groups would merge")
        seen.add(eid)
        templates = [Template.from_json(z) for z in assignments.get(eid, ()) if z]
        n_templated = k - plain_per_group if templates else 0
        plan.extend((i, templates[j % len(templates)]) for j in range(n_templated))
        plan.extend((i, None) for _ in range(k - n_templated))
    return plan


@dataclass
class _Execution:
    index: int
    example_index: int
    template: Template | None
    calls: list[Call] = field(default_factory=list)
    prediction: Any = None
    error: BaseException | None = None


class _Rounds:
    """Batches the predictor calls of concurrently running executions into engine calls.

    A call blocks until every live execution is blocked on a call or finished: that set is
    one round, sent to the engine at once. Executions are admitted (up to `max_live` threads)
    only at those quiescent points, so the rounds do not depend on thread timing."""

    def __init__(self, engine: Any, sampling: SamplingParams, progress: bool) -> None:
        self.engine, self.sampling, self.progress = engine, sampling, progress
        self._cond = threading.Condition()
        self._waiting: dict[int, list[int]] = {}  # execution -> the prompt ids its blocked call asks for
        self._answers: dict[int, Any] = {}
        self._live = 0  # executions started and not finished

    def ask(self, execution: int, prompt_ids: list[int]) -> Any:
        """Called from an execution's thread: block until the round with this call is sampled."""
        with self._cond:
            if execution in self._waiting:
                raise RuntimeError("a program execution made two predictor calls at once (dspy.Parallel or threads "
                                   "inside the program?): dspy_p2o rolls out calls one after another per execution")
            self._waiting[execution] = prompt_ids
            self._cond.notify_all()
            self._cond.wait_for(lambda: execution in self._answers)
            answer = self._answers.pop(execution)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def run(self, bodies: Sequence[Callable[[], None]], max_live: int) -> None:
        """Run every body (one execution each) in its own thread, driving the rounds from this thread."""
        threads: list[threading.Thread] = []
        failure: BaseException | None = None
        round_ = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._waiting) == self._live)
                if self._live < max_live and len(threads) < len(bodies):  # admit more, then wait for them too
                    while self._live < max_live and len(threads) < len(bodies):
                        threads.append(self._start(bodies[len(threads)], len(threads)))
                    continue
                if not self._waiting:  # nothing live, nothing left to admit
                    break
                batch = sorted(self._waiting.items())
                self._waiting.clear()
            answers: dict[int, Any] = {}
            if failure is None:
                try:
                    answers = self._sample(batch, round_)
                except BaseException as exc:  # every waiting execution hears of it; raised below
                    failure = exc
            if failure is not None:
                answers = {e: failure for e, _ in batch}
            with self._cond:
                self._answers.update(answers)
                self._cond.notify_all()
            round_ += 1
        for thread in threads:
            thread.join()
        if failure is not None:
            raise failure

    def _start(self, body: Callable[[], None], number: int) -> threading.Thread:
        def target() -> None:
            try:
                body()
            finally:
                with self._cond:
                    self._live -= 1
                    self._cond.notify_all()

        context = contextvars.copy_context()  # DSPy's settings live in context variables
        thread = threading.Thread(target=context.run, args=(target,), daemon=True, name=f"dspy-p2o-rollout-{number}")
        self._live += 1
        thread.start()
        return thread

    def _sample(self, batch: list[tuple[int, list[int]]], round_: int) -> dict[int, Any]:
        """One round: each distinct prompt once, sampled as many times as executions ask for it;
        prompts asked equally often share one `engine.generate`."""
        askers: dict[tuple[int, ...], list[int]] = {}
        for execution, ids in batch:
            askers.setdefault(tuple(ids), []).append(execution)
        by_n: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        for prompt, executions in askers.items():
            by_n[len(executions)].append(prompt)
        answers: dict[int, Any] = {}
        for j, (n, prompts) in enumerate(sorted(by_n.items())):
            seed = None if self.sampling.seed is None else derive_seed(self.sampling.seed, "round", round_, j)
            outputs = self.engine.generate([list(p) for p in prompts], n=n, progress=self.progress,
                                           **{**_sampling_kwargs(self.sampling), "seed": seed})
            for prompt, out in zip(prompts, outputs):
                answers.update(zip(askers[prompt], out.completions))
        return answers


def _sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    return dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_tokens=params.max_tokens, stop=params.stop, stop_token_ids=params.stop_token_ids)


class _FormatError(AdapterParseError):
    """A predictor's completion did not follow the adapter's format: what DSPy's own predictor raises."""


class _RecordingPredict:
    """Stands in for one predictor's `forward` in the rolled-out program copy: renders the call
    (x_p, and T(x_p, z_p) under the execution's template), asks the round for a completion,
    records the Call and returns what DSPy's predictor would (the parsed fields)."""

    def __init__(self, predictor: Any, renderer: Renderer, rounds: _Rounds, context_length: int | None) -> None:
        self.predictor, self.renderer, self.rounds = predictor, renderer, rounds
        self.context_length = context_length

    def __call__(self, **kwargs: Any) -> dspy.Prediction:
        execution = _EXECUTION.get()
        name = self.renderer.name
        if execution is None:
            raise RuntimeError(f"predictor {name!r} was called outside its rollout's thread (dspy.Parallel or threads "
                               "inside the program?): dspy_p2o rolls out calls one after another per execution")
        extra = sorted(set(kwargs) - set(self.renderer.input_fields))
        if extra:
            raise ValueError(f"predictor {name!r} was called with {extra}, which are not its input fields; dspy_p2o "
                             "renders a call from the predictor's own signature, demos and config")
        inputs = self.renderer.inputs_of(kwargs)
        x = self.renderer.render(inputs).token_ids
        z = self._prompt_of(execution.template)
        sampled = x if z is None else self.renderer.render(inputs, instruction=z.instruction,
                                                             demos=_demos(z)).token_ids
        self._check_length(sampled)
        c = self.rounds.ask(execution.index, sampled)
        execution.calls.append(Call(name, list(x), list(sampled), list(c.token_ids), list(c.logprobs), z, c.text,
                                    c.finish_reason, dict(inputs)))
        fields = self.renderer.parse(c.text)
        if fields is None:
            raise _FormatError(type(self.renderer.adapter).__name__, self.renderer.signature, c.text,
                               f"predictor {name!r} answered outside the adapter's format")
        prediction = dspy.Prediction(**fields)
        if dspy.settings.trace is not None:
            dspy.settings.trace.append((self.predictor, inputs, prediction))
        return prediction

    def _prompt_of(self, template: Template | None):
        """z_p, or None when the template leaves this predictor as the program has it (a plain call)."""
        z = template.get(self.renderer.name) if template is not None else None
        if z is None:
            return None
        own_demos = z.demos is None or [dict(d) for d in z.demos] == _demo_dicts(self.predictor.demos)
        return None if z.instruction == self.renderer.instruction and own_demos else z

    def _check_length(self, ids: list[int]) -> None:
        budget = self.rounds.sampling.max_tokens
        if self.context_length and len(ids) + budget > self.context_length:
            raise PromptTooLong(f"predictor {self.renderer.name!r}: the prompt ({len(ids)} tokens, template and demos "
                                f"included) + max_tokens ({budget}) exceeds the policy's context "
                                f"({self.context_length} tokens)")


def _demos(prompt) -> list | None:
    return None if prompt.demos is None else [dspy.Example(**d) for d in prompt.demos]


def _demo_dicts(demos: Sequence[Any]) -> list[dict]:
    return [dict(d.toDict() if hasattr(d, "toDict") else d) for d in demos or ()]


def collect_rollouts(
    engine: Any,
    program: dspy.Module,
    renderers: Mapping[str, Renderer],
    examples: Sequence[Any],
    metric: Callable,
    *,
    k: int,
    sampling: SamplingParams,
    assignments: Mapping[str, Sequence[Template]] | None = None,
    plain_per_group: int = 0,
    progress: bool = False,
    max_live: int = 1024,
) -> RolloutBatch:
    """Execute `program` k times per example with the engine as its LM and score each execution
    with the program-level `metric` (a `rewards.safe_metric`-wrapped metric: it never raises).

    `renderers` maps every predictor name of `program` to its Renderer; `assignments` maps an
    example id to its templates (`template.Template`), under which each call of predictor p is
    sampled from T(x_p, z_p); `sampling.seed` seeds every round (`seeds.derive_seed`). The
    calls an execution made before it failed are kept, so the policy is trained away from them.
    """
    copy = program.deepcopy()
    names = [name for name, _ in copy.named_predictors()]
    if sorted(names) != sorted(renderers):
        raise ValueError(f"renderers for {sorted(renderers)} but the program's predictors are {sorted(names)}")
    rounds = _Rounds(engine, sampling, progress)
    context = getattr(engine, "context_length", None)
    for name, predictor in copy.named_predictors():
        predictor.forward = _RecordingPredict(predictor, renderers[name], rounds, context)  # the instance's own
    fields = program_input_fields(program)
    executions = [_Execution(e, i, z) for e, (i, z) in enumerate(plan_executions(examples, k, assignments,
                                                                                  plain_per_group))]

    def body(execution: _Execution) -> Callable[[], None]:
        def run() -> None:
            _EXECUTION.set(execution)
            example = examples[execution.example_index]
            try:
                execution.prediction = copy(**{f: example[f] for f in fields})
            except BaseException as exc:  # scored 0 below; the engine's own failure (Ctrl-C while sampling
                execution.error = exc  # included) is re-raised by the rounds, not by every execution's thread
        return run

    rounds.run([body(e) for e in executions], max_live)
    return _score(executions, examples, metric)


def _score(executions: Sequence[_Execution], examples: Sequence[Any], metric: Callable) -> RolloutBatch:
    batch = RolloutBatch([])
    for e in executions:
        example = examples[e.example_index]
        if isinstance(e.error, AdapterParseError):
            batch.format_failures += 1
            score, feedback = 0.0, f"{str(e.error).splitlines()[0]}; the output must follow the program's output format"
        elif e.error is not None:
            batch.scored += 1
            batch.failures += 1
            batch.last_failure = f"the program failed: {type(e.error).__name__}: {e.error}"
            score, feedback = 0.0, batch.last_failure
        else:
            batch.scored += 1
            result = metric(example, e.prediction)
            if getattr(result, "metric_error", None):
                batch.failures += 1
                batch.last_failure = str(result.metric_error)
            score, feedback = float(result.score), str(getattr(result, "feedback", "") or "")
        batch.rollouts.append(Rollout(example_id(example, e.example_index), e.calls, score, e.template, feedback,
                                      e.prediction if e.error is None else None))
    return batch
