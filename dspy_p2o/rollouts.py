"""Rollouts: K sampled executions per question, scored, ready for the GRPO trainer.

A rollout is one execution of the program on a question with the policy LM. It records every
predictor call of its trace as a `Call`, which remembers two prompts: `sampled_prompt_ids` is
what the engine sampled from (x_p, or the templated T(x_p, z_p) for a hard question) and
`prompt_ids` is always x_p, the call rendered under its predictor's ORIGINAL instruction --
the prompt the gradient is taken on under context distillation. The program-level metric
gives the rollout's reward; the rollouts of one question share `example_id`: that is the
GRPO group, and every call of a rollout takes its rollout's advantage (trainer/grpo.py).

Two collectors, one data model:
- `collect_rollouts`: a ONE-predictor program. No execution is needed -- the predictor's
  render is the program's prompt -- so all prompts go to one batched `engine.generate`
  per distinct n, each prompt sampled n times from one prefill. Each rollout has one call.
- `collect_program_rollouts`: a program with several predictors (or any control flow
  around them). The K executions of every question run concurrently, each in its own
  thread; a predictor call blocks until every running execution is blocked on a call (or
  finished), and that round of calls goes to the engine as one batch (identical prompts
  once, sampled n times). Rounds are formed at these quiescent points only, so which calls
  share a batch -- and with a seed, what is sampled -- does not depend on thread timing.
"""

from __future__ import annotations

import contextvars
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import dspy
from tqdm.auto import tqdm

from dspy_p2o.renderer import program_input_fields


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
            rollouts.append(Rollout.of_call(
                example_id(example, req.example_index), req.prompt_ids, req.sampled_prompt_ids, c.token_ids,
                c.logprobs, score, req.template, predictor=renderer.name, completion_text=c.text,
                finish_reason=c.finish_reason, feedback=feedback))
            bar.update(1)
    bar.close()
    return rollouts


# ---------------------------------------------------------------------- programs with several predictors


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


_EXECUTION: contextvars.ContextVar["_Execution | None"] = contextvars.ContextVar("dspy_p2o_execution", default=None)


@dataclass
class _Execution:
    index: int
    example_index: int
    template: Any
    calls: list[Call] = field(default_factory=list)
    prediction: Any = None
    error: str | None = None


class _Rounds:
    """Batches the predictor calls of concurrently running executions into engine calls.

    A call blocks until every live execution is blocked on a call or finished: that set is
    one round, sent to the engine at once (a prompt several executions share is sampled n
    times from one prefill). Executions are admitted (up to `max_live` threads) only at those
    quiescent points, so the rounds do not depend on thread timing."""

    def __init__(self, engine: Any, sampling: Mapping[str, Any], seed: int | None, progress: bool) -> None:
        self.engine, self.sampling, self.seed, self.progress = engine, dict(sampling), seed, progress
        self._cond = threading.Condition()
        self._waiting: dict[int, list[int]] = {}  # execution -> the prompt ids its blocked call asks for
        self._answers: dict[int, Any] = {}
        self._live = 0
        self.engine_calls = 0

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
        started, failure, round_ = 0, None, 0

        def wrap(body: Callable[[], None]) -> Callable[[], None]:
            def target() -> None:
                try:
                    body()
                finally:
                    with self._cond:
                        self._live -= 1
                        self._cond.notify_all()
            return target

        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._waiting) == self._live)
                if self._live < max_live and started < len(bodies):  # admit more, then wait for them too
                    while self._live < max_live and started < len(bodies):
                        context = contextvars.copy_context()  # DSPy's settings live in context variables
                        thread = threading.Thread(target=context.run, args=(wrap(bodies[started]),), daemon=True,
                                                  name=f"dspy-p2o-rollout-{started}")
                        self._live += 1
                        started += 1
                        threads.append(thread)
                        thread.start()
                    continue
                if not self._waiting:  # nothing live, nothing left to admit
                    break
                batch = sorted(self._waiting.items())
                self._waiting.clear()
            try:
                answers = self._sample(batch, round_) if failure is None else {}
            except BaseException as exc:  # every waiting execution hears of it; raised below
                failure, answers = exc, {}
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
            seed = None if self.seed is None else self.seed + 7_919 * round_ + j
            outputs = self.engine.generate([list(p) for p in prompts], n=n, seed=seed, progress=self.progress,
                                           **self.sampling)
            self.engine_calls += 1
            for prompt, out in zip(prompts, outputs):
                answers.update(zip(askers[prompt], out.completions))
        return answers


