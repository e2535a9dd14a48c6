import math

import pytest
import torch

from dspy_p2o.trainer.advantages import group_advantages

GROUPS = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 3.0]


def test_group_scaling_matches_hand_computation():
    adv = group_advantages(REWARDS, GROUPS, scale="group", eps=0.0)
    # a: mean .5, std .5 -> +-1 ; b: all equal -> 0 ; c: mean 1.5, std 1.5 -> -1, +1
    assert adv.values.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0, -1, 1])
    assert adv.informative.tolist() == [True] * 4 + [False] * 4 + [True] * 2
    assert adv.num_groups == 3 and adv.num_zero_std_groups == 1
    assert adv.zero_std_fraction == pytest.approx(1 / 3)


def test_eps_is_added_to_the_std():
    adv = group_advantages([1.0, 0.0], ["g", "g"], eps=0.5)
    assert adv.values.tolist() == pytest.approx([0.5 / 1.0, -0.5 / 1.0])


def test_batch_scaling_uses_the_batch_std():
    adv = group_advantages(REWARDS, GROUPS, scale="batch", eps=0.0)
    r = torch.tensor(REWARDS, dtype=torch.float64)
    std = math.sqrt(((r - r.mean()) ** 2).mean().item())
    expected = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0, 0, 0, -1.5 / std, 1.5 / std]
    assert adv.values.tolist() == pytest.approx(expected, rel=1e-5)


def test_no_scaling_is_dr_grpo():
    adv = group_advantages(REWARDS, GROUPS, scale="none")
    assert adv.values.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -1.5, 1.5])


def test_groups_need_not_be_contiguous():
    adv = group_advantages([1.0, 5.0, 0.0, 5.0], ["a", "b", "a", "b"], scale="none")
    assert adv.values.tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0])
    assert adv.informative.tolist() == [True, False, True, False]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="group 'b'"):
        group_advantages([1.0, float("nan")], ["a", "b"])
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages([1.0], ["a"], scale="sum")
    with pytest.raises(ValueError, match="2 rewards for 1 group ids"):
        group_advantages([1.0, 0.0], ["a"])
