"""Checkpoint directories: `checkpoint-<step>` under a run's checkpoint folder (the layout only:
names, the newest complete one, pruning, the state file, sizes; torch-free, so the run directory
can find a checkpoint without loading the trainer, which writes them).

Each holds
- `model/`: the full weights (`save_pretrained`, fp32; gathered from the shards under FSDP2) and
  the tokenizer: what an engine or a user loads, and where a resume takes the weights from (a LoRA
  run's: the adapter alone -- adapter_config.json + adapter_model.safetensors --, loadable with
  peft or vLLM's --lora-modules, merged into a model directory by `dspy-p2o merge`);
- `state/optimizer/`: AdamW's state by parameter name in torch.distributed.checkpoint's format
  (each process writes its shard; read back under any number of processes); absent with
  `trainer.checkpoint_optimizer: false` (a resume then restarts AdamW's moments);
- `state/`: accelerate's scheduler file and one RNG file per process;
- `trainer_state.json`: step, the caller's extra state, the trainer config, the process count.
The weights are stored once: with AdamW's two fp32 moments a checkpoint is about 3 x the fp32
weights, 1 x without them. A checkpoint is written under a temporary name and renamed when every
process has finished, so a run killed mid-save never leaves a half-written checkpoint behind for
resume to trip on. (Checkpoints written earlier by accelerate's `save_state` -- `state/` held the
weights and optimizer too -- still load.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from dspy_p2o.jsonio import write_json

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
STATE_DIR = "state"
OPTIMIZER_DIR = "optimizer"
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


def written_by_save_state(directory: str | os.PathLike) -> bool:
    """A checkpoint of the earlier layout: accelerate's `save_state` wrote the weights into `state/`."""
    state = Path(directory) / STATE_DIR
    return any((state / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))


def size_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the files under `directory`."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class NoSpaceForCheckpoint(OSError):
    """The disk filled up while a checkpoint was written; it was removed, earlier ones are intact."""

    def __init__(self, step: int, directory: str | os.PathLike) -> None:
        self.step, self.directory = step, Path(directory)
        super().__init__(errno.ENOSPC, f"no space left while writing checkpoint {step} in {self.directory}")
