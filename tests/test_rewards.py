"""Answer checking with the real math-verify, in worker processes."""

from __future__ import annotations

import inspect
import json
import multiprocessing
import re
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from dspy_p2o import rewards
from dspy_p2o.data import BENCHMARKS, find_data_root, load_benchmark
from dspy_p2o.rewards import (
    check_answer,
    extract_boxed,
    math_metric,
    math_reward,
    normalize_gold,
    safe_metric,
    verify_answer,
)

LIMIT = 1.0  # seconds: short limit for the pathological inputs
MARGIN = 4.0  # seconds of slack: other jobs share the 2 CPU cores


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the workers once, so timings below measure checks, not imports."""
    rewards.warm_up_verifier()
    yield


def boxed(gold_text: str) -> str:
    """A gold answer as a model would write it: boxed, without `$` delimiters."""
    return "\\boxed{" + re.sub(r"(?<!\\)\$", "", gold_text) + "}"


def sample_rows(name: str, n: int = 4) -> list[dspy.Example]:
    rows = load_benchmark(name)
    if name == "olympiadbench":  # include multi-valued answers ("$69$,$84$")
        multi = [ex for ex in rows if "," in ex.answer[0]]
        return rows[:2] + multi[:3]
    return rows[:n]


# --- extract_boxed ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{5}.", "5"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{x^{2}+1}", "x^{2}+1"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\}}", r"\}"),
        (r"$\boxed 7$", "7"),
        (r"\boxed{}", ""),
        (r"\boxed{5", None),  # truncated: no finished answer
        (r"\boxed{4} and \boxed{5", None),
        ("no box here", None),
        ("", None),
        (r"\boxedx{5}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_every_minerva_solution():
    rows = [json.loads(line) for line in open(find_data_root() / "benchmarks/minerva_math/test.jsonl")]
    assert all(extract_boxed(row["solution"]) for row in rows)


# --- normalize_gold ------------------------------------------------------------------


@pytest.mark.parametrize(
    "gold, expected",
    [
        ("  \\frac{1}{2} ", ["\\frac{1}{2}"]),
        (27.0, ["27"]),
        (27, ["27"]),
        (0.5, ["0.5"]),
        (1e-7, ["0.0000001"]),
        (["$69$,$84$"], ["$69$,$84$"]),
        (["69", "84"], ["69, 84"]),  # several elements: parts of one answer
        (("(1,2)",), ["(1,2)"]),
    ],
)
def test_normalize_gold(gold, expected):
    assert normalize_gold(gold) == expected


@pytest.mark.parametrize("gold", [None, "", "   ", [], [""], True, float("nan"), {"a": 1}])
def test_normalize_gold_rejects_empty_and_odd_gold(gold):
    with pytest.raises(ValueError, match="math500/7"):
        normalize_gold(gold, item="math500/7")


# --- verification on real rows ------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARKS)
def test_boxed_gold_of_real_rows_scores_one(name):
    for ex in sample_rows(name):
        completion = "Reasoning...\nThe answer is " + boxed(normalize_gold(ex.answer)[0]) + "."
        assert math_reward(completion, ex.answer) == 1.0, (ex.id, ex.answer)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_wrong_answers_of_real_rows_score_zero(name):
    for ex in sample_rows(name):
        for wrong in (r"\boxed{-7919}", "x^{7919}"):
            assert math_reward(wrong, ex.answer) == 0.0, (ex.id, wrong)


def test_amc_float_gold():
    ex = load_benchmark("amc23")[0]
    assert ex.raw_answer == 27.0 and ex.answer == "27"
    assert math_reward("27", 27.0) == 1.0
    assert math_reward("\\boxed{27}", ex.raw_answer) == 1.0
    assert math_reward("27.5", 27.0) == 0.0


def test_olympiadbench_list_gold():
    gold = ["$69$,$84$"]
    assert math_reward("69, 84", gold) == 1.0
    assert math_reward("\\boxed{84, 69}", gold) == 1.0  # a set: order is free
    assert math_reward("84", gold) == 0.0  # half of a two-value answer
    assert math_reward("69, 84", ["69", "84"]) == 1.0
    assert math_reward("69", ["69", "84"]) == 0.0


@pytest.mark.parametrize(
    "answer, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\dfrac12"),
        ("1+x^2", "x^2+1"),
        ("[2,5)", "[2, 5)"),
        (r"\$18.90", r"\$18.90"),
        ("18.90", r"\$18.90"),
        ("4.5e33", "4.5e33"),  # Minerva: e-notation is not Euler's e
        (r"4.5\times 10^{33}", "4.5e33"),
        ("$x = 5$", "5"),
    ],
)
def test_equivalent_forms_verify(answer, gold):
    assert verify_answer(answer, gold)


@pytest.mark.parametrize(
    "answer, gold",
    [("[2,5]", "[2,5)"), ("4.6e33", "4.5e33"), ("x^2-1", "x^2+1"), ("(3, 2)", "(2, 3)")],
)
def test_different_values_do_not_verify(answer, gold):
    assert not verify_answer(answer, gold)


def test_empty_or_missing_answer_scores_zero():
    assert math_reward(None, "5") == 0.0
    assert math_reward("   ", "5") == 0.0
    assert math_reward(r"the answer is \boxed{5", "5") == 0.0  # unclosed box
    assert check_answer("", "5").reason == "empty"


def test_long_prose_answer_is_unparseable_without_a_worker():
    start = time.monotonic()
    verdict = check_answer("so we add them all up " * 100, "5")
    assert verdict.reason == "unparseable" and time.monotonic() - start < 0.5


def test_worker_killed_behind_the_pools_back_is_replaced():
    import os
    import signal

    rewards.warm_up_verifier()
    worker = rewards.pool._get_pool()._idle[-1]  # the next one a check would take
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    assert verify_answer("5/15", r"\frac13")


def test_configure_verifier_sets_the_pool_size_and_the_workers_memory_cap():
    try:
        rewards.configure_verifier(workers=1, memory_mb=3000)
        assert verify_answer("1/2", "0.5")
        pool = rewards.pool._get_pool()
        assert pool.size == 1 and len(pool._workers) == 1
        assert next(iter(pool._workers)).proc.args[-1] == "3000"  # the worker's address-space cap
        with pytest.raises(ValueError, match="verify_workers"):
            rewards.configure_verifier(workers=0)
        with pytest.raises(ValueError, match="verify_memory_mb"):
            rewards.configure_verifier(memory_mb=-1)
    finally:
        rewards.configure_verifier()  # the defaults (RewardsConfig's) again
    assert rewards.pool._get_pool().size == max(1, min(4, __import__("os").cpu_count() or 1))


def test_the_verifier_settings_are_config_knobs_not_environment_variables(monkeypatch):
    from dspy_p2o.config import P2OConfig

    cfg = P2OConfig.load(None, {"verify_workers": 2, "rewards.verify_memory_mb": 0})
    assert (cfg.rewards.verify_workers, cfg.rewards.verify_memory_mb) == (2, 0)
    monkeypatch.setenv("DSPY_P2O_VERIFY_WORKERS", "zero")  # no longer read anywhere
    assert rewards.pool._pool_size() == max(1, min(4, __import__("os").cpu_count() or 1))


def test_worker_process_imports_only_math_verify():
    """The worker is started often (first use, after every kill): it must not load DSPy, torch or the package."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-P", "-X", "importtime", rewards.pool.WORKER_SCRIPT, "0"],
                          input="", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ready\n"
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "math_verify" in imported and not imported & {"dspy", "torch", "dspy_p2o"}


