"""`dspy-p2o demo`: P^2O vs GRPO in the toy world, end to end on CPU in minutes.

Pretrains (or loads from the cache) a tiny base policy, runs the GRPO and P^2O arms
(`--full`: also the two ablations) through the P^2O loop and prints a Table-2-style
summary of held-out accuracy WITHOUT templates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspy_p2o import display


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="run all four arms (adds the two ablations)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the pretraining and the training")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--out", type=Path, default=Path("runs/toyworld"), metavar="DIR",
                        help="run directories, table and plot (default: runs/toyworld)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="base-policy cache (default: $DSPY_P2O_CACHE/toyworld or ~/.cache/dspy_p2o/toyworld)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    display.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from dspy_p2o.toyworld.experiment import ARMS, DEMO_ARMS, run_experiment, toy_config

    display.configure(verbose=args.verbose)
    config = toy_config({} if args.epochs is None else {"epochs": args.epochs})  # ConfigError: one line (cli.py)
    arms = tuple(ARMS) if args.full else DEMO_ARMS
    doc = run_experiment(args.seed, arms, out_dir=args.out, config=config, cache_dir=args.cache_dir,
                         progress=not args.quiet, log=print if not args.quiet else lambda line: None)
    from dspy_p2o.toyworld.expectations import compare, load_expected
    from dspy_p2o.toyworld.experiment import markdown_table

    print()
    print(markdown_table(doc))
    print(compare(doc, load_expected()))
    out = Path(args.out) / f"seed{args.seed}"
    print(f"table, plot and run directories: {out}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": doc["seed"], "arms": doc["arms"], "base": doc["base"]}, indent=2))
        print(f"results: {args.json}")
    return 0