class _FormatError(ValueError):
    """A predictor's completion did not follow the adapter's format (DSPy raises AdapterParseError)."""


class _RecordingPredict:
    """Stands in for one predictor's `forward` in the rolled-out program copy: renders the call
    (x_p, and T(x_p, z_p) under the execution's template), asks the round for a completion,
    records the Call and returns what DSPy's predictor would (the parsed fields)."""

    def __init__(self, predictor: Any, renderer: Any, rounds: _Rounds) -> None:
        self.predictor, self.renderer, self.rounds = predictor, renderer, rounds

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
        z = instruction_for(execution.template, name)
        if z is not None and z == self.renderer.instruction:
            z = None  # the template keeps this predictor's instruction: a plain call
        sampled = x if z is None else self.renderer.render(inputs, instruction=z).token_ids
        c = self.rounds.ask(execution.index, sampled)
        execution.calls.append(Call(name, list(x), list(sampled), list(c.token_ids), list(c.logprobs), z, c.text,
                                    c.finish_reason))
        fields = self.renderer.parse(c.text)
        if fields is None:
            raise _FormatError(f"predictor {name!r} answered outside the adapter's format")
        prediction = dspy.Prediction(**fields)
        if dspy.settings.trace is not None:
            dspy.settings.trace.append((self.predictor, inputs, prediction))
        return prediction


def collect_program_rollouts(
    engine: Any,
    program: dspy.Module,
    renderers: Mapping[str, Any],
    examples: Sequence[Any],
    reward_fn: MetricRewardFn,
    *,
    k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_tokens: int = 256,
    seed: int | None = None,
    assignments: Mapping[str, Sequence[Any]] | None = None,
    plain_per_group: int = 0,
    progress: bool = True,
    max_live: int = 512,
) -> list[Rollout]:
    """Execute `program` k times per example with the engine as its LM and score each execution
    with the program-level metric (grouped by example, in example order).

    `renderers` maps every predictor name of `program` to its Renderer. `assignments` maps an
    example id to its templates: dicts predictor name -> instruction (GEPA's candidate
    programs), under which each call of predictor p samples from T(x_p, z_p). An execution
    that raises (a completion outside the format, an error in the program) scores 0 and is
    counted as a failure (`reward_fn.take_counts`); the calls it made are kept, so the
    policy is trained away from them.
    """
    copy = program.deepcopy()
    names = [name for name, _ in copy.named_predictors()]
    if sorted(names) != sorted(renderers):
        raise ValueError(f"renderers for {sorted(renderers)} but the program's predictors are {sorted(names)}")
    rounds = _Rounds(engine, dict(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens), seed,
                     progress)
    for name, predictor in copy.named_predictors():
        predictor.forward = _RecordingPredict(predictor, renderers[name], rounds)  # the instance's, not the class's
    fields = program_input_fields(program)
    executions = [_Execution(e, i, z) for e, (i, z) in enumerate(plan_executions(examples, k, assignments,
                                                                                  plain_per_group))]

    def body(execution: _Execution) -> Callable[[], None]:
        def run() -> None:
            _EXECUTION.set(execution)
            example = examples[execution.example_index]
            try:
                execution.prediction = copy(**{f: example[f] for f in fields})
            except Exception as exc:  # scored 0 below; the engine's own failure is re-raised by the rounds
                execution.error = f"{type(exc).__name__}: {exc}"
        return run

    rounds.run([body(e) for e in executions], max_live)
    rollouts: list[Rollout] = []
    for e in executions:
        example = examples[e.example_index]
        if e.error is None:
            score, feedback = reward_fn.score(example, e.prediction)
        else:
            score, feedback = reward_fn.failed(f"the program failed: {e.error}")
        rollouts.append(Rollout(example_id(example, e.example_index), e.calls, score, e.template, feedback))
    return rollouts
