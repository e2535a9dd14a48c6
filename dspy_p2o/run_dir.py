"""The run directory: every artefact of a P^2O run, and the state that lets it resume.

    config.yaml            resolved config (no secrets)
    state.json             where the loop is (epoch, phase, next batch) + the latest checkpoint
    metrics.jsonl          one JSON object per optimiser step / epoch / evaluation
    checkpoints/checkpoint-N/  model/ (save_pretrained) + accelerate state (optimiser, scheduler, RNG)
    templates/epoch-N.json the prompt phase's pool, score matrix and assignment
    hard/epoch-N.jsonl     ids and success rates of the hard questions
    gepa/epoch-N/          GEPA's own log dir (lets an interrupted prompt phase resume)
    plots/*.png            training dynamics
    summary.md             what a person reads first
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from dspy_p2o.config import ConfigError, P2OConfig
from dspy_p2o.jsonio import write_json

# Keys whose change makes an existing run directory meaningless to resume.
IDENTITY_KEYS = ("policy", "k", "batch_size", "prompt_phase", "seed", "temperature", "max_tokens",
                 "plain_per_group", "hardness_on", "near_hard", "tau")


def fingerprint(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -------------------------------------------------------------- paths
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def templates_file(self, epoch: int) -> Path:
        return self.path / "templates" / f"epoch-{epoch}.json"

    def hard_file(self, epoch: int) -> Path:
        return self.path / "hard" / f"epoch-{epoch}.jsonl"

    def gepa_dir(self, epoch: int) -> Path:
        return self.path / "gepa" / f"epoch-{epoch}"

    # -------------------------------------------------------------- lifecycle
    def exists(self) -> bool:
        return self.state_file.exists()

    def create_or_check(self, config: P2OConfig, identity: dict[str, Any]) -> bool:
        """Write the config of a new run, or check an existing run is compatible. True when resuming."""
        self.path.mkdir(parents=True, exist_ok=True)
        identity_file = self.path / "identity.json"
        if identity_file.exists():
            previous = json.loads(identity_file.read_text())
            changed = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
            if changed:
                details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ConfigError(f"run directory {str(self.path)!r} belongs to an incompatible run ({details}); "
                                  "use a new run directory, or the original settings to resume")
            return self.exists()
        self.config_file.write_text(config.to_yaml())
        write_json(identity_file, identity)
        return False

    def load_state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        write_json(self.state_file, state)


def identity_of(config: P2OConfig, policy: str, train_ids: list[str]) -> dict[str, Any]:
    values = {key: getattr(config, key) for key in IDENTITY_KEYS}
    values["policy"] = str(policy)
    values["trainset"] = fingerprint(train_ids)
    return values
