"""What a person reads of a run: the plots' epoch axes, legends and empty-data messages, and summary.md's columns."""

import pytest

from dspy_p2o import reports
from dspy_p2o.config import P2OConfig
from dspy_p2o.run_dir import RunDir

TWO_EPOCHS = [
    {"epoch": 1, "step": 2, "hard": 9, "templated_questions": 5, "train_reward": 0.1, "metric_failures": 0},
    {"epoch": 2, "step": 4, "hard": 3, "templated_questions": 0, "train_reward": 0.6, "metric_failures": 0,
     "templated/pass@1": 0.8, "templated/pass@k": 1.0, "plain/pass@1": 0.2, "plain/pass@k": 0.4},
    {"epoch": 3, "step": 6, "hard": 1, "templated_questions": 0, "train_reward": 0.7, "metric_failures": 0,
     "templated/pass@1": 0.9, "templated/pass@k": 1.0, "plain/pass@1": 0.5, "plain/pass@k": 0.6},
]


@pytest.mark.parametrize("epochs,expected", [([1], [1]), ([1, 2, 3], [1, 2, 3]), (list(range(1, 51)),
                                              [1, 6, 11, 16, 21, 26, 31, 36, 41, 46, 50])])
def test_epoch_ticks_are_whole_epochs(epochs, expected):
    assert reports.epoch_ticks(epochs) == expected


def _xticks(ax) -> list[str]:
    return [label.get_text() for label in ax.get_xticklabels()]


@pytest.mark.parametrize("figure", [reports.templates_figure, reports.hard_figure])
def test_epoch_axes_tick_whole_epochs(figure):
    (ax,) = figure(TWO_EPOCHS).axes
    assert list(ax.get_xticks()) == [1, 2, 3] and _xticks(ax) == ["1", "2", "3"]  # no 1.5, 2.25, ...
    assert ax.get_xlabel() == "epoch"


def test_templates_chart_legend_says_what_each_line_is():
    (ax,) = reports.templates_figure(TWO_EPOCHS).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "with its template: pass@1 (mean reward)", "with its template: pass@K (any of K succeeds)",
        "without (plain rollouts): pass@1", "without (plain rollouts): pass@K"]


@pytest.mark.parametrize("history", [[], TWO_EPOCHS[:1]])
def test_templates_chart_without_data_says_so_in_words(history):
    (ax,) = reports.templates_figure(history).axes
    assert [t.get_text() for t in ax.texts] == [reports.NO_TEMPLATES] and not ax.axison and not ax.lines
    assert "No question was rolled out with a template" in reports.NO_TEMPLATES


def test_empty_training_and_hard_charts_say_so(tmp_path):
    (training,) = reports.training_figure([]).axes
    (hard,) = reports.hard_figure([]).axes
    assert [t.get_text() for t in training.texts] == ["No batch has been trained yet."]
    assert [t.get_text() for t in hard.texts] == ["No epoch has finished yet."]
    written = reports.write_plots(RunDir(tmp_path), [], [])  # and they save
    assert [p.rsplit("/", 1)[1] for p in written] == ["training.png", "hard.png", "templates.png"]


def test_summary_explains_its_columns(tmp_path):
    run = RunDir(tmp_path)
    reports.write_summary(run, P2OConfig.load(None, {"epochs": 3}), TWO_EPOCHS, {}, None)
    text = (tmp_path / "summary.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| epoch |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[0] == "epoch" and all(f"**{column}**" in text for column in columns[1:])  # each explained
    assert "mean reward of their templated rollouts vs of their plain rollouts" in text
    assert "| 2 | 4 | 0.600 | 3 | 0 | - | 0.800 | 0.200 | 0 |" in text
