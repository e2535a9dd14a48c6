"""`dspy-p2o model NAME [--out DIR]`: a packaged real model as an ordinary model directory."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dspy_p2o.models import PACKAGED_MODELS

    names = ", ".join(f"{n} ({m.description})" for n, m in PACKAGED_MODELS.items())
    parser.add_argument("name", help=f"a packaged model: {names}")
    parser.add_argument("--out", help="directory to write (default: the cache, $DSPY_P2O_CACHE or ~/.cache/dspy_p2o)")


def main(args: argparse.Namespace) -> int:
    from dspy_p2o.models import ModelPackageMissing, materialize

    try:
        path = materialize(args.name, args.out)
    except (ModelPackageMissing, ValueError, FileExistsError) as exc:
        raise SystemExit(f"dspy-p2o model: {exc}")
    print(path)
    return 0
