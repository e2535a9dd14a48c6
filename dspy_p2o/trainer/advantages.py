"""Group-relative advantages (GRPO) with the Dr. GRPO and batch-level scaling variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dspy_p2o.config import SCALES


@dataclass
class Advantages:
    values: torch.Tensor  # one per rollout, 0 for rollouts of zero-std groups
    informative: torch.Tensor  # bool per rollout: its group's rewards are not all equal
    num_groups: int
    num_zero_std_groups: int

    @property
    def zero_std_fraction(self) -> float:
        return self.num_zero_std_groups / max(1, self.num_groups)


def group_advantages(rewards: Sequence[float] | torch.Tensor, group_ids: Sequence[str], *,
                     scale: str = "group", eps: float = 1e-6) -> Advantages:
    """A_i = (r_i - mean of its group) / (std + eps).

    scale="group": std of the rollout's group (GRPO); "batch": std of all rewards of the
    batch (less noisy for small K); "none": no division (Dr. GRPO). Std is the
    population std. Groups whose rewards are all equal carry no signal: their
    advantages are 0 and `informative` is False for them.
    """
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale!r}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.ndim != 1 or len(r) != len(group_ids):
        raise ValueError(f"{len(r)} rewards for {len(group_ids)} group ids")
    if not torch.isfinite(r).all():
        bad = int((~torch.isfinite(r)).nonzero()[0])
        raise ValueError(f"reward of rollout {bad} (group {group_ids[bad]!r}) is not finite: {r[bad].item()}")
    index: dict[str, int] = {}
    gid = torch.tensor([index.setdefault(g, len(index)) for g in group_ids])
    groups = len(index)
    count = torch.zeros(groups, dtype=torch.float64).index_add_(0, gid, torch.ones_like(r))
    mean = torch.zeros(groups, dtype=torch.float64).index_add_(0, gid, r) / count
    centred = r - mean[gid]
    var = torch.zeros(groups, dtype=torch.float64).index_add_(0, gid, centred**2) / count
    # exact equality (not a tolerance): any reward difference is a signal
    zero_std = (r.new_zeros(groups).index_add_(0, gid, (centred != 0).double()) == 0)
    if scale == "group":
        adv = centred / (var.sqrt()[gid] + eps)
    elif scale == "batch":
        adv = centred / (r.std(correction=0) + eps)
    else:
        adv = centred
    informative = ~zero_std[gid]
    adv = torch.where(informative, adv, torch.zeros_like(adv))
    return Advantages(adv.float(), informative, groups, int(zero_std.sum()))
