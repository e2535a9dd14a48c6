"""`dspy-p2o score`: every benchmark's own gold answers, boxed, score 100% (real loader, real math-verify)."""

from __future__ import annotations

import json

import pytest

from dspy_p2o.cli import main
from dspy_p2o.data import BENCHMARKS

from evaluation_fixtures import write_gold_predictions


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_gold_answers_score_100_percent_on_every_row(tmp_path, bench):
    preds = tmp_path / "preds.jsonl"
    n = write_gold_predictions(preds, bench)
    out, samples = tmp_path / "score.json", tmp_path / "samples.jsonl"
    assert main(["score", "--benchmark", bench, "--predictions", str(preds), "--json", str(out),
                 "--samples-out", str(samples), "--quiet"]) == 0
    failures = [r for r in map(json.loads, samples.read_text().splitlines()) if not r["correct"]]
    assert failures == []  # shows the failing rows (gold, extracted answer, reason) when it fails
    assert json.loads(out.read_text()) == {"benchmark": bench, "n": n, "accuracy": 1.0}


def test_ids_work_like_indices_and_several_lines_are_samples(tmp_path):
    preds = tmp_path / "preds.jsonl"
    write_gold_predictions(preds, "aime24", key="id")
    # Add one wrong second sample for the first problem: its accuracy becomes 1/2.
    with preds.open("a") as f:
        f.write(json.dumps({"index": 0, "completion": "\\boxed{-12345}"}) + "\n")
    out = tmp_path / "score.json"
    assert main(["score", "--benchmark", "aime24", "--predictions", str(preds), "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 30
    assert result["accuracy"] == pytest.approx((29 + 0.5) / 30)


def test_program_answer_field_wins_over_boxes_in_the_reasoning(tmp_path):
    preds = tmp_path / "preds.jsonl"
    gold = "204"  # aime24 row 0
    field_right = f"[[ ## reasoning ## ]]\nMaybe \\boxed{{7}}?\n\n[[ ## answer ## ]]\n{gold}\n\n[[ ## completed ## ]]"
    field_wrong = f"[[ ## reasoning ## ]]\nMaybe \\boxed{{{gold}}}?\n\n[[ ## answer ## ]]\n7\n\n[[ ## completed ## ]]"
    preds.write_text("".join(json.dumps({"index": 0, "completion": c}) + "\n" for c in (field_right, field_wrong)))
    samples = tmp_path / "samples.jsonl"
    assert main(["score", "--benchmark", "aime24", "--predictions", str(preds), "--samples-out", str(samples),
                 "--quiet"]) == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["answer"], r["answer_source"], r["correct"]) for r in records] == [
        (gold, "field", True), ("7", "field", False)]
    # --prompt raw ignores the program format: the last box decides.
    assert main(["score", "--benchmark", "aime24", "--predictions", str(preds), "--samples-out", str(samples),
                 "--prompt", "raw", "--quiet"]) == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["answer"], r["correct"]) for r in records] == [("7", False), (gold, True)]


@pytest.mark.parametrize("line, message", [
    ('{"index": 30, "completion": "x"}', "index 30 is not a row"),
    ('{"id": "aime24/999", "completion": "x"}', "id 'aime24/999' is not a problem id"),
    ('{"index": 0}', "needs a string 'completion'"),
    ('{"completion": "x"}', "needs an 'index'"),
    ("not json", "is not valid JSON"),
])
def test_bad_prediction_lines_are_named(tmp_path, capsys, line, message):
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"index": 0, "completion": "\\\\boxed{1}"}\n' + line + "\n")
    assert main(["score", "--benchmark", "aime24", "--predictions", str(preds), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and f"{preds}:2" in err
