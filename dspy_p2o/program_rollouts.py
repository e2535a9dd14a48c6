"""Rollouts of a compound program: K executions per question, every predictor call recorded.

The K executions of every question run concurrently, each in its own thread, with the
program's predictors replaced (in a copy) by `_RecordingPredict`: a call renders x_p (the
predictor's ORIGINAL instruction) and, under the execution's template, T(x_p, z_p), asks the
engine for a completion and records the `Call`. A call blocks until every running execution is
blocked on a call (or finished); that round of calls goes to the engine as one batch
(identical prompts once, sampled n times from one prefill). Rounds are formed at these
quiescent points only, so which calls share a batch -- and with a seed, what is sampled --
does not depend on thread timing. The program-level metric scores each execution's output.
"""

from __future__ import annotations

import contextvars
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import dspy

from dspy_p2o.renderer import program_input_fields
from dspy_p2o.rollouts import Call, MetricRewardFn, Rollout, example_id, instruction_for, plan_executions

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
