"""Hard-set mining."""

import pytest

from dspy_p2o.prompt_phase.hard import mine_hard, success_rates

REWARDS = {"a": [0, 0, 0, 0], "b": [1, 0, 0, 0], "c": [1, 1, 0, 0], "d": [0.5, 0, 0, 0], "e": [1, 0.5, 0, 0]}


def test_success_rates():
    assert success_rates(REWARDS) == {"a": 0.0, "b": 0.25, "c": 0.5, "d": 0.125, "e": 0.375}


def test_hard_is_no_success_by_default():
    assert mine_hard(REWARDS) == ["a"]


def test_tau_threshold():
    assert mine_hard(REWARDS, tau=0.3) == ["a", "b", "d"]


def test_a_question_whose_rate_equals_tau_is_not_hard():
    # hard means mean reward < tau, strictly: "b" and "c" succeed exactly at the threshold
    assert mine_hard(REWARDS, tau=0.25) == ["a", "d"]
    assert mine_hard(REWARDS, tau=0.5) == ["a", "b", "d", "e"]
    # tau = 1: every question not solved by all its rollouts; a perfect one is not hard
    assert mine_hard({"perfect": [1, 1], "almost": [1, 0.5]}, tau=1.0) == ["almost"]


def test_near_hard_adds_exactly_one_success():
    assert mine_hard(REWARDS, near_hard=True) == ["a", "b"]


def test_bad_rewards_name_the_question():
    with pytest.raises(ValueError, match="'x' has no rollout"):
        mine_hard({"x": []})
    with pytest.raises(ValueError, match="'y' has non-finite"):
        mine_hard({"y": [float("nan")]})
