"""`dspy-p2o score`: score existing generations on a benchmark, no model needed.

Each line of the predictions JSONL is `{"index": <0-based row>, "completion": "<text>"}`
or `{"id": "<loader id>", "completion": ...}`; several lines for one problem are several
samples of it. Extraction, checking and the accuracy are exactly those of `eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import dspy

from dspy_p2o.evaluation.prompting import DEFAULT_PROGRAM, PROMPT_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True, help="benchmark name, e.g. aime24")
    parser.add_argument("--predictions", required=True, help="JSONL with index (or id) and completion per line")
    parser.add_argument("--json", default=None, metavar="PATH", help='write {"benchmark", "n", "accuracy"} here')
    parser.add_argument("--data", default=None, help="benchmark file to read instead of the shipped one")
    parser.add_argument("--prompt", default="program", choices=PROMPT_MODES,
                        help="program: use the program's answer field when a completion parses, else the "
                             "last \\boxed{}; raw: the last \\boxed{} only")
    parser.add_argument("--program", default=DEFAULT_PROGRAM, help="DSPy program whose output format to parse")
    parser.add_argument("--samples-out", default=None, metavar="PATH",
                        help="also write every scored sample (as eval's <benchmark>.jsonl) here")
    parser.add_argument("--verify-timeout", type=float, default=None, help="seconds per math-verify check")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_predictions(path: str | Path, examples: Sequence[dspy.Example]) -> list[tuple[dspy.Example, str]]:
    """(example, completion) per line, with a clear error naming the offending line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    by_id = {str(ex.id): ex for ex in examples}
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("completion"), str):
            raise ValueError(f"{where} needs a string 'completion' field")
        if "index" in item:
            index = item["index"]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(examples):
                raise ValueError(f"{where}: index {index!r} is not a row of the benchmark (0..{len(examples) - 1})")
            example = examples[index]
        elif "id" in item:
            example = by_id.get(str(item["id"]))
            if example is None:
                raise ValueError(f"{where}: id {item['id']!r} is not a problem id of the benchmark")
        else:
            raise ValueError(f"{where} needs an 'index' (0-based row) or an 'id' field")
        pairs.append((example, item["completion"]))
    if not pairs:
        raise ValueError(f"{path} has no predictions")
    return pairs


def score_predictions(benchmark: str, pairs: Sequence[tuple[dspy.Example, str]], extractor, *,
                      verify_timeout: float | None = None, progress: bool = False) -> tuple[dict[str, Any], list[dict]]:
    """The summary (as in results.json) and every scored sample record."""
    from dspy_p2o.evaluation.report import summarize
    from dspy_p2o.evaluation.scoring import score_completions

    kwargs = {} if verify_timeout is None else {"timeout": verify_timeout}
    scored = score_completions([c for _, c in pairs], [ex.answer for ex, _ in pairs], extractor,
                               progress=progress, desc=f"{benchmark} scoring", **kwargs)
    seen: dict[int, int] = {}
    records = []
    for (ex, completion), v in zip(pairs, scored):
        sample = seen[int(ex.index)] = seen.get(int(ex.index), -1) + 1
        records.append({"id": str(ex.id), "index": int(ex.index), "sample": sample, "completion": completion,
                        "answer": v.answer, "answer_source": v.source, "correct": v.correct, "reason": v.reason,
                        "gold": ex.answer})
    return summarize(records), records


def make_extractor(prompt: str, program: str):
    from dspy_p2o.evaluation.prompting import load_program
    from dspy_p2o.evaluation.scoring import AnswerExtractor, adapter_parser, answer_field_of
    from dspy_p2o.renderer import single_predictor

    if prompt == "raw":
        return AnswerExtractor(None)
    signature = single_predictor(load_program(program)[0]).signature
    return AnswerExtractor(adapter_parser(signature), answer_field_of(signature))


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, PermissionError, KeyError) as exc:
        print(f"dspy-p2o score: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from dspy_p2o.data import load_benchmark
    from dspy_p2o.jsonio import check_writable, write_json

    for out in (args.json, args.samples_out):  # before the scoring, not after it
        if out:
            check_writable(out)
    examples = load_benchmark(args.benchmark, path=args.data)
    pairs = read_predictions(args.predictions, examples)
    summary, records = score_predictions(args.benchmark, pairs, make_extractor(args.prompt, args.program),
                                         verify_timeout=args.verify_timeout, progress=not args.quiet)
    if args.samples_out:
        with open(args.samples_out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.json:
        write_json(args.json, {"benchmark": args.benchmark, "n": summary["n_problems"],
                                      "accuracy": summary["accuracy"]})
    extra = "".join(f", {k} {100 * v:.1f}%" for k, v in summary.items() if k.startswith("pass@"))
    print(f"{args.benchmark}: accuracy {100 * summary['accuracy']:.2f}% over {summary['n_problems']} problems "
          f"({summary['n_samples']} samples){extra}")
    return 0
