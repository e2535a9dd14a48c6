"""pass@k, the one definition behind the loop's validation, its with/without-template
statistics, `dspy-p2o eval` and the toy world's accuracy.

pass@k is the probability that at least one of k samples of a problem is correct,
estimated without bias from n >= k samples of which c are correct (Chen et al., 2021,
"Evaluating Large Language Models Trained on Code", Eq. 1):

    pass@k = 1 - C(n - c, k) / C(n, k)

With k = 1 it is c / n, the fraction correct (one greedy sample: 0 or 1); with k = n
it is 1 when any sample is correct.  A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

from math import comb
from typing import Iterable, Sequence

__all__ = ["mean_pass_at_k", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(groups: Iterable[Sequence[float]], k: int | None = None) -> float:
    """Mean over problems of pass@k, each problem given as the rewards of its samples
    (a sample is correct when its reward is > 0); ``k=None`` takes k = each problem's
    own number of samples ("any sample correct").  0.0 when there are no problems."""
    values = [pass_at_k(len(g), sum(1 for r in g if r > 0), len(g) if k is None else k) for g in groups]
    return sum(values) / len(values) if values else 0.0
