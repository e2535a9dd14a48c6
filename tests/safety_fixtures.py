"""Helpers for the reliability tests (run dir, resume, metrics)."""

import random

_rng = random.Random(0)


def noisy_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """A reward in [0, 1] with variance inside every group whose outputs parse: every batch then takes an
    optimiser step (and writes a checkpoint)."""
    return _rng.random()


def always_failing_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    raise KeyError("gold_answer")  # e.g. the metric reads a field the examples do not have


def five_point_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    return 5.0  # a 0-5 rating handed over as a reward


class EveryOtherFails:
    """A metric that raises on every second call and scores 0.5 otherwise."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
        self.calls += 1
        if self.calls % 2 == 0:
            raise ValueError("flaky verifier")
        return 0.5


def none_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """A metric that forgot its return statement."""
    score = 1.0 if str(getattr(pred, "answer", "")).strip() == str(gold.answer) else 0.0  # noqa: F841


class HangsOnEveryOther:
    """A metric that hangs (until `release` is set) on every second call and scores 0.5 otherwise."""

    def __init__(self) -> None:
        import threading

        self.calls, self.release = 0, threading.Event()

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
        self.calls += 1
        if self.calls % 2 == 0:
            self.release.wait()
        return 0.5
