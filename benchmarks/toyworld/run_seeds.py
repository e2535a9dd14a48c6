"""The toy-world experiment over several seeds: every arm through the P^2O loop, a per-seed table with
mean, spread and worst seed per column, and the issue's targets checked on every seed.

    python benchmarks/toyworld/run_seeds.py --seeds 0-9 --out runs/toyworld_seeds      # all four arms
    python benchmarks/toyworld/run_seeds.py --seeds 0 3 5-7 --arms grpo p2o --out runs/toyworld_demo_arms
    # a loop setting changed (any key of dspy_p2o/toyworld/config.yaml's schema), e.g. the plain rollouts per templated group:
    python benchmarks/toyworld/run_seeds.py --arms p2o --set plain_per_group=0 --out runs/toyworld_ppg0

Finished seeds and arms are read back from their results.json, so an interrupted sweep resumes and
a later call with more arms runs only the new ones; `--report`
only reads them (e.g. the seeds two processes ran side by side, `--seeds 0-4` and `--seeds 5-9`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from dspy_p2o.config import ConfigError, P2OConfig, parse_overrides
from dspy_p2o.toyworld.experiment import ARM_TITLES, ARMS, run_experiment, toy_config

# The targets (points of held-out accuracy, no templates), checked per seed by `targets`.
HARD_GAIN = 30.0        # P^2O hard >= GRPO hard + 30 on every seed
EASY_LOSS_MEAN = 3.0    # P^2O easy >= GRPO easy - 3, mean over seeds
EASY_LOSS_WORST = 5.0   # ... and >= GRPO easy - 5 on the worst seed
NO_DISTILL_GAP = 30.0   # "well below": the no-distillation ablation's hard <= P^2O's - 30


def parse_seeds(specs: list[str]) -> list[int]:
    """`0-9`, `0 3 5-7`, `1,2`: seeds in the order given, each once."""
    seeds: list[int] = []
    for spec in (part for s in specs for part in s.split(",") if part):
        try:
            lo, _, hi = spec.partition("-")
            span = range(int(lo), int(hi) + 1) if hi else [int(lo)]
        except ValueError:
            raise SystemExit(f"--seeds: {spec!r} is not a seed or a range like 0-9") from None
        if not span:
            raise SystemExit(f"--seeds: the range {spec!r} is empty")
        seeds += [s for s in span if s not in seeds]
    return seeds


def _pct(value: float) -> str:
    return f"{value:.1f}"


def _column(values: list[float], seeds: list[int], *, worst_is_low: bool = True) -> tuple[str, str]:
    """'mean ± std (min-max)' and the worst seed with its value, of per-seed values in points."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    spread = f"{statistics.fmean(values):.1f} ± {std:.1f} ({min(values):.1f}-{max(values):.1f})"
    pick = min if worst_is_low else max
    worst = pick(range(len(values)), key=lambda i: values[i])
    return spread, f"seed {seeds[worst]}: {values[worst]:.1f}"


def accuracy_rows(docs: list[dict[str, Any]]) -> list[tuple[str, list[float], list[float]]]:
    """(title, hard %, easy %) per row: the base policy, then each arm every doc has."""
    rows = [("base policy", [100 * d["base"]["hard_acc"] for d in docs], [100 * d["base"]["easy_acc"] for d in docs])]
    for arm in (a for a in ARMS if all(a in d["arms"] for d in docs)):
        rows.append((ARM_TITLES[arm], [100 * d["arms"][arm]["hard_acc"] for d in docs],
                     [100 * d["arms"][arm]["easy_acc"] for d in docs]))
    return rows


