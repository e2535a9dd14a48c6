import json

import pytest

from dspy_p2o.metrics import MetricsLogger, read_metrics


def test_jsonl_appends_across_loggers(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLogger(path) as log:
        log.log({"loss": 1.5, "n": 3}, step=1, prefix="train/")
    with MetricsLogger(path) as log:  # a resumed run continues the file
        log.log({"loss": float("nan")}, step=2)
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train/loss"] == 1.5 and records[0]["train/n"] == 3
    assert records[1]["loss"] is None  # NaN becomes null: strict JSON readers accept the file


def test_torn_last_line_is_skipped_but_corruption_elsewhere_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1}]
    path.write_text('{"step": 1\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_metrics(path)


def test_tensorboard_tracker_writes_events(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, trackers=("tensorboard",), config={"lr": 1e-6, "bounds": (0.01, 10)}) as log:
        log.log({"reward": 0.5, "note": "text is kept out of trackers"}, step=3)
    events = list((tmp_path / "trackers").rglob("events.out.tfevents.*"))
    assert events, "tensorboard wrote no event file"
    assert read_metrics(path)[0]["note"] == "text is kept out of trackers"


def test_unknown_tracker_is_named(tmp_path):
    with pytest.raises(ValueError, match="'tensorbored'"):
        MetricsLogger(tmp_path / "m.jsonl", trackers=("tensorbored",))
