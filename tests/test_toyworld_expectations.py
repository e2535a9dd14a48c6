"""`dspy-p2o demo` places its row in the ten-seed distribution and checks the toy world's targets,
instead of promising one exact row (cells are machine-specific)."""

from dspy_p2o.toyworld.expectations import compare, distribution, missed, seed_targets


def _doc(seed, grpo, p2o, no_distill=None):
    arms = {"grpo": {"hard_acc": grpo[0], "easy_acc": grpo[1]}, "p2o": {"hard_acc": p2o[0], "easy_acc": p2o[1]}}
    if no_distill:
        arms["p2o_no_distill"] = {"hard_acc": no_distill[0], "easy_acc": no_distill[1]}
    return {"seed": seed, "arms": arms, "base": {"hard_acc": 0.0, "easy_acc": 1.0}}


def test_the_distribution_and_the_targets_of_seeds():
    docs = [_doc(0, (0.205, 1.0), (1.0, 0.974), (0.205, 0.974)), _doc(1, (0.0, 1.0), (0.949, 1.0))]
    expected = distribution(docs, machine="m", commit="c", command="cmd", date="d")
    assert expected["arms"]["p2o"]["hard"] == {"mean": 97.4, "std": 3.6, "min": 94.9, "max": 100.0, "n": 2}
    assert expected["arms"]["p2o_no_distill"]["hard"]["n"] == 1 and expected["seeds"] == [0, 1]
    assert missed(seed_targets(docs[0])) == []
    t = seed_targets(_doc(2, (0.154, 0.974), (0.846, 0.923)))
    assert round(t["easy_diff"], 1) == -5.1 and t["ablation_gap"] is None and missed(t) == ["easy"]
    assert missed(seed_targets(_doc(3, (0.5, 1.0), (0.6, 1.0), (0.5, 1.0)))) == ["hard", "ablation"]


def test_a_run_is_placed_in_the_distribution_and_its_targets_named():
    expected = distribution([_doc(0, (0.0, 1.0), (0.949, 0.974)), _doc(1, (0.205, 0.974), (1.0, 1.0))],
                            machine="2-core x86_64", commit="abc", command="python run_seeds.py", date="2026-12-05")
    text = compare(_doc(9, (0.154, 0.974), (0.846, 0.923)), expected)
    assert "2 seeds on 2-core x86_64 (2026-12-05, commit abc" in text
    assert "GRPO: hard 15.4 (within 0.0-20.5" in text and "P^2O: hard 84.6 (below 94.9-100.0" in text
    assert "easy -5.1 (>= -5): MISSED easy" in text
    assert "all hold" in compare(_doc(9, (0.0, 1.0), (1.0, 1.0)), None)  # no distribution packaged: the targets only
