"""Pareto front (Alg. 4) and greedy assignment (Alg. 2) on hand-made score matrices."""

import random
from collections import Counter

import pytest

from dspy_p2o.prompt_phase.pool import (
    assign_templates, dominates, greedy_cover, mean_scores, pareto_front, sample_k, solved_by, weighted_sample,
)

# rows: templates, columns: dev examples q0..q3
SCORES = [
    [0, 0, 0, 0],  # 0: seed, solves nothing
    [1, 1, 0, 0],  # 1
    [0, 0, 1, 0],  # 2: dominated by 4
    [1, 0, 0, 0],  # 3: dominated by 1
    [0, 1, 1, 0],  # 4
]
IDS = ["q0", "q1", "q2", "q3"]


def test_dominance_is_strict():
    assert dominates([1, 1], [1, 0])
    assert not dominates([1, 0], [1, 0])  # equal vectors: a tie, not dominance
    assert not dominates([1, 0], [0, 1])


def test_pareto_front_drops_dominated():
    # 0 (nothing), 2 ([0,0,1,0] < 4) and 3 ([1,0,0,0] < 1) are dominated
    assert pareto_front(SCORES, None, random.Random(0)) == [1, 4]


def test_pareto_front_keeps_ties():
    scores = [[1, 0], [1, 0], [0, 0]]
    assert pareto_front(scores, None, random.Random(0)) == [0, 1]


def test_template_that_dominates_all_is_the_whole_front():
    scores = SCORES + [[1, 1, 1, 0]]
    assert pareto_front(scores, None, random.Random(0)) == [5]
    assert greedy_cover(scores) == [5]


def test_front_wider_than_width_is_sampled_by_mean_score():
    # 3 non-dominated candidates, means 0.75, 0.25, 0.25; width 1
    scores = [[1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    counts = Counter()
    rng = random.Random(0)
    for _ in range(2000):
        pick = pareto_front(scores, 1, rng)
        assert len(pick) == 1
        counts[pick[0]] += 1
    assert counts[0] / 2000 == pytest.approx(0.6, abs=0.04)  # 0.75 / 1.25
    assert counts[1] / 2000 == pytest.approx(0.2, abs=0.04)
    assert sorted(pareto_front(scores, 2, random.Random(1))) == pareto_front(scores, 2, random.Random(1))


def test_all_zero_pool_front_is_everyone():
    scores = [[0, 0], [0, 0]]
    assert pareto_front(scores, None, random.Random(0)) == [0, 1]
    assert greedy_cover(scores) == []


def test_greedy_cover_is_minimal_and_ordered():
    # 1 covers q0,q1; 4 covers q1,q2; 2 covers q2. Greedy: 1 (2 new, ties with 4 on count and mean -> lower index),
    # then q2 remains: 4 and 2 both add one; 4 has the higher mean.
    assert greedy_cover(SCORES) == [1, 4]
    assert greedy_cover(SCORES, candidates=[2, 3]) == [2, 3]


def test_greedy_cover_threshold_for_partial_scores():
    scores = [[0.5, 0.5], [1.0, 0.0]]
    assert greedy_cover(scores, threshold=1.0) == [1]
    assert greedy_cover(scores, threshold=0.5) == [0]


def test_greedy_cover_rejects_bad_index():
    with pytest.raises(ValueError, match="candidate index 9"):
        greedy_cover(SCORES, candidates=[9])


def test_ragged_matrix_is_an_error():
    with pytest.raises(ValueError, match="row 1 has 1"):
        pareto_front([[1, 0], [1]], None, random.Random(0))


def test_solved_by_with_candidate_subset():
    assert solved_by(SCORES, IDS) == {"q0": [1, 3], "q1": [1, 4], "q2": [2, 4], "q3": []}
    # a matrix over only candidates 4 and 2 (e.g. scored on hard_train)
    assert solved_by([[0, 1], [1, 1]], ["t0", "t1"], candidates=[4, 2]) == {"t0": [2], "t1": [4, 2]}


def test_assignment_uses_solvers_else_cover():
    templates = [f"z{c}" for c in range(len(SCORES))]
    means = mean_scores(SCORES)
    cover = greedy_cover(SCORES)
    out = assign_templates(IDS, solved_by(SCORES, IDS), templates, means, cover, k=4, rng=random.Random(0))
    assert set(out["q0"]) == {"z1", "z3"}  # both solvers, each used before any repeats
    assert set(out["q2"]) == {"z2", "z4"}
    assert set(out["q3"]) == {"z1", "z4"}  # uncovered question: the covering set
    assert all(len(v) == 4 for v in out.values())


def test_k_larger_than_templates_repeats_only_after_all_are_used():
    out = assign_templates(["q"], {"q": [0, 1]}, ["a", "b"], [0.5, 0.5], [], k=5, rng=random.Random(3))
    counts = Counter(out["q"])
    assert len(out["q"]) == 5 and set(counts) == {"a", "b"} and max(counts.values()) == 3
    assert sorted(out["q"][:2]) == ["a", "b"]


def test_weighting_prefers_better_templates():
    rng = random.Random(0)
    firsts = Counter(sample_k([0, 1], [0.9, 0.1], 1, rng)[0] for _ in range(2000))
    assert firsts[0] / 2000 == pytest.approx(0.9, abs=0.03)
    # zero-weight templates come only after positive ones
    assert weighted_sample([0, 1, 2], [0.0, 0.3, 0.0], 2, random.Random(0))[0] == 1


@pytest.mark.parametrize("same_template_in_group", [False, True])
def test_assignment_draws_templates_in_proportion_to_mean_dev_score(same_template_in_group):
    """Alg. 2 weights its draws by mean dev score, among a question's solvers and from the cover alike:
    over 2000 questions the template scoring 0.8 comes first ~4x as often as the one scoring 0.2."""
    ids = [f"q{i}" for i in range(2000)]
    solved = {q: [0, 1] for q in ids[:1000]}  # half solved by both templates, half by neither (-> the cover)
    out = assign_templates(ids, solved, ["strong", "weak"], [0.8, 0.2], [0, 1], k=2, rng=random.Random(0),
                           same_template_in_group=same_template_in_group)
    assert len(out) == 2000
    for half in (ids[:1000], ids[1000:]):
        firsts = Counter(out[q][0] for q in half)
        assert firsts["strong"] / 1000 == pytest.approx(0.8, abs=0.04)


def test_same_template_in_group():
    out = assign_templates(["q"], {"q": [0, 1, 2]}, ["a", "b", "c"], [1, 1, 1], [], k=6, rng=random.Random(0),
                           same_template_in_group=True)
    assert len(out["q"]) == 6 and len(set(out["q"])) == 1


def test_nothing_solved_anything_assigns_nothing():
    assert assign_templates(["q"], {"q": []}, ["a"], [0.0], [], k=3, rng=random.Random(0)) == {}


def test_assignment_validates_inputs():
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        assign_templates(["q"], {}, ["a"], [0.0], [0], k=0, rng=random.Random(0))
    with pytest.raises(ValueError, match="template index 3"):
        assign_templates(["q"], {"q": [3]}, ["a"], [0.0], [], k=1, rng=random.Random(0))
