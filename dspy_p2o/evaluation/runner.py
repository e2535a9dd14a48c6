"""Generate, score and record a benchmark through an Engine, resumably.

All samples of many problems go to the engine in one `generate` call (a chunk of about
`chunk_sequences` sequences: a whole benchmark for the paper's sizes), so a vLLM server
or the local engine's batcher sees a full queue. Every finished chunk is appended to the
benchmark's JSONL and fsynced before the next starts: a crash loses at most one chunk
(a torn last line is cut off when the file is opened again), and a rerun with the same
output dir skips every problem already complete there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import dspy
from dspy_p2o import display
from dspy_p2o.engines.base import Engine
from dspy_p2o.evaluation.prompting import Prompting
from dspy_p2o.evaluation.protocol import Protocol
from dspy_p2o.evaluation.scoring import score_completions
from dspy_p2o.jsonio import repair_jsonl, write_json, write_jsonl

DEFAULT_CHUNK_SEQUENCES = 2048


def samples_path(out_dir: str | os.PathLike, benchmark: str) -> Path:
    return Path(out_dir) / f"{benchmark}.jsonl"


def read_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a samples JSONL; a torn last line (a crash mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records, lines = [], path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break  # torn tail: that problem is simply generated again
            raise ValueError(f"{path}:{n} is not valid JSON; move the file away to regenerate it") from None
    return records


def complete_problems(records: Sequence[dict[str, Any]], samples: int) -> dict[int, list[dict[str, Any]]]:
    """index -> its `samples` records, for the problems that have all of them."""
    by_index: dict[int, dict[int, dict[str, Any]]] = {}
    for record in records:
        by_index.setdefault(int(record["index"]), {})[int(record["sample"])] = record
    return {index: [got[s] for s in range(samples)] for index, got in by_index.items()
            if all(s in got for s in range(samples))}


def _append(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_same_problems(path: Path, done: dict[int, list[dict[str, Any]]], examples: Sequence[dspy.Example]) -> None:
    ids = {int(ex.index): str(ex.id) for ex in examples}
    for index, records in done.items():
        if index in ids and str(records[0]["id"]) != ids[index]:
            raise ValueError(f"{path}: row {index} was recorded as problem {records[0]['id']!r} but the benchmark "
                             f"now has {ids[index]!r} there; the data changed, use a new --out")


def run_benchmark(
    engine: Engine,
    name: str,
    examples: Sequence[dspy.Example],
    prompting: Prompting,
    protocol: Protocol,
    out_dir: str | os.PathLike,
    *,
    chunk_sequences: int = DEFAULT_CHUNK_SEQUENCES,
    verify_timeout: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every sample record of `examples` (index, then sample order), generating only the missing problems."""
    path = samples_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(path)  # a torn last line (a crash mid-write): appending after it would glue two records
    existing = read_samples(path)
    done = complete_problems(existing, protocol.samples)
    _check_same_problems(path, done, examples)
    kept = [r for index in sorted(done) for r in done[index]]
    if len(kept) != len(existing):
        write_jsonl(path, kept)  # drop partial problems and torn lines before appending

    todo = [ex for ex in examples if int(ex.index) not in done]
    per_chunk = max(1, chunk_sequences // protocol.samples)
    chunks = [todo[i:i + per_chunk] for i in range(0, len(todo), per_chunk)]
    line = display.DecodeProgress(len(examples), done=len(examples) - len(todo), samples=len(todo) * protocol.samples,
                                  desc=f"{name} problems", enabled=progress)
    try:
        for chunk in chunks:
            with line.active():
                done.update(_generate_chunk(engine, name, chunk, prompting, protocol, path, verify_timeout, line))
            line.problems_done(len(chunk))
    finally:
        line.close()
    wanted = [int(ex.index) for ex in examples]
    return [r for index in wanted for r in done[index]]


def _generate_chunk(engine: Engine, name: str, chunk: Sequence[dspy.Example], prompting: Prompting,
                    protocol: Protocol, path: Path, verify_timeout: float | None,
                    line: display.DecodeProgress) -> dict[int, list[dict[str, Any]]]:
    prompts = [prompting.render(ex) for ex in chunk]
    inner = display.verbose()  # the engine's and the scoring's own bars: only with --verbose
    tokens, samples = line.tokens, line.samples
    outputs = engine.generate(prompts, n=protocol.samples, temperature=protocol.temperature, top_p=protocol.top_p,
                              top_k=protocol.top_k, max_tokens=protocol.max_tokens, seed=protocol.seed,
                              progress=inner)
    if len(outputs) != len(chunk) or any(len(o.completions) != protocol.samples for o in outputs):
        raise RuntimeError(f"engine {engine.name!r} returned the wrong number of completions for {name}")
    completions = [c for o in outputs for c in o.completions]
    line.settle(tokens + sum(len(c.token_ids) for c in completions), samples + len(completions))
    golds = [ex.answer for ex in chunk for _ in range(protocol.samples)]
    kwargs = {} if verify_timeout is None else {"timeout": verify_timeout}
    scored = score_completions([c.text for c in completions], golds, prompting.extractor, progress=inner,
                               desc=f"{name} scoring", **kwargs)
    records, by_index = [], {}
    for i, ex in enumerate(chunk):
        mine = []
        for s in range(protocol.samples):
            c, v = completions[i * protocol.samples + s], scored[i * protocol.samples + s]
            mine.append({"id": str(ex.id), "index": int(ex.index), "sample": s, "completion": c.text,
                         "answer": v.answer, "answer_source": v.source, "correct": v.correct, "reason": v.reason,
                         "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids), "gold": ex.answer})
        by_index[int(ex.index)] = mine
        records.extend(mine)
    _append(path, records)
    return by_index


CONFIG_FILE = "config.json"


def _check_or_record_config(out_dir: Path, model: str, prompting: Prompting, protocols: dict[str, Protocol]) -> None:
    """Refuse to mix samples of a different model, prompt or protocol into an existing run dir."""
    path = out_dir / CONFIG_FILE
    current = {"model": model, "prompting": prompting.description,
               "protocols": {name: p.to_dict() for name, p in protocols.items()}}
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        for key in ("model", "prompting"):
            if recorded.get(key) != current[key]:
                raise ValueError(f"{out_dir} holds a run with {key}={recorded.get(key)!r}, not {current[key]!r}; "
                                 "use a new --out (or the same settings to resume)")
        for name, protocol in current["protocols"].items():
            old = recorded.get("protocols", {}).get(name)
            if old is not None and old != protocol:
                raise ValueError(f"{out_dir} holds {name} samples made with {old}, not {protocol}; "
                                 "use a new --out (or the same settings to resume)")
        current["protocols"] = {**recorded.get("protocols", {}), **current["protocols"]}

    write_json(path, current)


def evaluate(
    engine: Engine,
    benchmarks: Sequence[str],
    prompting: Prompting,
    out_dir: str | os.PathLike,
    *,
    model: str,
    label: str | None = None,
    limit: int | None = None,
    protocol_overrides: dict[str, Any] | None = None,
    chunk_sequences: int = DEFAULT_CHUNK_SEQUENCES,
    verify_timeout: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every benchmark, write `<bench>.jsonl`, `results.json` and `results.md`; return the results."""
    from dspy_p2o.data import load_benchmark
    from dspy_p2o.evaluation.protocol import protocol_for
    from dspy_p2o.evaluation.report import average, load_results, summarize, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {name: load_benchmark(name) for name in benchmarks}
    # The protocol follows the benchmark's full size, so --limit keeps the paper's decoding.
    protocols = {name: protocol_for(len(rows), **(protocol_overrides or {})) for name, rows in data.items()}
    _check_or_record_config(out_dir, model, prompting, protocols)

    results_path = out_dir / "results.json"
    results = load_results(results_path) if results_path.exists() else {"benchmarks": {}}
    results.update({"model": model, "label": label or results.get("label") or model, "engine": engine.name,
                    "prompting": prompting.description})
    for name in benchmarks:
        rows = data[name] if limit is None else data[name][:limit]
        records = run_benchmark(engine, name, rows, prompting, protocols[name], out_dir,
                                chunk_sequences=chunk_sequences, verify_timeout=verify_timeout, progress=progress)
        results["benchmarks"][name] = {**summarize(records), "n_benchmark": len(data[name]),
                                       "protocol": protocols[name].to_dict()}
        results["average"] = average(results["benchmarks"])
        write_report(out_dir, results)  # after every benchmark: finished work is never lost
    return results
