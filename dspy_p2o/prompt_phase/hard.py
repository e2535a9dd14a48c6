"""Hard-set mining: which questions the policy cannot solve on its own.

A question is hard when the mean reward of its K rollouts is below `tau` (default: no
success at all). The authors' code also admits "near-hard" questions, solved by exactly
one rollout out of K: one lucky sample is not a skill yet.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence


def success_rates(rewards_by_id: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean reward per question id; a question without rollouts or with a non-finite reward is an error."""
    rates = {}
    for qid, rewards in rewards_by_id.items():
        rewards = list(rewards)
        if not rewards:
            raise ValueError(f"question {qid!r} has no rollout rewards")
        bad = [r for r in rewards if not isinstance(r, (int, float)) or not math.isfinite(r)]
        if bad:
            raise ValueError(f"question {qid!r} has non-finite or non-numeric rewards {bad[:3]}")
        rates[qid] = sum(rewards) / len(rewards)
    return rates


def mine_hard(rewards_by_id: Mapping[str, Sequence[float]], *, tau: float = 1e-9, near_hard: bool = False,
              success_at: float = 1.0) -> list[str]:
    """Ids of the hard questions, in input order.

    hard: mean reward < tau. near_hard additionally admits questions where exactly one
    rollout reached `success_at` (a success under the strict binary reward) and no other
    rollout scored anything.
    """
    rates = success_rates(rewards_by_id)
    hard = []
    for qid, rewards in rewards_by_id.items():
        if rates[qid] < tau:
            hard.append(qid)
        elif near_hard and len(rewards) > 1:
            successes = sum(1 for r in rewards if r >= success_at)
            partial = sum(1 for r in rewards if 0 < r < success_at)
            if successes == 1 and partial == 0:
                hard.append(qid)
    return hard
