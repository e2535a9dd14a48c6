"""`dspy-p2o train --config FILE [--run-dir DIR] [--resume] [key=value ...]`.

Ctrl-C stops a run with one line giving the exact command that resumes it (exit code 130); a disk
that fills up while a checkpoint is written stops it with one line too (exit code 1). Under torchrun /
accelerate launch these lines and the final `done:` line come from the main process only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
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
    overrides = parse_overrides(args.overrides)
    if args.quiet:
        overrides["progress"] = False
    cfg = P2OConfig.load(args.config, overrides)  # ConfigError: one line, exit 2 (cli.py)
    if not cfg.policy:
        raise ConfigError("the config names no policy (set policy: <model dir or hub id>)")
    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_run_dir(run_dir)
    if args.resume and not (run_dir / "state.json").exists():
        raise ConfigError(f"nothing to resume in {run_dir} (no state.json)")
    if not args.resume and (run_dir / "state.json").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it")
    display.configure(verbose=args.verbose)
    from dspy_p2o.checkpoints import NoSpaceForCheckpoint
    from dspy_p2o.processes import end_process_group

    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun: one line, from the main process
    try:
        result = _train(cfg, run_dir)
    except KeyboardInterrupt:
        if main_process:
            print(f"dspy-p2o train: {stopped_line(args, run_dir)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except NoSpaceForCheckpoint as exc:
        if main_process:
            print(f"dspy-p2o train: error: no space left while writing checkpoint {exc.step} in {exc.directory} "
                  f"(removed); nothing lost: free some space (or set trainer.checkpoint_optimizer=false or a lower "
                  f"trainer.keep_last_checkpoints), then resume with: {resume_command(args, run_dir)}", file=sys.stderr)
        return 1
    if main_process:
        adapter = (f" (a LoRA adapter; as a model directory: dspy-p2o merge --adapter {result.checkpoint} --out DIR)"
                   if cfg.trainer.lora is not None else "")
        print(f"done: {len(result.history)} epochs; checkpoint {result.checkpoint}{adapter}; "
              f"summary {result.run_dir / 'summary.md'}")
    end_process_group()
    return 0


def _train(cfg: P2OConfig, run_dir: Path):
    from dspy_p2o.api import compile
    from dspy_p2o.programs import get_program
    from dspy_p2o.rewards import math_metric

    d = cfg.data
    trainset, valset = datasets(cfg)
    metric = math_metric if d.metric == "math" else _import(d.metric)
    return compile(get_program(d.program), trainset, metric=metric, policy=cfg.policy, reflection=cfg.reflection,
                   valset=valset, engine=cfg.engine, run_dir=run_dir, config=cfg)


def datasets(cfg: P2OConfig) -> tuple[list, list | None]:
    """The config's training set (shuffled by the seed, filtered by difficulty, with its kept label fields,
    then limited) and validation set (None when it names none)."""
    from dspy_p2o.data import load_trainset

    d = cfg.data
    trainset = load_trainset(d.train, question_field=d.question_field, answer_field=d.answer_field, limit=d.train_limit,
                             seed=cfg.seed, min_difficulty=d.train_min_difficulty,
                             max_difficulty=d.train_max_difficulty, keep_fields=d.keep_fields)
    valset = (load_trainset(d.val, question_field=d.question_field, answer_field=d.answer_field, limit=d.val_limit)
              if d.val else None)
    return trainset, valset


def stopped_line(args: argparse.Namespace, run_dir: Path) -> str:
    """What a stopped run says: the command that resumes it (the same config and overrides), or
    that nothing was saved yet."""
    if (run_dir / "state.json").exists():
        return f"stopped; resume with: {resume_command(args, run_dir)}"
    return f"stopped before the run saved anything; start it again with: {_command(args, run_dir)}"


def resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command that resumes this run: the same config and overrides, with --resume."""
    return _command(args, run_dir, "--resume")


def _command(args: argparse.Namespace, run_dir: Path, *extra: str) -> str:
    command = ["dspy-p2o", "train", "--config", args.config, "--run-dir", str(run_dir)]
    command += ["--quiet"] if args.quiet else ["--verbose"] if args.verbose else []
    return shlex.join([*command, *extra, *args.overrides])


def _check_run_dir(run_dir: Path) -> None:
    """--run-dir must be (or be creatable as) a writable directory: checked before any work."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())  # the path itself, or where it would go
    if not existing.is_dir():
        what = "is a file" if existing == run_dir else f"is under {str(existing)!r}, a file"
        raise ConfigError(f"run directory {str(run_dir)!r} {what}, not a directory; choose another --run-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {str(run_dir)!r} cannot be written ({str(existing)!r} is read-only)")


def _import(path: str):
    import importlib

    module, _, attr = path.partition(":")
    if not attr:
        raise ConfigError(f"data.metric {path!r} must be 'math' or 'module:attr'")
    return getattr(importlib.import_module(module), attr)
