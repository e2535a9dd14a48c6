"""`dspy-p2o merge --adapter DIR --out DIR [--base MODEL]`: a LoRA run's adapter merged into its
base model, written as one plain `save_pretrained` model directory (for `dspy-p2o eval --model`,
or anything that loads a model directory). A LoRA run's `result.checkpoint` (checkpoint-N/model)
is such an adapter; it names its base model, which --base replaces (e.g. when it has moved)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="a LoRA adapter directory (adapter_config.json), e.g. "
                                                         "RUN_DIR/checkpoints/checkpoint-N/model")
    parser.add_argument("--out", required=True, help="the directory to write the merged model to (new or empty)")
    parser.add_argument("--base", help="the base model (directory or hub id); default: the one the adapter names")


def main(args: argparse.Namespace) -> int:
    from dspy_p2o.config import ConfigError
    from dspy_p2o.lora import merge_adapter
    from dspy_p2o.models import ModelPackageMissing

    try:
        out = merge_adapter(args.adapter, args.out, base=args.base)
    except (FileNotFoundError, FileExistsError, ModelPackageMissing, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(out)
    return 0
