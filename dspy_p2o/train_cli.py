"""`dspy-p2o train --config FILE [--run-dir DIR] [--resume] [key=value ...]`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dspy_p2o import display
from dspy_p2o.config import ConfigError, P2OConfig, parse_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see benchmarks/configs/)")
    parser.add_argument("--run-dir", help="run directory (default: runs/<config name>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. epochs=2 trainer.lr=1e-5 distill=false")
    display.add_arguments(parser)  # --quiet is the override progress=false


def main(args: argparse.Namespace) -> int:
    from dspy_p2o.api import compile
    from dspy_p2o.data import load_trainset
    from dspy_p2o.programs import get_program
    from dspy_p2o.rewards import math_metric

    overrides = parse_overrides(args.overrides)
    if args.quiet:
        overrides["progress"] = False
    cfg = P2OConfig.load(args.config, overrides)  # ConfigError: one line, exit 2 (cli.py)
    if not cfg.policy:
        raise ConfigError("the config names no policy (set policy: <model dir or hub id>)")
    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and not (run_dir / "state.json").exists():
        raise ConfigError(f"nothing to resume in {run_dir} (no state.json)")
    if not args.resume and (run_dir / "state.json").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it")
    display.configure(verbose=args.verbose)
    d = cfg.data
    trainset = load_trainset(d.train, question_field=d.question_field, answer_field=d.answer_field, limit=d.train_limit,
                             seed=cfg.seed)
    valset = (load_trainset(d.val, question_field=d.question_field, answer_field=d.answer_field, limit=d.val_limit)
              if d.val else None)
    metric = math_metric if d.metric == "math" else _import(d.metric)
    result = compile(get_program(d.program), trainset, metric=metric, policy=cfg.policy, reflection=cfg.reflection,
                     valset=valset, engine=cfg.engine, run_dir=run_dir, config=cfg)
    print(f"done: {len(result.history)} epochs; checkpoint {result.checkpoint}; summary {result.run_dir / 'summary.md'}")
    return 0


def _import(path: str):
    import importlib

    module, _, attr = path.partition(":")
    if not attr:
        raise ConfigError(f"data.metric {path!r} must be 'math' or 'module:attr'")
    return getattr(importlib.import_module(module), attr)
