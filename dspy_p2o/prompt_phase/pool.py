"""The template pool after GEPA: Pareto front (paper Alg. 4) and greedy assignment (Alg. 2).

Pure functions over a score matrix `scores[c][j]`: candidate template c on dev example j.
A template *solves* an example when its score reaches `threshold` (1.0 under the strict
binary reward). Templates are opaque here (an instruction, or one per predictor of a compound
program: evaluation.template_of; with demos for a few-shot candidate); only their indices and scores matter.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence, TypeVar

T = TypeVar("T")  # a template: str, or {predictor name: instruction} for a compound program


def _check_matrix(scores: Sequence[Sequence[float]]) -> int:
    """Number of examples; every row must have it."""
    if not scores:
        return 0
    width = len(scores[0])
    for c, row in enumerate(scores):
        if len(row) != width:
            raise ValueError(f"score matrix row {c} has {len(row)} entries, row 0 has {width}")
    return width


def mean_scores(scores: Sequence[Sequence[float]]) -> list[float]:
    """Mean dev score per candidate (0 for an empty dev set)."""
    _check_matrix(scores)
    return [sum(row) / len(row) if len(row) else 0.0 for row in scores]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a >= b on every example and > on at least one."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def weighted_sample(items: Sequence[int], weights: Sequence[float], n: int, rng: random.Random) -> list[int]:
    """n distinct items drawn without replacement, probability proportional to weight.

    Zero-weight items are drawn only after every positive-weight item (uniformly among
    themselves), so a template that never scored is never preferred to one that did.
    """
    pool = list(zip(items, weights))
    chosen = []
    while pool and len(chosen) < n:
        total = sum(max(w, 0.0) for _, w in pool)
        if total <= 0:
            idx = rng.randrange(len(pool))
        else:
            x, idx = rng.random() * total, len(pool) - 1
            for i, (_, w) in enumerate(pool):
                x -= max(w, 0.0)
                if x < 0:
                    idx = i
                    break
        chosen.append(pool.pop(idx)[0])
    return chosen


def pareto_front(scores: Sequence[Sequence[float]], width: int | None, rng: random.Random) -> list[int]:
    """Indices of the non-dominated candidates (ascending). Candidates with equal score
    vectors do not dominate each other, so ties all stay. With more than `width`
    (None: no limit), `width` of them are sampled weighted by mean dev score."""
    _check_matrix(scores)
    front = [c for c, row in enumerate(scores)
             if not any(dominates(other, row) for o, other in enumerate(scores) if o != c)]
    if width is None or len(front) <= width:
        return front
    if width < 1:
        raise ValueError(f"Pareto front width must be >= 1, got {width}")
    means = mean_scores(scores)
    return sorted(weighted_sample(front, [means[c] for c in front], width, rng))


def solved_examples(scores: Sequence[Sequence[float]], candidate: int, threshold: float = 1.0) -> set[int]:
    return {j for j, s in enumerate(scores[candidate]) if s >= threshold}


def greedy_cover(scores: Sequence[Sequence[float]], candidates: Sequence[int] | None = None,
                 threshold: float = 1.0) -> list[int]:
    """A small set of candidates that together solve every example any of them solves
    (greedy set cover, paper Alg. 2), in pick order. Each step takes the candidate solving
    most still-uncovered examples; ties go to the higher mean dev score, then the lower index.
    Candidates that solve nothing are never picked."""
    _check_matrix(scores)
    candidates = list(range(len(scores))) if candidates is None else list(candidates)
    for c in candidates:
        if not 0 <= c < len(scores):
            raise ValueError(f"candidate index {c} is outside the score matrix ({len(scores)} candidates)")
    means = mean_scores(scores)
    solves = {c: solved_examples(scores, c, threshold) for c in candidates}
    uncovered = set().union(*solves.values()) if solves else set()
    cover: list[int] = []
    while uncovered:
        best = max(candidates, key=lambda c: (len(solves[c] & uncovered), means[c], -c))
        cover.append(best)
        uncovered -= solves[best]
    return cover


def solved_by(scores: Sequence[Sequence[float]], example_ids: Sequence[str],
              candidates: Sequence[int] | None = None, threshold: float = 1.0) -> dict[str, list[int]]:
    """For each example id (a column of `scores`), the candidates (rows) that solved it.
    `candidates` maps rows to candidate indices when the matrix covers only some of the pool."""
    width = _check_matrix(scores)
    if scores and width != len(example_ids):
        raise ValueError(f"score matrix has {width} columns but {len(example_ids)} example ids were given")
    index = list(range(len(scores))) if candidates is None else list(candidates)
    if len(index) != len(scores):
        raise ValueError(f"{len(index)} candidate indices given for a {len(scores)}-row score matrix")
    return {eid: [index[r] for r in range(len(scores)) if scores[r][j] >= threshold]
            for j, eid in enumerate(example_ids)}


def sample_k(choices: Sequence[int], weights: Sequence[float], k: int, rng: random.Random) -> list[int]:
    """k candidates from `choices`, as varied as possible: weighted draws without replacement,
    starting a fresh round whenever every choice has been used (k may exceed len(choices))."""
    out: list[int] = []
    while len(out) < k:
        out.extend(weighted_sample(choices, weights, k - len(out), rng))
    return out


def assign_templates(question_ids: Sequence[str], solved: Mapping[str, Sequence[int]], templates: Sequence[T],
                     mean_dev_scores: Sequence[float], cover: Sequence[int], *, k: int, rng: random.Random,
                     same_template_in_group: bool = False,
                     excluded: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[T]]:
    """K templates per hard question (paper Alg. 2).

    A question draws from the templates that solved it, else from the covering set,
    weighted by mean dev score; never from its `excluded` templates (those whose demos show
    the question's own answer). `same_template_in_group` (ablation) draws one template and
    uses it for all K rollouts. A question with neither (nothing solved anything) gets no
    entry: it is rolled out on its plain input.
    """
    if k < 1:
        raise ValueError(f"k (templates per question) must be >= 1, got {k}")
    if len(templates) != len(mean_dev_scores):
        raise ValueError(f"{len(templates)} templates but {len(mean_dev_scores)} mean dev scores")
    for c in list(cover) + [c for ids in solved.values() for c in ids]:
        if not 0 <= c < len(templates):
            raise ValueError(f"template index {c} is outside the pool of {len(templates)} templates")
    assignments: dict[str, list[T]] = {}
    for qid in question_ids:
        banned = set((excluded or {}).get(qid) or ())
        choices = (sorted(set(solved.get(qid) or []) - banned)) or [c for c in cover if c not in banned]
        if not choices:
            continue
        weights = [mean_dev_scores[c] for c in choices]
        picks = sample_k(choices, weights, 1 if same_template_in_group else k, rng)
        if same_template_in_group:
            picks = picks * k
        assignments[qid] = [templates[c] for c in picks]
    return assignments
