"""The toy-world experiment over several seeds: every arm through the P^2O loop, a per-seed table with
mean, spread and worst seed per column, and the toy world's targets checked on every seed.

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
from dspy_p2o.toyworld.expectations import (EASY_LOSS_MEAN, EASY_LOSS_WORST, EXPECTED_FILE, HARD_GAIN, NO_DISTILL_GAP,
                                            distribution, missed, seed_targets)
from dspy_p2o.toyworld.experiment import ARM_TITLES, ARMS, run_experiment, toy_config

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


def arm_columns(docs: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(title, arm) per column: the base policy (arm None), then each arm that any seed ran."""
    return [("base policy", None)] + [(ARM_TITLES[a], a) for a in ARMS if any(a in d["arms"] for d in docs)]


def _cell(doc: dict[str, Any], arm: str | None) -> tuple[float, float] | None:
    """(hard %, easy %) of one arm (None: the base policy) on one seed, or None where it did not run."""
    r = doc["base"] if arm is None else doc["arms"].get(arm)
    return None if r is None else (100 * r["hard_acc"], 100 * r["easy_acc"])


def summarise(docs: list[dict[str, Any]]) -> str:
    """One row per seed, one column per arm (cells: hard / easy %), then per column the mean, the
    standard deviation, min-max and the worst seed (over the seeds that ran the arm); the hard-set
    sizes; the targets."""
    columns = arm_columns(docs)
    lines = [f"Toy world, seeds {', '.join(str(d['seed']) for d in docs)}: held-out accuracy WITHOUT templates in % "
             "(cells: hard / easy; 39 + 39 questions per seed; same 6240 phase-1 rollouts per arm)", "",
             "| seed | " + " | ".join(title for title, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    cells = [[_cell(d, arm) for _, arm in columns] for d in docs]
    for d, row in zip(docs, cells):
        lines.append(f"| {d['seed']} | " + " | ".join("(not run)" if c is None else f"{c[0]:.1f} / {c[1]:.1f}"
                                                      for c in row) + " |")
    stats: dict[str, list[str]] = {"mean": [], "std": [], "min-max": [], "worst seed (hard; easy)": []}
    for j in range(len(columns)):
        ran = [(d["seed"], row[j]) for d, row in zip(docs, cells) if row[j] is not None]
        hard, easy = [c[0] for _, c in ran], [c[1] for _, c in ran]
        n = f" ({len(ran)} seed{'s' * (len(ran) != 1)})" if len(ran) < len(docs) else ""
        std = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        worst = lambda v: min(range(len(v)), key=lambda i: v[i])
        stats["mean"].append(f"{statistics.fmean(hard):.1f} / {statistics.fmean(easy):.1f}{n}")
        stats["std"].append(f"{std(hard):.1f} / {std(easy):.1f}")
        stats["min-max"].append(f"{min(hard):.1f}-{max(hard):.1f} / {min(easy):.1f}-{max(easy):.1f}")
        h, e = worst(hard), worst(easy)
        stats["worst seed (hard; easy)"].append(f"{ran[h][0]}: {hard[h]:.1f}; {ran[e][0]}: {easy[e]:.1f}")
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in stats.items()]
    lines += ["", "Hard set per epoch (train), mean over the seeds that ran the arm; GEPA rollouts (mean); wall time (mean):", ""]
    for title, arm in columns[1:]:
        rs = [d["arms"][arm] for d in docs if arm in d["arms"]]
        epochs = len(rs[0]["hard_per_epoch"])
        sizes = [round(statistics.fmean(r["hard_per_epoch"][e] for r in rs), 1) for e in range(epochs)]
        lines.append(f"- {title}: {sizes}; GEPA {statistics.fmean(r['gepa_rollouts'] for r in rs):.0f}; "
                     f"{statistics.fmean(r['seconds'] for r in rs):.0f} s")
    check = targets(docs)
    if check:
        lines += ["", check]
    return "\n".join(lines) + "\n"


def targets(docs: list[dict[str, Any]]) -> str:
    """The toy world's targets per seed (needs the grpo and p2o arms; the ablation's check, p2o_no_distill,
    on the seeds that ran it)."""
    docs = [d for d in docs if "grpo" in d["arms"] and "p2o" in d["arms"]]
    if not docs:
        return ""
    per_seed = [seed_targets(d) for d in docs]
    hard_gain = [t["hard_gain"] for t in per_seed]
    easy_diff = [t["easy_diff"] for t in per_seed]
    gap = [t["ablation_gap"] for t in per_seed]
    lines = [f"Targets (points): P^2O hard - GRPO hard >= {HARD_GAIN:.0f} on every seed; P^2O easy - GRPO easy "
             f">= -{EASY_LOSS_MEAN:.0f} on the mean and >= -{EASY_LOSS_WORST:.0f} on every seed; "
             f"P^2O hard - no-distillation hard >= {NO_DISTILL_GAP:.0f} on every seed that ran it", "",
             "| seed | P^2O - GRPO, hard | P^2O - GRPO, easy | P^2O - w/o distillation, hard | targets |",
             "|---|---:|---:|---:|---|"]
    for d, t in zip(docs, per_seed):
        failed, g = missed(t), t["ablation_gap"]
        verdict = f"MISSED: {', '.join(failed)}" if failed else "all hold" + (" (ablation not run)" if g is None else "")
        lines.append(f"| {d['seed']} | {t['hard_gain']:+.1f} | {t['easy_diff']:+.1f} | "
                     f"{'(not run)' if g is None else f'{g:+.1f}'} | {verdict} |")
    gaps = [g for g in gap if g is not None]
    mean_easy = statistics.fmean(easy_diff)
    lines.append(f"| mean | {statistics.fmean(hard_gain):+.1f} | {mean_easy:+.1f} | "
                 f"{f'{statistics.fmean(gaps):+.1f}' if gaps else '-'} | "
                 + ("easy mean holds" if mean_easy >= -EASY_LOSS_MEAN else "MISSED: easy mean") + " |")
    lines.append(f"| worst | {min(hard_gain):+.1f} | {min(easy_diff):+.1f} | {f'{min(gaps):+.1f}' if gaps else '-'} | |")
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
    parser.add_argument("--write-expected", metavar="MACHINE", default=None,
                        help="write the seeds' distribution to dspy_p2o/toyworld/expected.json (what `dspy-p2o demo` "
                             "compares its row with), naming this machine, e.g. '2-core x86_64 CPU'")
    args = parser.parse_args()
    config = run_config(args.set)
    docs = []
    for seed in parse_seeds(args.seeds):
        done = args.out / f"seed{seed}" / "results.json"
        if done.exists() and all(a in json.loads(done.read_text())["arms"] for a in args.arms):
            docs.append(json.loads(done.read_text()))
        elif args.report:
            if done.exists():  # some arms ran: the table shows them, "(not run)" for the others
                docs.append(json.loads(done.read_text()))
            else:
                print(f"seed {seed}: not run under {args.out}, left out")
        else:
            docs.append(run_experiment(seed, tuple(args.arms), out_dir=args.out, config=config, cache_dir=args.cache_dir,
                                       resume=True))
    if not docs:
        raise SystemExit(f"no finished seeds under {args.out}")
    text = summarise(docs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    print(text)
    if args.write_expected:
        write_expected(docs, args)


def write_expected(docs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import subprocess
    import sys
    import time

    import dspy_p2o.toyworld

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/toyworld/run_seeds.py " + " ".join(sys.argv[1:])
    doc = distribution(docs, machine=args.write_expected, commit=commit or "unknown", command=command,
                       date=time.strftime("%Y-%m-%d"))
    path = Path(dspy_p2o.toyworld.__file__).parent / EXPECTED_FILE
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
