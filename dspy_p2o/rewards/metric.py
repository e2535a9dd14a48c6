"""DSPy / GEPA metrics: :func:`math_metric` (score + feedback for reflection),
:func:`safe_metric`, which adapts any user metric into a 5-argument
``dspy.Prediction(score, feedback)`` metric with a score in [0, 1] that never raises for a
failing or hanging call, and :func:`check_metric`, the probe a run makes of its metric
before it claims its run directory.

Every metric call of a run -- the rollouts' rewards (``rollouts.collect_rollouts``) and GEPA's
evaluations (its own threads) -- goes through one ``safe_metric`` wrapper: the one place a
per-call time limit is enforced.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
import numbers
import threading
from typing import Any, Callable

import dspy

from dspy_p2o.rewards import checker
from dspy_p2o.rewards.checker import Verdict, check_answer
from dspy_p2o.rewards.text import final_answer, normalize_gold

logger = logging.getLogger(__name__)

__all__ = ["MetricError", "NotAScore", "check_metric", "math_metric", "safe_metric"]


def _example_name(example: Any) -> str:
    ex_id = _field(example, "id")
    return f"example {ex_id}" if ex_id is not None else "example"


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` for Examples/Predictions/dicts; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return obj.get(name) if hasattr(obj, "get") else getattr(obj, name, None)
    except Exception:
        return getattr(obj, name, None)


def _has_field(obj: Any, name: str) -> bool:
    if isinstance(obj, dict) or hasattr(obj, "keys"):
        try:
            return name in obj.keys()
        except Exception:
            pass
    return hasattr(obj, name)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def math_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction:
    """DSPy/GEPA metric: strict binary score plus feedback for reflection.

    ``gold`` is a ``dspy.Example`` with ``answer``; ``pred`` a ``dspy.Prediction``
    with ``answer`` (None, or without ``answer``, when the output failed to parse).
    The feedback gives the gold answer, what the model answered and why it failed.
    """
    gold_answer = _field(gold, "answer")
    gold_text = normalize_gold(gold_answer, item=_example_name(gold))[0]

    # None, or DSPy's FailedPrediction (raw completion_text only): the adapter could not parse.
    if pred is None or (_has_field(pred, "completion_text") and not _has_field(pred, "answer")):
        return _scored(0.0, "Incorrect: the program's output could not be parsed into its output fields, "
                            f"so there is no answer to check. The correct answer is {gold_text}.")
    if not _has_field(pred, "answer"):
        return _scored(0.0, "Incorrect: the program's output has no `answer` field. "
                            f"The correct answer is {gold_text}.")
    answer = _field(pred, "answer")
    final = final_answer(None if answer is None else str(answer))
    if final is None or not final.strip():
        return _scored(0.0, f"Incorrect: the answer field is empty or has an unclosed \\boxed{{. "
                            f"The correct answer is {gold_text}.")
    verdict = check_answer(final, gold_answer, timeout=checker.DEFAULT_TIMEOUT)  # read at call time
    return _scored(1.0 if verdict.correct else 0.0, _feedback(verdict, _shorten(final.strip()), gold_text))


def _feedback(verdict: Verdict, answer: str, gold_text: str) -> str:
    if verdict.correct:
        return f"Correct: the answer {answer} matches the correct answer {gold_text}."
    if verdict.reason == "wrong":
        return f"Incorrect: the model answered {answer}, but the correct answer is {gold_text}."
    if verdict.reason == "unparseable":
        return (f"Incorrect: the answer {answer!r} is not a number or LaTeX expression that math-verify "
                f"can read; the answer field must hold only the final answer. The correct answer is {gold_text}.")
    if verdict.reason == "timeout":
        return (f"Incorrect: verifying the answer {answer} timed out ({verdict.detail}); "
                f"the expression is too large to evaluate. The correct answer is {gold_text}.")
    return (f"Incorrect: the answer {answer} could not be verified ({verdict.reason}: {verdict.detail}). "
            f"The correct answer is {gold_text}.")


class MetricError(ValueError):
    """A metric unusable as a reward: a score outside [0, 1], no score at all (`NotAScore`), or
    every call of a batch failing. The command line prints it as one line, exit code 2."""


class NotAScore(MetricError, TypeError):
    """A metric returned something that is not a score: None, a string, NaN or infinity, or an
    object without a `score`."""


def _scored(score: float, feedback: str, error: str | None = None) -> dspy.Prediction:
    """A normalised metric result; `metric_error` is set when the metric raised (scored 0)."""
    if error is None:
        return dspy.Prediction(score=float(score), feedback=feedback)
    return dspy.Prediction(score=float(score), feedback=feedback, metric_error=error)


def _call_adapter(metric: Callable) -> Callable:
    """A 5-argument caller for ``metric``, passing only what it accepts.

    Classic DSPy metrics take (gold, pred, trace=None); passing five arguments to
    them would raise TypeError, which ``safe_metric`` would silently score 0.
    """
    try:
        params = list(inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):
        return metric
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return metric
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    n = max(2, min(5, len(positional)))
    return lambda *args: metric(*args[:n])


def _metric_name(metric: Callable) -> str:
    return getattr(metric, "__qualname__", None) or getattr(metric, "__name__", None) or repr(metric)


def _as_prediction(value: Any, name: str) -> dspy.Prediction:
    """Normalise a metric's return value to Prediction(score=float, feedback=str)."""
    if isinstance(value, bool):
        return _scored(float(value), f"Score: {float(value):g}.")
    if isinstance(value, numbers.Real):
        return _scored(_finite(value, name), f"Score: {float(value):g}.")
    if _has_field(value, "score"):
        raw = _field(value, "score")
        if not isinstance(raw, numbers.Real):  # bool is a Real: True -> 1.0
            raise NotAScore(f"metric {name} returned a score of {_shown(raw)}; expected a number in [0, 1]")
        score = _finite(raw, name)
        feedback = _field(value, "feedback")
        return _scored(score, str(feedback) if feedback is not None else f"Score: {score:g}.")
    raise NotAScore(f"metric {name} returned {_shown(value)}; expected a number in [0, 1], a bool, or an object "
                    "with a `score` (e.g. dspy.Prediction(score=..., feedback=...))")


