"""The two-step toy world (a compound program: `name` then `apply`) over several seeds: P^2O vs GRPO.

    python benchmarks/toyworld/run_two_step.py --seeds 0 1 2 --cache-dir runs/two_step_cache
    # the loop's settings are the one-step world's (dspy_p2o/toyworld/config.yaml); override with --set key=value

Writes benchmarks/toyworld/results/two_step-seedN.json (or under --out) per seed and prints a table
of held-out accuracy WITHOUT templates (greedy, the whole program). Finished seeds are read back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dspy_p2o.config import ConfigError, parse_overrides
from dspy_p2o.toyworld.experiment import ARM_TITLES, toy_config
from dspy_p2o.toyworld.two_step import run_two_step

RESULTS = Path(__file__).resolve().parent / "results"


def _cell(hard: float, easy: float) -> str:
    return f"{100 * hard:.1f} / {100 * easy:.1f}"


def _mean_range(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def summarise(docs: list[dict], arms: list[str]) -> str:
    seeds = [d["seed"] for d in docs]
    lines = ["Two-step toy world (name -> apply): held-out hard / easy accuracy in %, WITHOUT templates "
             "(one greedy execution of the whole program per question)", "",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | hard: mean (min-max) | easy: mean (min-max) |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    rows = [("base policy", [d["base"] for d in docs])]
    rows += [(ARM_TITLES.get(a, a), [d["arms"][a] for d in docs]) for a in arms]
    for title, rs in rows:
        lines.append(f"| {title} | " + " | ".join(_cell(r["hard_acc"], r["easy_acc"]) for r in rs)
                     + f" | {_mean_range([r['hard_acc'] for r in rs])} | {_mean_range([r['easy_acc'] for r in rs])} |")
    lines += ["", "Base policy, hard with the oracle instruction in step 1: "
              + ", ".join(f"seed {d['seed']} {100 * d['base']['hard_acc_oracle']:.1f}" for d in docs), ""]
    for d in docs:
        parts = [f"{ARM_TITLES.get(a, a)} hard set {d['arms'][a]['hard_per_epoch']}, GEPA rollouts "
                 f"{d['arms'][a]['gepa_rollouts']}, {d['arms'][a]['seconds']:.0f} s" for a in arms]
        lines.append(f"- seed {d['seed']} (base policy ready in {d['policy_seconds']:.0f} s, pretrained or cached): "
                     + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["grpo", "p2o"], choices=list(ARM_TITLES))
    parser.add_argument("--out", type=Path, default=RESULTS, help="where two_step-seedN.json and the table go")
    parser.add_argument("--runs", type=Path, default=Path("runs/toyworld_two_step"), help="the loop's run dirs")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="config overrides (dspy_p2o/toyworld/config.yaml)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="base-policy cache (default: the user cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    try:
        config = toy_config(parse_overrides(args.set))  # parsed as `dspy-p2o train` parses its overrides
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(config.redacted()))  # as a results file holds them
    docs = []
    for seed in args.seeds:
        path = args.out / f"two_step-seed{seed}.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        if all(a in done.get("arms", {}) for a in args.arms) and done.get("config") == settings:
            docs.append(done)  # finished under the same settings: reused (another config runs again)
            continue
        doc = run_two_step(seed, args.arms, out_dir=args.runs, config=config, cache_dir=args.cache_dir,
                           progress=not args.quiet)
        doc["command"] = "python benchmarks/toyworld/run_two_step.py " + " ".join(sys.argv[1:])
        path.write_text(json.dumps(doc, indent=2))
        docs.append(doc)
    text = summarise(docs, args.arms)
    (args.out / "two_step-summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
