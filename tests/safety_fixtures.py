"""Helpers for the reliability tests (run dir, resume, metrics)."""

import random

_rng = random.Random(0)


def noisy_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """A reward in [0, 1] with variance inside every group, even from a random-init model whose
    outputs never parse: every batch then takes an optimiser step (and writes a checkpoint)."""
    return _rng.random()

