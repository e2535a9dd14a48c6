"""`dspy-p2o` command line: one subcommand per capability, each living in its own module.

A subcommand module exposes `add_arguments(parser)` and `main(args) -> int`; it is
imported only when used, so `dspy-p2o --help` stays fast. A `ConfigError` (a bad override,
config, run directory or setting) or a `MetricError` (a metric unusable as a reward) is printed as one line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("dspy_p2o.train_cli", "run P^2O (or a baseline/ablation) from a YAML config"),
    "eval": ("dspy_p2o.evaluation.cli", "evaluate a model on the maths benchmarks"),
    "score": ("dspy_p2o.evaluation.score_cli", "score existing generations on a benchmark (no model)"),
    "model": ("dspy_p2o.model_cli", "a packaged real model (e.g. smollm2-135m-instruct) as a model directory, offline"),
    "merge": ("dspy_p2o.merge_cli", "merge a LoRA run's adapter into its base model: one plain model directory"),
    "demo": ("dspy_p2o.toyworld.cli", "the toy-world experiment: P^2O vs GRPO on CPU in minutes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspy-p2o", description="P^2O: co-optimise the prompt and the weights of a small LM for DSPy programs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        module.add_arguments(parser._subparsers._group_actions[0].choices[command])
    args = parser.parse_args(argv)
    from dspy_p2o.processes import die_with_launcher

    die_with_launcher()  # under torchrun / accelerate launch: a killed launcher takes this rank with it
    module = importlib.import_module(args._module)
    from dspy_p2o.config import ConfigError
    from dspy_p2o.rewards import MetricError

    try:
        return int(module.main(args) or 0)
    except (ConfigError, MetricError) as exc:  # a usage error: one line naming the problem, argparse's exit code
        print(f"dspy-p2o {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