def test_bad_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout"):
        verify_answer("1", "1", timeout=0)


# --- never hanging -----------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, reason",
    [("9^{9^{9}}", "timeout"), (r"\boxed{9^{9^{9^{9}}}}", "timeout"), ("100000!", None)],
)
def test_pathological_answers_end_within_the_limit(answer, reason):
    rewards.warm_up_verifier()  # time the check, not the restart of a killed worker
    start = time.monotonic()
    verdict = check_answer(answer, "5", timeout=LIMIT)
    elapsed = time.monotonic() - start
    assert not verdict.correct
    assert elapsed < LIMIT + MARGIN, f"{answer} took {elapsed:.1f}s"
    if reason:
        assert verdict.reason == reason and "killed" in verdict.detail
    assert verify_answer("7", "7.0")  # the pool still works (a killed worker was replaced)


def test_checks_from_eight_threads_at_once():
    def work(i: int) -> tuple[bool, bool, bool]:
        right = verify_answer(f"\\frac{{{i}}}{{{i + 1}}}", f"\\dfrac{{{i}}}{{{i + 1}}}")
        wrong = verify_answer(f"{i + 1000}", f"{i + 2000}")
        slow = verify_answer(f"{i + 2}^{{{i + 2}^{{{i + 2}^{{{i + 2}}}}}}}", "1", timeout=LIMIT) if i == 0 else False
        return right, wrong, slow

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [(True, False, False)] * 8
    assert time.monotonic() - start < 30