def _shown(value: Any) -> str:
    """What a metric returned, for an error message: the type, and a short repr."""
    if value is None:
        return "None"
    return f"{type(value).__name__} {_shorten(' '.join(repr(value).split()), 80)}"  # one line


def _finite(value: numbers.Real, name: str) -> float:
    """The score as a float in [0, 1]: rewards, tau and GEPA's perfect-score stopper assume that range."""
    score = float(value)
    if not math.isfinite(score):
        raise NotAScore(f"metric {name} returned the score {score!r}; scores must be finite numbers in [0, 1]")
    if not 0.0 <= score <= 1.0:
        raise MetricError(f"metric {name} returned the score {score:g}; scores must be in [0, 1] "
                          "(rescale it, e.g. divide by the maximum)")
    return score


def safe_metric(metric: Callable, *, timeout_s: float | None = None) -> Callable:
    """Wrap ``metric`` so that a failing or hanging call never kills a run, and always return a Prediction.

    An exception inside the metric becomes ``Prediction(score=0.0, feedback="metric
    raised <ExcType>: <msg>", metric_error="<ExcType>: <msg>")`` (callers count those);
    float/bool/Prediction returns are normalised to ``Prediction(score=float, feedback=str)``;
    a return value with no usable score raises `NotAScore` naming the metric and what it
    returned (a programming error, not a bad answer), and a score outside [0, 1] raises MetricError.

    ``timeout_s`` (None: no limit) bounds each call: a call still running after ``timeout_s``
    seconds scores 0 with the feedback "metric timed out after N s" and counts as a failure
    (``metric_error``). Python cannot stop a thread, so the call runs in a daemon thread of its
    own, which is abandoned when it overruns: it keeps running (and holding what it holds) until
    it returns by itself, but never blocks the run or the exit of the process.

    The wrapper has the 5-argument GEPA signature and accepts 2/3/5-arg metrics. An already
    wrapped metric is returned as it is (its time limit kept).
    """
    if getattr(metric, "_dspy_p2o_safe", False):
        return metric
    if not callable(metric):
        raise TypeError(f"metric must be callable, got {type(metric).__name__}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    name = _metric_name(metric)
    call = _call_adapter(metric)

    def wrapped(gold, pred, trace=None, pred_name=None, pred_trace=None):
        args = (gold, pred, trace, pred_name, pred_trace)
        try:
            value = call(*args) if timeout_s is None else _call_with_timeout(call, args, timeout_s)
        except _MetricTimeout:
            logger.warning("metric %s timed out after %g s on %s (scored 0)", name, timeout_s, _example_name(gold))
            return _scored(0.0, f"metric timed out after {timeout_s:g} s", error=f"timed out after {timeout_s:g} s")
        except Exception as exc:
            logger.warning("metric %s raised %s: %s", name, type(exc).__name__, exc)
            return _scored(0.0, f"metric raised {type(exc).__name__}: {exc}", error=f"{type(exc).__name__}: {exc}")
        return _as_prediction(value, name)

    wrapped.__name__ = getattr(metric, "__name__", "metric")
    wrapped.__qualname__ = f"safe_metric({name})"
    wrapped.__doc__ = getattr(metric, "__doc__", None)
    wrapped._dspy_p2o_safe = True  # type: ignore[attr-defined]
    wrapped.timeout_s = timeout_s  # type: ignore[attr-defined]
    return wrapped


class _MetricTimeout(Exception):
    pass


def _call_with_timeout(call: Callable, args: tuple, timeout_s: float) -> Any:
    """``call(*args)`` in a daemon thread (in a copy of this context: DSPy's settings are context
    variables), waited for at most ``timeout_s`` seconds; an overrunning call is abandoned."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call(*args)))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True,
                              name="dspy-p2o-metric")
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise _MetricTimeout()
    ok, value = outcome[0]
    if ok:
        return value
    raise value


def check_metric(metric: Callable, example: Any, *, timeout_s: float | None = None) -> Callable:
    """``safe_metric(metric, timeout_s=...)``, probed before a run claims its run directory.

    The metric is called on ``example`` with the two predictions every run gives it: one whose
    fields are all None (a completion that did not parse) and one whose fields are empty (a
    wrong answer); the fields are the example's labels (its fields that are not inputs). A return
    value that is no score raises `NotAScore` (a score outside [0, 1], MetricError) naming the
    metric, what it returned and the probe -- one line on the command line, before any work.
    A metric that raises (or times out) on a probe is not refused: that scores 0 in a run too.
    """
    scorer = safe_metric(metric, timeout_s=timeout_s)
    labels = _label_fields(example)
    probes = {"a prediction that did not parse (its fields None)": dspy.Prediction(**dict.fromkeys(labels)),
              "a wrong prediction (its fields empty)": dspy.Prediction(**dict.fromkeys(labels, ""))}
    for what, prediction in probes.items():
        try:
            scorer(example, prediction)
        except MetricError as exc:
            raise type(exc)(f"{exc} (checked before the run on {_example_name(example)} with {what})") from None
    return scorer


def _label_fields(example: Any) -> list[str]:
    """The fields a metric compares a prediction with: the example's fields that are not inputs
    (nor its id and index); `answer` when it has none."""
    try:
        keys = list(example.keys())
    except Exception:
        keys = []
    inputs = set(getattr(example, "_input_keys", None) or ())
    labels = [k for k in keys if k not in inputs and k not in ("id", "index")]
    return labels or ["answer"]
