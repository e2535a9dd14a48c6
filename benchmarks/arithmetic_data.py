"""Write the laptop recipe's task: integer arithmetic a 135M model partly solves.

    python benchmarks/arithmetic_data.py            # -> benchmarks/data/arithmetic/{train,val}.jsonl
    python benchmarks/arithmetic_data.py --levels 0 5 --distinct --train-per-level 40 --out benchmarks/data/sums

Deterministic (seeded); the files are committed, so a run needs nothing from a hub. Each row is
`{"question": "What is 347 + 589?", "answer": "936", "level": L, "reasoning": "347 + 589 = 936."}` (the
worked solution, a label like GSM8K's: kept on the examples with `data.keep_fields: [reasoning]`, it is
what the few-shot prompt phase's labelled demos show), L = the kind of sum: 0 one-digit + one-digit,
1 two-digit + two-digit, 2 three-digit + three-digit, 3 two-digit x one-digit,
4 two-digit x two-digit, 5 two-digit + one-digit. The gold answer is checked by `dspy_p2o.rewards.math_metric` like any
maths answer. The mix is chosen so SmolLM2-135M-Instruct with the recipe's two demos solves
some questions of every level sometimes and most of level 4 never: a hard set exists from the start.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LEVELS = {
    0: ("+", (1, 9), (1, 9)),
    1: ("+", (10, 99), (10, 99)),
    2: ("+", (100, 999), (100, 999)),
    3: ("*", (11, 99), (2, 9)),
    4: ("*", (11, 99), (11, 99)),
    5: ("+", (10, 99), (1, 9)),
}
DEFAULT_LEVELS = (1, 2, 3, 4)  # benchmarks/data/arithmetic (the laptop recipe)


def worked_solution(a: int, op: str, b: int, stepwise: bool = False) -> str:
    """The reasoning of `a op b`: one line (`47 + 38 = 85.`), or stepwise, tens and units apart
    (`47 + 38 = 40 + 30 + 7 + 8 = 70 + 15 = 85.`, `47 * 6 = 40 * 6 + 7 * 6 = 240 + 42 = 282.`)."""
    value = a + b if op == "+" else a * b
    if not stepwise or (a < 10 and b < 10):
        return f"{a} {op} {b} = {value}."
    if op == "+":
        tens, units = a - a % 10 + b - b % 10, a % 10 + b % 10
        parts = " + ".join(str(x) for x in (a - a % 10, b - b % 10, a % 10, b % 10) if x)
        return f"{a} + {b} = {parts} = {tens} + {units} = {value}."
    if b < 10:
        return f"{a} * {b} = {a - a % 10} * {b} + {a % 10} * {b} = {(a - a % 10) * b} + {a % 10 * b} = {value}."
    return f"{a} * {b} = {a} * {b - b % 10} + {a} * {b % 10} = {a * (b - b % 10)} + {a * (b % 10)} = {value}."


def make_rows(n_per_level: int, seed: int, levels=DEFAULT_LEVELS, distinct: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for level in levels:
        op, (a_lo, a_hi), (b_lo, b_hi) = LEVELS[level]
        seen: set[tuple[int, int]] = set()
        n = min(n_per_level, (a_hi - a_lo + 1) * (b_hi - b_lo + 1))
        made = 0
        while made < (n if distinct else n_per_level):
            a, b = rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)
            if distinct and (a, b) in seen:
                continue
            seen.add((a, b))
            made += 1
            value = a + b if op == "+" else a * b
            rows.append({"question": f"What is {a} {op} {b}?", "answer": str(value), "level": level,
                         "reasoning": worked_solution(a, op, b)})
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "arithmetic")
    parser.add_argument("--train-per-level", type=int, default=64)
    parser.add_argument("--val-per-level", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=list(DEFAULT_LEVELS), choices=sorted(LEVELS))
    parser.add_argument("--distinct", action="store_true", help="no question twice within a level")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = make_rows(args.train_per_level, args.seed, args.levels, args.distinct)
    seen = {r["question"] for r in train}
    val = [r for r in make_rows(args.val_per_level * 2, args.seed + 1, args.levels, args.distinct)
           if r["question"] not in seen]
    val = [r for level in args.levels for r in [x for x in val if x["level"] == level][:args.val_per_level]]
    for name, rows in (("train", train), ("val", val)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
