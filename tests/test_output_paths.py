"""`score --json/--samples-out` and `eval --out` check their output paths before the work."""

from dspy_p2o.cli import main

from evaluation_fixtures import write_gold_predictions


def test_score_refuses_an_unwritable_json_path_before_scoring(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    write_gold_predictions(preds, "aime24")
    samples, bad = tmp_path / "samples.jsonl", preds / "score.json"  # a file's child: unwritable even for root
    assert main(["score", "--benchmark", "aime24", "--predictions", str(preds), "--samples-out", str(samples),
                 "--json", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"output path '{bad}' is not writable" in err
    assert not samples.exists()  # nothing was scored (or written) first


def test_eval_refuses_an_unwritable_out_dir_before_the_engine_starts(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "eval"
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--benchmarks", "aime24", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"output path '{out}' is not writable" in err  # not the engine's "model directory ... does not exist"
