"""Checkpoint directories: `checkpoint-<step>` under a run's checkpoint folder (the layout only:
names, the newest complete one, pruning, the state file; torch-free, so the run directory can
find a checkpoint without loading the trainer, which writes them).

Each holds `model/` (save_pretrained model + tokenizer: what an engine or a user loads; a LoRA
run's is the adapter + tokenizer, loadable with peft or vLLM's --lora-modules, merged into a
model directory by `dspy-p2o merge`), `state/` (accelerate's save_state: model -- a LoRA run's
adapter only --, optimizer, scheduler, RNG states) and
`trainer_state.json` (step, the caller's extra state). A checkpoint is written under a
temporary name and renamed when complete, so a run killed mid-save never leaves a
half-written checkpoint behind for resume to trip on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from dspy_p2o.jsonio import write_json

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_dirs(run_checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in the folder, or None."""
    dirs = checkpoint_dirs(run_checkpoints_dir)
    return dirs[-1] if dirs else None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def prune(run_checkpoints_dir: str | os.PathLike, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in checkpoint_dirs(run_checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def write_state(directory: Path, state: dict) -> None:
    write_json(directory / STATE_FILE, state)


def read_state(directory: str | os.PathLike) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a dspy_p2o checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())
