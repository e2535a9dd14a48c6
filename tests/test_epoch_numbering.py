"""Epochs are numbered from 1 wherever a person looks, and a P^2O config that can never use a template says so."""

import json
import logging
import re

import dspy
import pytest

from dspy_p2o.config import P2OConfig
from dspy_p2o.rewards import math_metric
from dspy_p2o.run_dir import RunDir
from loop_fixtures import sum_examples, tiny_overrides


def test_run_dir_names_epoch_files_from_one(tmp_path):
    run = RunDir(tmp_path / "run")
    assert [p.relative_to(run.path).as_posix() for p in
            (run.templates_file(1), run.rewards_file(2), run.hard_file(1), run.gepa_dir(3))] == [
        "templates/epoch-1.json", "rewards/epoch-2.jsonl", "hard/epoch-1.jsonl", "gepa/epoch-3"]
    with pytest.raises(ValueError, match="numbered from 1, got 0"):
        run.hard_file(0)


@pytest.mark.parametrize("legacy", ["templates/epoch-0.json", "rewards/epoch-0.jsonl", "gepa/epoch-0"])
def test_a_run_dir_written_from_epoch_0_keeps_its_numbering(tmp_path, legacy):
    """An older version named the first epoch's artefacts epoch-0: resuming it finds its GEPA state there."""
    run = RunDir(tmp_path / "run")
    (run.path / legacy).parent.mkdir(parents=True)
    if legacy.startswith("gepa/"):
        (run.path / legacy).mkdir()
    else:
        (run.path / legacy).write_text("{}")
    assert run.counts_epochs_from_zero()
    assert run.gepa_dir(1) == run.path / "gepa/epoch-0" and run.templates_file(2) == run.path / "templates/epoch-1.json"


@pytest.mark.parametrize("overrides,reason", [
    ({"epochs": 1}, "epochs=1: .* set epochs >= 2"),
    ({"min_hard": 9}, r"prompt.min_hard=9 but the trainset has 8 questions: .* set prompt.min_hard <= 8"),
])
def test_a_p2o_config_that_can_never_use_templates_names_why(overrides, reason):
    assert P2OConfig.load(None, {"epochs": 2, "min_hard": 8}).grpo_only_reason(8) is None
    config = P2OConfig.load(None, {"epochs": 2, "min_hard": 8, **overrides})
    assert re.search(reason, config.grpo_only_reason(8) or "")
    assert P2OConfig.load(config, {"method": "grpo"}).grpo_only_reason(8) is None  # GRPO asked for: nothing to say


def test_an_epochs_1_p2o_run_warns_at_start_in_one_line(tmp_path, format_model_dir, caplog):
    from dspy_p2o.loop import P2OLoop

    config = P2OConfig.load(None, {"policy": str(format_model_dir), **tiny_overrides(epochs=1)})
    with caplog.at_level(logging.WARNING, logger="dspy_p2o"):
        loop = P2OLoop(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"), metric=math_metric,
                       policy=format_model_dir, config=config, run_dir=tmp_path / "run")
        loop.release()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["this P^2O run will train as GRPO, without templates: epochs=1: the prompt phase runs "
                        "after an epoch and only a later epoch uses its templates; set epochs >= 2"]
    assert "\n" not in warnings[0]


def test_files_metrics_and_console_count_epochs_alike(tmp_path, format_model_dir, capsys):
    """A 2-epoch GRPO run: the console's "epoch N/2", the files epoch-N and every metric's epoch field agree."""
    import dspy_p2o

    run_dir = tmp_path / "run"
    dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"), metric=math_metric,
                     policy=format_model_dir, run_dir=run_dir, **tiny_overrides(method="grpo", progress=True))
    console = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert console == ["epoch 1/2", "epoch 2/2"]
    for kind in ("templates", "rewards", "hard"):
        assert sorted(p.stem for p in (run_dir / kind).iterdir()) == ["epoch-1", "epoch-2"], kind
    assert [json.loads((run_dir / f"templates/epoch-{n}.json").read_text())["epoch"] for n in (1, 2)] == [1, 2]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({m["train/epoch"] for m in metrics if "train/epoch" in m}) == [1, 2]
    assert [m["epoch/epoch"] for m in metrics if "epoch/epoch" in m] == [1, 2]
