"""Training questions whose prompt + max_tokens exceeds the policy's context: refused before the run
claims its directory (`long_prompts: refuse`, the default), or left out with a count (`skip`)."""

import json

import dspy
import pytest

import dspy_p2o
from dspy_p2o.config import ConfigError
from loop_fixtures import sum_examples, tiny_overrides

SETTINGS = dict(epochs=1, batch_size=4, k=2, method="grpo", max_tokens=16)


def _with_one_long_question() -> list[dspy.Example]:
    rows = sum_examples(4, 0, "train")
    long = dspy.Example(id="train/long", question="What is 1 + 1? " * 3000, answer="2").with_inputs("question")
    return [*rows, long]


def test_a_question_longer_than_the_context_is_refused_before_the_run_claims_its_directory(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"1 of 5 training questions do not fit the policy's context \(\d+ tokens\): "
                                          r"question 'train/long' renders to \d+ prompt tokens \+ max_tokens 16; "
                                          r"shorten them, lower max_tokens, or set long_prompts: skip"):
        dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), _with_one_long_question(),
                         metric=dspy_p2o.rewards.math_metric, policy=tiny_model_dir, run_dir=tmp_path / "run",
                         **tiny_overrides(**SETTINGS))
    assert not (tmp_path / "run").exists()


def test_long_prompts_skip_leaves_the_long_question_out_and_trains_on_the_rest(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), _with_one_long_question(),
                     metric=dspy_p2o.rewards.math_metric, policy=tiny_model_dir, run_dir=run_dir,
                     **tiny_overrides(**SETTINGS, long_prompts="skip"))
    rolled_out = [json.loads(line)["id"] for line in (run_dir / "rewards" / "epoch-1.jsonl").read_text().splitlines()]
    assert sorted(rolled_out) == [f"train/{i}" for i in range(4)]
