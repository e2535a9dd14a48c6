"""The state of Alg. 1 between two batches: everything the loop keeps, saved as state.json.

Under N processes every process holds an identical copy -- the outcomes of every batch
are gathered from all ranks, the prompt phase's assignment is broadcast from the main
process -- so each field here is something the ranks agree on; only the main process
writes the file (`RunDir.save_state`, an atomic JSON write).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

PHASES = ("train", "prompt")
# fields older versions wrote and nothing reads: dropped on load, so their runs resume
RETIRED = ("sync_s", "templated_stats")


@dataclass
class LoopState:
    epoch: int = 0  # the epoch being run, 0-based (== epochs once done)
    phase: str = "train"  # "train" (phase 1, GRPO) or "prompt" (phase 2, GEPA) of `epoch`
    batch: int = 0  # the next batch of phase 1
    rewards: dict[str, list[float]] = field(default_factory=dict)  # this epoch's reward of every rollout, per question
    templated: dict[str, list[bool]] = field(default_factory=dict)  # ... and whether that rollout was templated
    # this epoch's successful plain rollouts as few-shot demo records, one per question (prompt.optimizer fewshot)
    demos: dict[str, dict[str, Any]] = field(default_factory=dict)
    assignments: dict[str, list[Any]] = field(default_factory=dict)  # per hard question: its templates (JSON)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    checkpoint: str | None = None  # the latest trainer checkpoint directory
    checkpoint_step: int | None = None  # the optimiser step that checkpoint holds
    metrics_offset: int | None = None  # metrics.jsonl's size at this save: a resume drops what came after
    metric_failures: int = 0  # failed metric calls (scored 0) so far in this epoch
    hard_count: int = 0  # |D_hard| of the last prompt phase
    prompt_phase_skipped_last: bool = False  # the last prompt phase did not run: it was the run's last epoch
    done: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"loop state phase must be one of {PHASES}, got {self.phase!r}")

    def mining_rewards(self, hardness_on: str) -> dict[str, list[float]]:
        """What hard mining reads per question: every rollout's reward ("all"), or only the plain
        (un-templated) rollouts' ("plain"), falling back to all for a question without plain ones."""
        if hardness_on == "all":
            return dict(self.rewards)
        out = {}
        for ident, rewards in self.rewards.items():
            plain = [r for r, t in zip(rewards, self.templated.get(ident, ())) if not t]
            out[ident] = plain or rewards
        return out

    def extend(self) -> None:
        """A finished run resumed with more epochs. Its last epoch's prompt phase did not run when that was
        the run's last epoch (no later epoch would have used the templates): that epoch goes back to its
        prompt phase (its rewards were kept) and its history entry is recomputed when it ends again.
        Otherwise the next epoch starts afresh."""
        if self.prompt_phase_skipped_last:
            self.epoch, self.phase, self.prompt_phase_skipped_last = self.epoch - 1, "prompt", False
            self.history.pop()
        else:
            self.rewards, self.templated, self.demos = {}, {}, {}
        self.done = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LoopState":
        data = {k: v for k, v in data.items() if k not in RETIRED}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"state.json has unknown fields {unknown}: written by another version of dspy_p2o?")
        return cls(**data)
