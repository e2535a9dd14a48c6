"""What a toy-world run should show, and how one run compares with it.

Exact cells are machine-specific: a seed and config give the same table bit for bit on one machine
(one torch build, one thread count), but another CPU model or torch build samples other tokens and
lands elsewhere in the distribution. So the claims are (1) the TARGETS, differences between arms that
must hold on every seed, and (2) the DISTRIBUTION over ten seeds measured on a named machine
(`expected.json`, written by `benchmarks/toyworld/run_seeds.py --write-expected`), against which
`dspy-p2o demo` places its own row.
"""

from __future__ import annotations

import json
import statistics
from importlib import resources
from typing import Any

# The toy world's targets (points of held-out accuracy, no templates), checked per seed.
HARD_GAIN = 30.0        # P^2O hard >= GRPO hard + 30 on every seed
EASY_LOSS_MEAN = 3.0    # P^2O easy >= GRPO easy - 3, mean over seeds
EASY_LOSS_WORST = 5.0   # ... and >= GRPO easy - 5 on every seed
NO_DISTILL_GAP = 30.0   # the no-distillation ablation's hard <= P^2O's - 30 on every seed that ran it

EXPECTED_FILE = "expected.json"


def seed_targets(doc: dict[str, Any]) -> dict[str, float | None]:
    """One seed's differences (points): P^2O - GRPO hard and easy, P^2O - no-distillation hard (None when
    an arm did not run)."""
    arms = doc["arms"]
    acc = lambda arm, key: 100 * arms[arm][key] if arm in arms else None  # noqa: E731
    diff = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
    return {"hard_gain": diff(acc("p2o", "hard_acc"), acc("grpo", "hard_acc")),
            "easy_diff": diff(acc("p2o", "easy_acc"), acc("grpo", "easy_acc")),
            "ablation_gap": diff(acc("p2o", "hard_acc"), acc("p2o_no_distill", "hard_acc"))}


def missed(diffs: dict[str, float | None]) -> list[str]:
    """The per-seed targets one seed misses ("hard", "easy", "ablation")."""
    checks = (("hard", diffs["hard_gain"], HARD_GAIN), ("easy", diffs["easy_diff"], -EASY_LOSS_WORST),
              ("ablation", diffs["ablation_gap"], NO_DISTILL_GAP))
    return [name for name, value, bound in checks if value is not None and value < bound]


def distribution(docs: list[dict[str, Any]], *, machine: str, commit: str, command: str, date: str) -> dict[str, Any]:
    """Per arm and column (hard / easy %): mean, std, min, max over the seeds `docs` ran (expected.json)."""
    out: dict[str, Any] = {"machine": machine, "commit": commit, "command": command, "date": date,
                           "seeds": [d["seed"] for d in docs], "arms": {}}
    for arm in sorted({a for d in docs for a in d["arms"]} | {"base"}):
        rows = [d["base"] if arm == "base" else d["arms"][arm] for d in docs if arm == "base" or arm in d["arms"]]
        out["arms"][arm] = {key: _stats([100 * r[f"{key}_acc"] for r in rows]) for key in ("hard", "easy")}
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 1), "std": round(statistics.stdev(values), 1) if len(values) > 1
            else 0.0, "min": round(min(values), 1), "max": round(max(values), 1), "n": len(values)}


def load_expected() -> dict[str, Any] | None:
    """The packaged ten-seed distribution, None when the package has none."""
    path = resources.files("dspy_p2o.toyworld") / EXPECTED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def compare(doc: dict[str, Any], expected: dict[str, Any] | None) -> str:
    """How this run's row compares with the targets and, when known, the ten-seed distribution."""
    titles = {"base": "base policy", "grpo": "GRPO", "p2o": "P^2O", "p2o_no_distill": "P^2O w/o distillation",
              "p2o_same_template": "P^2O, same template"}
    lines = []
    if expected:
        lines.append(f"Compared with {len(expected['seeds'])} seeds on {expected['machine']} ({expected['date']}, "
                     f"commit {expected['commit']}; `{expected['command']}`): hard / easy % WITHOUT templates")
        for arm, run in [("base", doc.get("base"))] + list(doc["arms"].items()):
            dist = expected["arms"].get(arm)
            if run is None or dist is None:
                continue
            cells = []
            for key in ("hard", "easy"):
                d, value = dist[key], 100 * run[f"{key}_acc"]
                where = "within" if d["min"] - 0.05 <= value <= d["max"] + 0.05 else (
                    "below" if value < d["min"] else "above")
                cells.append(f"{key} {value:.1f} ({where} {d['min']:.1f}-{d['max']:.1f}, mean {d['mean']:.1f})")
            lines.append(f"  {titles.get(arm, arm)}: " + "; ".join(cells))
    diffs = seed_targets(doc)
    if diffs["hard_gain"] is not None:
        misses = missed(diffs)
        lines.append(f"Targets: P^2O - GRPO hard {diffs['hard_gain']:+.1f} (>= +{HARD_GAIN:.0f}), easy "
                     f"{diffs['easy_diff']:+.1f} (>= -{EASY_LOSS_WORST:.0f})"
                     + (f", P^2O - w/o distillation hard {diffs['ablation_gap']:+.1f} (>= +{NO_DISTILL_GAP:.0f})"
                        if diffs["ablation_gap"] is not None else "")
                     + (": all hold" if not misses else f": MISSED {', '.join(misses)}"))
    lines.append("Exact cells are bit-reproducible on one machine and torch build only; on another CPU a seed "
                 "lands elsewhere in the distribution (the targets are what must hold).")
    return "\n".join(lines)
