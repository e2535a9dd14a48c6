"""Summaries, results.json and the paper-shaped markdown table (Table 1 of P^2O)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from dspy_p2o.evaluation.protocol import mean
from dspy_p2o.jsonio import write_json
from dspy_p2o.passk import mean_pass_at_k

# Column order and titles of the paper's Table 1.
BENCHMARK_TITLES = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "math500": "MATH500",
    "minerva_math": "Minerva",
    "olympiadbench": "Olympiad",
}
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy = mean over problems of the fraction of correct samples (the paper's mean@k);
    pass@k (k = the fewest samples any problem has) when problems have several samples."""
    by_problem: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        by_problem.setdefault(r.get("index", r.get("id")), []).append(r)
    if not by_problem:
        return {"n_problems": 0, "n_samples": 0, "accuracy": 0.0}
    k = min(len(rs) for rs in by_problem.values())
    correct = [[float(bool(r["correct"])) for r in rs] for rs in by_problem.values()]
    summary: dict[str, Any] = {
        "n_problems": len(by_problem),
        "n_samples": len(records),
        "samples_per_problem": k,
        "accuracy": mean([mean(c) for c in correct]),
    }
    if k > 1:
        summary[f"pass@{k}"] = mean_pass_at_k(correct, k)
    # Diagnostics: how often an answer was found at all, and how often generation hit max_tokens.
    summary["answer_found"] = mean([float(r.get("answer") is not None) for r in records])
    if any("finish_reason" in r for r in records):
        summary["truncated"] = mean([float(r.get("finish_reason") == "length") for r in records])
        summary["mean_tokens"] = mean([float(r.get("num_tokens", 0)) for r in records])
    return summary


def average(benchmarks: dict[str, dict[str, Any]]) -> float:
    return mean([b["accuracy"] for b in benchmarks.values()])


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json, given as the file or as the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path} (pass a results.json or an eval --out directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise ValueError(f"{path} is not a dspy-p2o results file (no 'benchmarks' mapping)")
    return data


def _columns(results: Iterable[dict[str, Any]]) -> list[str]:
    present = {name for r in results for name in r["benchmarks"]}
    return [b for b in BENCHMARK_TITLES if b in present] + sorted(present - set(BENCHMARK_TITLES))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per model with an AVG column (percent), then pass@k for the sampled benchmarks.

    A row missing some column averages over the benchmarks it has and is marked with *.
    """
    columns = _columns(results)
    head = ["Model"] + [BENCHMARK_TITLES.get(c, c) for c in columns] + ["AVG"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    partial = False
    for r in results:
        cells = [_pct(r["benchmarks"][c]["accuracy"]) if c in r["benchmarks"] else "–" for c in columns]
        avg = _pct(average(r["benchmarks"]))
        if any(c not in r["benchmarks"] for c in columns):
            avg, partial = avg + "*", True
        lines.append("| " + " | ".join([str(r.get("label") or r.get("model", "?"))] + cells + [avg]) + " |")
    if partial:
        lines.append("\n\\* average over the benchmarks that row has.")
    passes = _pass_table(results, columns)
    return "\n".join(lines) + ("\n\n" + passes if passes else "") + "\n"


def _pass_key(summary: dict[str, Any]) -> str | None:
    return next((k for k in summary if k.startswith("pass@")), None)


def _pass_table(results: Sequence[dict[str, Any]], columns: list[str]) -> str:
    """pass@k of the sampled benchmarks; a cell whose k differs from its column's says so."""
    keys = {c: [_pass_key(r["benchmarks"][c]) for r in results if c in r["benchmarks"]] for c in columns}
    sampled = [c for c in columns if any(keys[c])]
    if not sampled:
        return ""
    head = {c: next(k for k in keys[c] if k) for c in sampled}
    lines = ["| Model | " + " | ".join(f"{BENCHMARK_TITLES.get(c, c)} {head[c]}" for c in sampled) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(sampled)) + "|"]
    for r in results:
        cells = []
        for c in sampled:
            summary = r["benchmarks"].get(c, {})
            key = _pass_key(summary)
            cells.append("–" if key is None else _pct(summary[key]) + ("" if key == head[c] else f" ({key})"))
        lines.append("| " + " | ".join([str(r.get("label") or r.get("model", "?"))] + cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, results: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / RESULTS_FILE, results)
    (out_dir / TABLE_FILE).write_text(results_table([results]), encoding="utf-8")
