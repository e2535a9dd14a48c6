"""`dspy-p2o merge --adapter DIR --out DIR [--base MODEL]`: a LoRA run's adapter merged into its
base model, written as one plain `save_pretrained` model directory (for `dspy-p2o eval --model`,
or anything that loads a model directory). `--adapter` is the adapter directory (a LoRA run's
`result.checkpoint`, checkpoint-N/model), a checkpoint, or a run directory (its latest checkpoint).
The adapter names its base model, which --base replaces (e.g. when it has moved)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="a LoRA adapter directory (adapter_config.json), a "
                        "checkpoint (RUN_DIR/checkpoints/checkpoint-N) or a run directory (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="the directory to write the merged model to (new or empty)")
    parser.add_argument("--base", help="the base model (directory or hub id); default: the one the adapter names")


def main(args: argparse.Namespace) -> int:
    from dspy_p2o.config import ConfigError
    from dspy_p2o.lora import merge_adapter
    from dspy_p2o.models import ModelPackageMissing

    try:
        out = merge_adapter(adapter_dir(args.adapter), args.out, base=args.base)
    except (FileNotFoundError, FileExistsError, ModelPackageMissing, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(out)
    return 0


def adapter_dir(path: str) -> Path:
    """The adapter directory `path` names: itself, a checkpoint's model/, or a run's latest checkpoint's."""
    from dspy_p2o import checkpoints
    from dspy_p2o.lora import ADAPTER_CONFIG

    path = Path(path)
    if (path / "checkpoints").is_dir():  # a run directory
        latest = checkpoints.latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"run directory {str(path)!r} has no checkpoint yet")
        path = latest
    if not (path / ADAPTER_CONFIG).is_file() and (path / checkpoints.MODEL_DIR / ADAPTER_CONFIG).is_file():
        path = path / checkpoints.MODEL_DIR  # a checkpoint
    return path