def _child_verifies() -> None:
    import sys

    rewards.configure_verifier(workers=1)  # this forked child only
    sys.exit(0 if rewards.verify_answer("1/2", "0.5") else 1)


def test_usable_after_fork():
    process = multiprocessing.get_context("fork").Process(target=_child_verifies)
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert verify_answer("2/4", "0.5")  # the parent's workers were left alone


def test_shutdown_then_lazily_restarted():
    rewards.shutdown_verifier()
    assert verify_answer("3/6", "0.5")


# --- math_metric ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def math500_row():
    return load_benchmark("math500")[0]  # gold: \left( 3, \frac{\pi}{2} \right)


def test_metric_correct(math500_row):
    result = math_metric(math500_row, dspy.Prediction(reasoning="r", answer=r"(3, \frac{\pi}{2})"))
    assert result.score == 1.0
    assert result.feedback.startswith("Correct") and r"\frac{\pi}{2}" in result.feedback


def test_metric_wrong_value_states_both_answers(math500_row):
    result = math_metric(math500_row, dspy.Prediction(answer=r"(3, \pi)"))
    assert result.score == 0.0
    assert r"(3, \pi)" in result.feedback and r"\left( 3, \frac{\pi}{2} \right)" in result.feedback
    assert "Incorrect" in result.feedback


def test_metric_uses_boxed_content(math500_row):
    result = math_metric(math500_row, dspy.Prediction(answer=r"so \boxed{(3, \tfrac{\pi}{2})}"))
    assert result.score == 1.0


def test_metric_unparseable_output(math500_row):
    from dspy.teleprompt.bootstrap_trace import FailedPrediction

    for pred in (None, FailedPrediction(completion_text="garbled")):
        result = math_metric(math500_row, pred)
        assert result.score == 0.0
        assert "could not be parsed" in result.feedback and r"\frac{\pi}{2}" in result.feedback


def test_metric_missing_or_empty_answer_field(math500_row):
    result = math_metric(math500_row, dspy.Prediction(reasoning="thinking"))
    assert result.score == 0.0 and "no `answer` field" in result.feedback
    result = math_metric(math500_row, dspy.Prediction(answer=None))
    assert result.score == 0.0 and "empty" in result.feedback


def test_metric_timeout_feedback(monkeypatch):
    monkeypatch.setattr(rewards.checker, "DEFAULT_TIMEOUT", LIMIT)
    gold = dspy.Example(question="q", answer="5", id="t/0").with_inputs("question")
    result = math_metric(gold, dspy.Prediction(answer="6^{6^{6^{6}}}"))
    assert result.score == 0.0 and "timed out" in result.feedback and "5" in result.feedback


def test_metric_unreadable_answer_feedback(math500_row):
    result = math_metric(math500_row, dspy.Prediction(answer=r"\frac{"))
    assert result.score == 0.0 and "Incorrect" in result.feedback


def test_metric_names_example_without_gold():
    with pytest.raises(ValueError, match="broken/3"):
        math_metric(dspy.Example(question="q", answer="", id="broken/3"), dspy.Prediction(answer="1"))


def test_metric_has_gepa_signature():
    inspect.signature(math_metric).bind(None, None, None, None, None)


# --- safe_metric -----------------------------------------------------------------


