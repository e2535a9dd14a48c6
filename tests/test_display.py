"""The display's narrow means: gepa's and DSPy's hard-coded bars are off inside the loop, and back after."""

import logging

import dspy.utils.parallelizer as dspy_parallel
import gepa.core.engine as gepa_engine
import tqdm

from dspy_p2o import display


def test_quiet_libraries_silences_the_hard_coded_bars_and_restores_them():
    level = logging.getLogger("dspy").level
    with display.quiet_libraries():
        assert gepa_engine.tqdm(total=3).disable and dspy_parallel.tqdm.tqdm(total=3).disable
        assert logging.getLogger("dspy").level == logging.WARNING
    assert gepa_engine.tqdm is tqdm.tqdm and dspy_parallel.tqdm is tqdm
    assert logging.getLogger("dspy").level == level


def test_verbose_leaves_the_libraries_alone():
    display.set_verbose(True)
    try:
        with display.quiet_libraries():
            assert gepa_engine.tqdm is tqdm.tqdm
    finally:
        display.set_verbose(False)


def test_gepa_progress_counts_metric_calls_of_the_budget():
    live = display.GEPAProgress(12, desc="prompt phase 1", enabled=False)
    live.on_budget_updated({"iteration": 1, "metric_calls_used": 5, "metric_calls_delta": 5, "metric_calls_remaining": 7})
    live.on_valset_evaluated({"average_score": 0.5})
    assert live.bar.n == 5 and live.best == 0.5
    live.close()
