"""Where a toy-world arm's time goes: every arm's wall time, the prompt phases' share of it and
the P^2O / GRPO ratio, read from the out dirs of `run_seeds.py` (or `dspy-p2o demo --out`).

    python benchmarks/toyworld/arm_times.py runs/toyworld_after runs/toyworld_before

Per out dir and seed: each arm's seconds (`results.json`), the seconds its prompt phases took
(`templates/epoch-N.json`: cost.wall_time_s) and their metric calls, and P^2O's time over GRPO's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def arm_rows(out_dir: Path) -> list[dict]:
    rows = []
    for results in sorted(out_dir.glob("seed*/results.json")):
        doc = json.loads(results.read_text())
        for arm, r in doc["arms"].items():
            phases = [json.loads(p.read_text()) for p in sorted((results.parent / arm / "templates").glob("epoch-*.json"))]
            costs = [p.get("cost", {}) for p in phases if p.get("ran")]
            rows.append({"dir": out_dir.name, "seed": doc["seed"], "arm": arm, "seconds": r["seconds"],
                         "prompt_s": sum(float(c.get("wall_time_s", 0.0)) for c in costs),
                         "prompt_calls": r["gepa_rollouts"], "phases": len(costs),
                         "hard": 100 * r["hard_acc"], "easy": 100 * r["easy_acc"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | seed | arm | arm s | prompt phases s (share) | prompt metric calls | hard % | easy % | arm / GRPO |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for out_dir in args.out_dirs:
        rows = arm_rows(out_dir)
        grpo = {r["seed"]: r["seconds"] for r in rows if r["arm"] == "grpo"}
        for r in rows:
            ratio = f"{r['seconds'] / grpo[r['seed']]:.2f}x" if r["seed"] in grpo else "-"
            share = f"{r['prompt_s']:.1f} ({100 * r['prompt_s'] / max(r['seconds'], 1e-9):.0f}%)"
            print(f"| {r['dir']} | {r['seed']} | {r['arm']} | {r['seconds']:.1f} | {share} | {r['prompt_calls']} | "
                  f"{r['hard']:.1f} | {r['easy']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