def summarise(docs: list[dict[str, Any]]) -> str:
    """The accuracy table (per-seed cells, mean ± std (min-max), worst seed per column), hard-set sizes and
    the targets."""
    seeds = [d["seed"] for d in docs]
    lines = [f"Toy world, seeds {', '.join(map(str, seeds))}: held-out accuracy WITHOUT templates in % "
             "(cells: hard / easy; 39 + 39 questions per seed)", "",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | hard: mean ± std (min-max) | worst hard "
             "| easy: mean ± std (min-max) | worst easy |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for title, hard, easy in accuracy_rows(docs):
        cells = " | ".join(f"{_pct(h)} / {_pct(e)}" for h, e in zip(hard, easy))
        (hard_spread, hard_worst), (easy_spread, easy_worst) = _column(hard, seeds), _column(easy, seeds)
        lines.append(f"| {title} | {cells} | {hard_spread} | {hard_worst} | {easy_spread} | {easy_worst} |")
    lines += ["", "Hard set per epoch (train), mean over seeds; GEPA rollouts (mean); policy rollouts; wall time (mean):", ""]
    for arm in (a for a in ARMS if all(a in d["arms"] for d in docs)):
        rs = [d["arms"][arm] for d in docs]
        epochs = len(rs[0]["hard_per_epoch"])
        sizes = [round(statistics.fmean(r["hard_per_epoch"][e] for r in rs), 1) for e in range(epochs)]
        lines.append(f"- {ARM_TITLES[arm]}: {sizes}; GEPA {statistics.fmean(r['gepa_rollouts'] for r in rs):.0f}; "
                     f"policy {rs[0]['policy_rollouts']}; {statistics.fmean(r['seconds'] for r in rs):.0f} s")
    check = targets(docs)
    if check:
        lines += ["", check]
    return "\n".join(lines) + "\n"


def targets(docs: list[dict[str, Any]]) -> str:
    """The issue's targets per seed (needs the grpo and p2o arms; the ablation's column needs p2o_no_distill)."""
    if not all("grpo" in d["arms"] and "p2o" in d["arms"] for d in docs):
        return ""
    seeds = [d["seed"] for d in docs]
    ablation = all("p2o_no_distill" in d["arms"] for d in docs)
    hard_gain = [100 * (d["arms"]["p2o"]["hard_acc"] - d["arms"]["grpo"]["hard_acc"]) for d in docs]
    easy_diff = [100 * (d["arms"]["p2o"]["easy_acc"] - d["arms"]["grpo"]["easy_acc"]) for d in docs]
    gap = [100 * (d["arms"]["p2o"]["hard_acc"] - d["arms"]["p2o_no_distill"]["hard_acc"]) for d in docs] if ablation else []
    lines = [f"Targets (points): P^2O hard - GRPO hard >= {HARD_GAIN:.0f} on every seed; P^2O easy - GRPO easy "
             f">= -{EASY_LOSS_MEAN:.0f} on the mean and >= -{EASY_LOSS_WORST:.0f} on every seed"
             + (f"; P^2O hard - no-distillation hard >= {NO_DISTILL_GAP:.0f} on every seed" if ablation else ""), "",
             "| seed | P^2O - GRPO, hard | P^2O - GRPO, easy |" + (" P^2O - w/o distillation, hard |" if ablation else "")
             + " targets |", "|---|---:|---:|" + ("---:|" if ablation else "") + "---|"]
    for i, seed in enumerate(seeds):
        failed = [name for name, ok in (("hard", hard_gain[i] >= HARD_GAIN), ("easy", easy_diff[i] >= -EASY_LOSS_WORST),
                                        ("ablation", not ablation or gap[i] >= NO_DISTILL_GAP)) if not ok]
        lines.append(f"| {seed} | {hard_gain[i]:+.1f} | {easy_diff[i]:+.1f} |" + (f" {gap[i]:+.1f} |" if ablation else "")
                     + (" all hold |" if not failed else f" MISSED: {', '.join(failed)} |"))
    mean_easy = statistics.fmean(easy_diff)
    lines.append(f"| mean | {statistics.fmean(hard_gain):+.1f} | {mean_easy:+.1f} |"
                 + (f" {statistics.fmean(gap):+.1f} |" if ablation else "")
                 + (" holds |" if mean_easy >= -EASY_LOSS_MEAN else " MISSED: easy mean |"))
    lines.append(f"| worst | {min(hard_gain):+.1f} | {min(easy_diff):+.1f} |" + (f" {min(gap):+.1f} |" if ablation else "")
                 + " |")
    return "\n".join(lines)


def run_config(settings: list[str]) -> P2OConfig:
    """The toy world's config with `key=value` settings, parsed as `dspy-p2o train` parses its overrides."""
    try:
        return toy_config(parse_overrides(settings))
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", default=["0-2"], help="seeds and ranges: 0-9, 0 3 5-7, 1,2")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path("runs/toyworld_seeds"))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides (dspy_p2o/toyworld/config.yaml)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="base-policy cache (default: the user cache)")
    parser.add_argument("--report", action="store_true", help="only summarise the seeds already finished under --out")
    args = parser.parse_args()
    config = run_config(args.set)
    docs = []
    for seed in parse_seeds(args.seeds):
        done = args.out / f"seed{seed}" / "results.json"
        if done.exists() and all(a in json.loads(done.read_text())["arms"] for a in args.arms):
            docs.append(json.loads(done.read_text()))
        elif args.report:
            print(f"seed {seed}: not finished under {args.out}, left out")
        else:
            docs.append(run_experiment(seed, tuple(args.arms), out_dir=args.out, config=config, cache_dir=args.cache_dir,
                                       resume=True))
    if not docs:
        raise SystemExit(f"no finished seeds under {args.out}")
    text = summarise(docs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
