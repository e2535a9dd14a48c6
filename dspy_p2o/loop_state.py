"""The state of Alg. 1 between two batches: everything the loop keeps, saved as state.json.

Under N processes every process holds an identical copy -- the rewards of every batch
are gathered from all ranks, the prompt phase's assignment is broadcast from the main
process -- so each field here is something the ranks agree on; only the main process
writes the file (`RunDir.save_state`, an atomic JSON write).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

PHASES = ("train", "prompt")
RETIRED = ("sync_s",)  # fields older versions wrote and nothing read: dropped on load, so their runs resume


@dataclass
class LoopState:
    epoch: int = 0  # the epoch being run, 0-based (== epochs once done)
    phase: str = "train"  # "train" (phase 1, GRPO) or "prompt" (phase 2, GEPA) of `epoch`
    batch: int = 0  # the next batch of phase 1
    rewards: dict[str, list[float]] = field(default_factory=dict)  # this epoch's rewards per question: hard mining
    assignments: dict[str, list[Any]] = field(default_factory=dict)  # templates (str, or dict per predictor) per hard question
    templated_stats: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)  # epoch -> Fig. 4 rewards
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    checkpoint: str | None = None  # the latest trainer checkpoint directory
    checkpoint_step: int | None = None  # the optimiser step that checkpoint holds
    metrics_offset: int | None = None  # metrics.jsonl's size at this save: a resume drops what came after
    metric_failures: int = 0  # failed metric calls (scored 0) so far in this epoch
    hard_count: int = 0  # |D_hard| of the last prompt phase
    done: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"loop state phase must be one of {PHASES}, got {self.phase!r}")

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