def test_safe_metric_turns_exceptions_into_zero():
    def explode(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise ZeroDivisionError("boom")

    result = safe_metric(explode)(dspy.Example(answer="1"), dspy.Prediction(answer="1"))
    assert result.score == 0.0 and result.feedback == "metric raised ZeroDivisionError: boom"


@pytest.mark.parametrize(
    "value, score",
    [(True, 1.0), (False, 0.0), (0.25, 0.25), (1, 1.0), (dspy.Prediction(score=0.5, feedback="half"), 0.5),
     ({"score": 1, "feedback": "ok"}, 1.0), (dspy.Prediction(score=True), 1.0)],
)
def test_safe_metric_normalises_return_values(value, score):
    result = safe_metric(lambda gold, pred: value)(None, None, None, None, None)
    assert isinstance(result, dspy.Prediction)
    assert isinstance(result.score, float) and result.score == score
    assert isinstance(result.feedback, str) and result.feedback
    if isinstance(value, (dspy.Prediction, dict)) and "feedback" in value:
        assert result.feedback == value["feedback"]


@pytest.mark.parametrize("value", ["1.0", None, dspy.Prediction(feedback="no score"), [1.0], float("nan")])
def test_safe_metric_rejects_scoreless_values(value):
    def my_metric(gold, pred, trace=None):
        return value

    with pytest.raises(TypeError, match="my_metric"):
        safe_metric(my_metric)(None, None)


@pytest.mark.parametrize("value, shown", [
    (None, "returned None"), (float("nan"), "returned the score nan"), (float("inf"), "returned the score inf"),
    ("correct", "returned str 'correct'"), (dspy.Prediction(feedback="no score"), "returned Prediction"),
    (dspy.Prediction(score="high"), "returned a score of str 'high'")])
def test_a_value_that_is_no_score_is_a_metric_error_naming_the_metric_and_the_value(value, shown):
    def my_metric(gold, pred, trace=None):
        return value

    with pytest.raises(rewards.MetricError, match=f"metric .*my_metric {re.escape(shown)}") as caught:
        safe_metric(my_metric)(None, None)
    assert isinstance(caught.value, rewards.NotAScore) and "\n" not in str(caught.value)


def test_a_hanging_metric_call_times_out_scores_zero_and_is_counted():
    release = __import__("threading").Event()

    def hangs_on_b(gold, pred):
        if gold.question == "b":
            release.wait()  # hangs until the test ends
        return 1.0

    try:
        scorer = safe_metric(hangs_on_b, timeout_s=0.3)
        first = scorer(dspy.Example(question="a"), dspy.Prediction(answer="1"))
        assert (first.score, first.feedback) == (1.0, "Score: 1.") and not getattr(first, "metric_error", None)
        start = time.monotonic()
        hung = scorer(dspy.Example(question="b", id="q/2"), dspy.Prediction(answer="1"))
        assert time.monotonic() - start < 0.3 + MARGIN
        assert (hung.score, hung.feedback) == (0.0, "metric timed out after 0.3 s")
        assert "timed out after 0.3 s" in hung.metric_error  # what the collector counts as a failure
        assert safe_metric(scorer) is scorer and scorer.timeout_s == 0.3  # wrapped once, its limit kept
    finally:
        release.set()  # the abandoned call returns by itself


def test_a_timed_metric_runs_in_the_callers_dspy_context():
    def reads_context(gold, pred):
        return 1.0 if dspy.settings.get("adapter_marker", None) == "mine" else 0.0

    scorer = safe_metric(reads_context, timeout_s=5)
    with dspy.context(adapter_marker="mine"):
        assert scorer(None, None).score == 1.0
    assert scorer(None, None).score == 0.0


def test_check_metric_refuses_a_metric_that_returns_no_score_before_the_run():
    example = dspy.Example(question="1 + 1?", answer="2", id="train/0").with_inputs("question")

    def none_when_wrong(gold, pred):
        return 1.0 if pred.answer == gold.answer else None

    with pytest.raises(rewards.NotAScore, match=r"none_when_wrong returned None.*checked before the run on "
                                                r"example train/0 with a prediction that did not parse"):
        rewards.check_metric(none_when_wrong, example)
    failing = rewards.check_metric(lambda gold, pred: int(pred.answer) == 2, example)  # raises on a probe: allowed
    assert failing(example, dspy.Prediction(answer="2")).score == 1.0
    assert rewards.check_metric(math_metric, example, timeout_s=7).timeout_s == 7


def test_safe_metric_calls_short_metrics_with_what_they_accept():
    seen = []
    two = safe_metric(lambda gold, pred: seen.append(2) or 1.0)
    three = safe_metric(lambda gold, pred, trace=None: seen.append(3) or 1.0)
    for wrapped in (two, three):
        inspect.signature(wrapped).bind(None, None, None, None, None)
        assert wrapped(None, None, None, "pred", None).score == 1.0
    assert seen == [2, 3]


def test_safe_metric_wraps_math_metric_once(math500_row):
    wrapped = safe_metric(math_metric)
    assert safe_metric(wrapped) is wrapped
    assert wrapped(math500_row, dspy.Prediction(answer=r"(3,\frac{\pi}{2})")).score == 1.0
    bad = wrapped(dspy.Example(answer=None, id="x/1"), dspy.Prediction(answer="1"))
    assert bad.score == 0.0 and bad.feedback.startswith("metric raised ValueError") and "x/1" in bad.feedback
