"""A metric that fails is counted, a metric that always fails aborts the run, a score outside
[0, 1] is refused -- no "successful" run with reward 0 and every question hard."""

import json

import dspy
import pytest

import dspy_p2o
from dspy_p2o.rewards import MetricError
from loop_fixtures import sum_examples, tiny_overrides
from safety_fixtures import EveryOtherFails, always_failing_metric, five_point_metric

SETTINGS = dict(epochs=1, batch_size=4, k=2, method="grpo", max_tokens=32, temperature=0.05)  # outputs that parse


def _compile(run_dir, policy, metric):
    return dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"), metric=metric,
                            policy=policy, run_dir=run_dir, **tiny_overrides(**SETTINGS))


def test_a_metric_failing_on_every_call_of_a_batch_aborts_the_run(tmp_path, format_model_dir):
    with pytest.raises(MetricError, match=r"failed on all 8 rollouts of batch 1 \(epoch 1\); the last error: "
                                          r"KeyError: 'gold_answer'"):
        _compile(tmp_path / "run", format_model_dir, always_failing_metric)
    assert not (tmp_path / "run" / "state.json").exists()


def test_a_score_outside_zero_one_is_refused(tmp_path, format_model_dir):
    with pytest.raises(MetricError, match=r"returned the score 5; scores must be in \[0, 1\]"):
        _compile(tmp_path / "run", format_model_dir, five_point_metric)


def test_metric_failures_are_counted_per_batch_and_in_the_summary(tmp_path, format_model_dir):
    run_dir = tmp_path / "run"
    result = _compile(run_dir, format_model_dir, EveryOtherFails())
    batch = next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 if "train/reward_mean" in r)
    assert batch["train/metric_failures"] == 4  # 8 calls, every second one raised
    assert result.history[0]["metric_failures"] == 4
    summary = (run_dir / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| 1 |"))
    assert "| metric failures |" in summary and row.endswith("| 4 |")


def test_a_metric_returning_none_is_refused_before_the_run_claims_its_directory(tmp_path, tiny_model_dir):
    from safety_fixtures import none_metric

    with pytest.raises(MetricError, match=r"metric none_metric returned None; expected a number in \[0, 1\].*"
                                          r"checked before the run on example train/0"):
        _compile(tmp_path / "run", tiny_model_dir, none_metric)
    assert not (tmp_path / "run").exists()  # no identity.json, no lock, no metrics.jsonl


def test_a_metric_returning_no_score_is_one_line_with_exit_code_2_on_the_command_line(tmp_path, tiny_model_dir,
                                                                                       capsys):
    from dspy_p2o.cli import main
    from loop_fixtures import write_jsonl, write_train_config

    write_jsonl(tmp_path / "train.jsonl", sum_examples(4, 0, "train"))
    config = tmp_path / "run.yaml"
    write_train_config(config, tiny_model_dir, tmp_path / "train.jsonl", "safety_fixtures:none_metric")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("dspy-p2o train: error: metric none_metric returned None")
    assert not (tmp_path / "run").exists()


def test_a_hanging_metric_call_times_out_after_rewards_metric_timeout_s_and_is_counted(tmp_path, format_model_dir):
    from safety_fixtures import HangsOnEveryOther

    metric = HangsOnEveryOther()
    try:
        result = dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"),
                                  metric=metric, policy=format_model_dir, run_dir=tmp_path / "run",
                                  **tiny_overrides(**SETTINGS, metric_timeout_s=0.5))
    finally:
        metric.release.set()
    assert result.history[0]["metric_failures"] == 4  # 8 rollouts (+ 2 probes): every second call hung
    batch = next(r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                 if "train/reward_mean" in r)
    assert batch["train/metric_failures"] == 4
