"""pass@k: one unbiased estimator (Chen et al., 2021) for the loop, `eval` and the toy world."""

from __future__ import annotations

import itertools
import random

import pytest

from dspy_p2o.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_success(n):
    """Brute force: over every k-subset of n samples (c correct), the share holding a correct one."""
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


def test_pass_at_group_size_is_any_success_and_pass_at_1_is_the_mean():
    """The loop's former definitions, for its binary rewards: pass@K of a group of K = any
    reward > 0 (groups of any size), pass@1 = the mean reward (a single greedy sample: 0 or 1)."""
    rng = random.Random(0)
    groups = [[float(rng.random() < 0.3) for _ in range(rng.randint(1, 6))] for _ in range(50)]
    assert mean_pass_at_k(groups) == sum(max(g) > 0 for g in groups) / len(groups)
    assert mean_pass_at_k(groups, 1) == pytest.approx(sum(sum(g) / len(g) for g in groups) / len(groups))
    assert mean_pass_at_k([[1.0], [0.0], [1.0]], 1) == 2 / 3
    assert mean_pass_at_k([[0.0, 0.5]]) == 1.0  # a partial reward counts as a success, as before
    assert mean_pass_at_k([]) == 0.0


def test_eval_uses_the_same_estimator():
    from dspy_p2o import evaluation

    assert evaluation.pass_at_k is pass_at_k
