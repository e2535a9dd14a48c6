"""Held-out accuracy and parse rate of runs' final checkpoints, split by kind of question.

The loop's validation reports one number per epoch; this script splits the last one by the
held-out rows' `level` (benchmarks/data/sums: 0 one-digit + one-digit, 5 two-digit + one-digit),
for the initial model and each run's latest checkpoint, scored as the loop scores it: the run's
program, adapter and validation set, greedy, WITHOUT templates or demos.

    python benchmarks/held_out_by_kind.py runs/grpo-s0 runs/fewshot-s0 --json runs/held_out_by_kind.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def score(model_dir: str, cfg, valset, levels: dict[str, int]) -> dict:
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.engines.base import SamplingParams
    from dspy_p2o.program_eval import score_program
    from dspy_p2o.programs import get_program
    from dspy_p2o.renderer import make_adapter
    from dspy_p2o.rewards import math_metric

    engine = LocalEngine(model_dir, device="cpu", dtype="float32")
    try:
        scores = score_program(engine, get_program(cfg.data.program), valset, math_metric,
                               sampling=SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens, seed=0),
                               adapter=make_adapter(cfg.adapter))
    finally:
        engine.close()
    by_level = defaultdict(list)
    for ident, rewards in scores.rewards.items():
        by_level[levels[ident]].append(rewards[0])
    out = {f"level {level}": round(100 * sum(r) / len(r), 1) for level, r in sorted(by_level.items())}
    out["all"] = round(100 * scores.pass_at(1), 1)
    out["parse"] = round(100 * (1 - scores.format_failures / len(valset)), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (one config: the first run's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from dspy_p2o.checkpoints import latest_checkpoint
    from dspy_p2o.config import P2OConfig
    from dspy_p2o.models import materialize
    from dspy_p2o.train_cli import datasets

    cfg = P2OConfig.load(args.runs[0] / "config.yaml")
    _, valset = datasets(cfg)
    if not valset:
        raise SystemExit(f"{args.runs[0]}: the run has no validation set")
    levels = {ex.id: int(ex.get("difficulty", -1)) for ex in valset}
    rows = {"initial model": score(str(materialize(cfg.policy)), cfg, valset, levels)}
    for run in args.runs:
        checkpoint = latest_checkpoint(run / "checkpoints")
        if checkpoint is None:
            raise SystemExit(f"{run}: no checkpoint")
        rows[f"{run.name} ({checkpoint.name})"] = score(str(checkpoint / "model"), cfg, valset, levels)
    for name, row in rows.items():
        print(f"{name}: " + ", ".join(f"{k} {v}%" for k, v in row.items()), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
