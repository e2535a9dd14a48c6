"""The toy-world experiment over several seeds: every arm through the P^2O loop, then mean ± spread.

    python benchmarks/toyworld/run_seeds.py --seeds 0 1 2 --arms grpo p2o p2o_no_distill p2o_same_template \
        --out runs/toyworld_seeds
    # a loop setting changed (any key of dspy_p2o/toyworld/config.yaml's schema), e.g. the plain rollouts per templated group:
    python benchmarks/toyworld/run_seeds.py --arms p2o --set plain_per_group=0 --out runs/toyworld_ppg0

Finished seeds are read back from their results.json, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dspy_p2o.config import ConfigError, P2OConfig, parse_overrides
from dspy_p2o.toyworld.experiment import ARM_TITLES, ARMS, run_experiment, toy_config


def summarise(docs: list[dict]) -> str:
    arms = [a for a in ARMS if all(a in d["arms"] for d in docs)]
    seeds = ", ".join(str(d["seed"]) for d in docs)
    lines = [f"Toy world, seeds {seeds}: held-out accuracy WITHOUT templates, mean ± std over seeds "
             "(per-seed values in brackets)", "",
             "| arm | hard acc | easy acc | hard per epoch (mean) | policy rollouts | GEPA rollouts (mean) |",
             "|---|---|---|---|---:|---:|"]
    for arm in arms:
        rs = [d["arms"][arm] for d in docs]
        epochs = len(rs[0]["hard_per_epoch"])
        hard_sizes = [round(statistics.fmean(r["hard_per_epoch"][e] for r in rs), 1) for e in range(epochs)]
        lines.append(f"| {ARM_TITLES[arm]} | {_ms([r['hard_acc'] for r in rs])} | {_ms([r['easy_acc'] for r in rs])} "
                     f"| {hard_sizes} | {rs[0]['policy_rollouts']} | {statistics.fmean(r['gepa_rollouts'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def _ms(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f} [{', '.join(f'{100 * v:.0f}' for v in values)}]"


def run_config(settings: list[str]) -> P2OConfig:
    """The toy world's config with `key=value` settings, parsed as `dspy-p2o train` parses its overrides."""
    try:
        return toy_config(parse_overrides(settings))
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path("runs/toyworld_seeds"))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides (dspy_p2o/toyworld/config.yaml)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="base-policy cache (default: the user cache)")
    args = parser.parse_args()
    config = run_config(args.set)
    docs = []
    for seed in args.seeds:
        done = args.out / f"seed{seed}" / "results.json"
        if done.exists() and all(a in json.loads(done.read_text())["arms"] for a in args.arms):
            docs.append(json.loads(done.read_text()))
            continue
        docs.append(run_experiment(seed, tuple(args.arms), out_dir=args.out, config=config, cache_dir=args.cache_dir))
    text = summarise(docs)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
