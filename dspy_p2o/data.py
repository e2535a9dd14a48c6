"""Load the paper's maths benchmarks and training sets as ``dspy.Example`` lists.

Every example has ``question`` (the only input), ``answer`` (the gold), a stable
``id`` (``"<source>/<row>"``, or a training row's own ``id``) and ``index`` (0-based row
in the source), so results can be joined across runs whatever the shuffling or
filtering.  Offline data comes from the ``shared/data`` folder (see
:func:`find_data_root`); a local JSONL/JSON/Parquet file or, when online, a Hugging
Face hub dataset also works.  A file that cannot be read as rows (not UTF-8, empty, a
line that is not a JSON object, duplicate ids) is a :class:`DataError` naming the file
and the line: one line on the command line.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import dspy

from dspy_p2o.config import ConfigError
from dspy_p2o.rewards.text import extract_boxed, normalize_gold

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "DATA_ENV_VAR",
    "DataError",
    "TRAINSETS",
    "find_data_root",
    "load_benchmark",
    "load_trainset",
    "validate_examples",
]

DATA_ENV_VAR = "DSPY_P2O_DATA"

BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")

# (question field, gold field) of the shipped files; "solution" means: the last
# \boxed{} of the worked solution is the gold (Minerva has no answer column).
_BENCHMARK_FIELDS = {
    "aime24": ("problem", "answer"),
    "aime25": ("problem", "answer"),
    "amc23": ("problem", "answer"),
    "math500": ("problem", "answer"),
    "minerva_math": ("problem", "solution"),
    "olympiadbench": ("question", "final_answer"),
}

#: Named training sets shipped in ``shared/data/train``.
TRAINSETS = {"math_train": "math_train.jsonl", "aime": "aime_1983_2023.jsonl"}

# Auto-detection order when the caller names no field.
_QUESTION_FIELDS = ("problem", "question", "prompt", "query", "input")
_ANSWER_FIELDS = ("answer", "final_answer", "gold", "target", "solution")
_DIFFICULTY_FIELDS = ("difficulty", "level")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ConfigError):
    """Data that cannot be used, named by file and line (or row)."""


# ---------------------------------------------------------------------------
# Locating the data
# ---------------------------------------------------------------------------


def _search_starts() -> list[Path]:
    """Folders to walk up from: the working directory and this package's folder."""
    return [Path.cwd(), Path(__file__).resolve().parent]


def _looks_like_data_root(path: Path) -> bool:
    return (path / "benchmarks").is_dir() or (path / "train").is_dir()


def find_data_root() -> Path:
    """The offline data folder.

    ``$DSPY_P2O_DATA`` if set; otherwise the first ``shared/data`` folder found by
    walking up from the working directory, then from the package's own folder (a
    checkout at ``<x>/main`` finds ``<x>/shared/data``).
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{DATA_ENV_VAR}={env!r} is not a directory")
        return root
    searched = []
    for start in _search_starts():
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if _looks_like_data_root(candidate):
                return candidate
        searched.append(str(start))
    raise FileNotFoundError(
        "could not find the dspy_p2o data folder (a 'shared/data' with 'benchmarks/' or 'train/') "
        f"above {' or '.join(searched)}; set {DATA_ENV_VAR}=/path/to/shared/data"
    )


# ---------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------


def _read_local(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json (a list of objects) or .parquet file; a file without rows is a DataError."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8(raw, f"{path}:{lineno}")
                if line.strip():
                    rows.append(_json_row(line, f"{path}:{lineno}"))
    elif suffix == ".json":
        text = _utf8(path.read_bytes(), str(path))
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        rows = [_check_row(row, f"{path}[{i}]") for i, row in enumerate(data)]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        rows = pq.read_table(path).to_pylist()
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(_LOCAL_SUFFIXES)}")
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r} at column {exc.start + 1}); "
                        "save the file as UTF-8") from None


def _json_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    return _check_row(row, where)


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    return row


def _read_hub(name: str, split: str) -> list[dict]:
    """Rows of a Hugging Face hub dataset (needs network or a warm hub cache)."""
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, missing split, ...
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if offline else ""
        raise RuntimeError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face hub{hint}: "
            f"{type(exc).__name__}: {exc}. Pass a local .jsonl/.json/.parquet file instead."
        ) from exc
    return [dict(row) for row in dataset]


def _read_source(source: str | os.PathLike, split: str) -> tuple[list[dict], str]:
    """Rows of a local file or hub dataset, and its human-readable name."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_local(path), str(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a .jsonl, .json or .parquet file")
    if path.suffix.lower() in _LOCAL_SUFFIXES:
        raise FileNotFoundError(f"data file not found: {path}")
    return _read_hub(str(source), split), str(source)


# ---------------------------------------------------------------------------
# Rows -> Examples
# ---------------------------------------------------------------------------


def _pick_field(columns: Sequence[str], given: str | None, candidates: Sequence[str], role: str, source: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"{source}: no {role} field {given!r}; its fields are {sorted(columns)}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"{source}: cannot tell which field is the {role} (looked for {', '.join(candidates)}); "
        f"its fields are {sorted(columns)}: pass {role}_field=..."
    )


def _question_text(value: Any) -> Any:
    """Plain question text; a chat-style prompt gives its last user message."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        user = [m for m in value if m.get("role", "user") == "user"] or value
        return user[-1]["content"]
    return value


def _gold_value(raw: Any, from_solution: bool) -> Any:
    """Gold as stored in ``answer``: strings/lists as is, numbers as canonical strings."""
    if from_solution:
        boxed = extract_boxed(raw) if isinstance(raw, str) else None
        # A box is already maths mode: a `$` inside is a typo (Minerva row 72 has "+$ $").
        return re.sub(r"(?<!\\)\$", "", boxed).strip() if boxed else boxed
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        if isinstance(raw, float) and not math.isfinite(raw):
            return None
        return normalize_gold(raw)[0]  # AMC's 27.0 -> "27"
    if isinstance(raw, str):
        return raw.strip()
    return raw


def _difficulty(value: Any) -> float | None:
    """MATH level as a number: 3, 3.0 and "Level 3" all give 3.0."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = re.search(r"-?\d+(?:\.\d+)?", value)
        return float(match.group(0)) if match else None
    return None


# The fields `_to_example` gives every example (or may): `keep_fields` cannot name them
_EXAMPLE_FIELDS = ("question", "answer", "id", "index", "raw_answer", "difficulty")


def _to_example(row: dict, *, stem: str, index: int, question_field: str, answer_field: str,
                own_id: bool = False, keep_fields: Sequence[str] = ()) -> dspy.Example:
    raw = row.get(answer_field)
    fields: dict[str, Any] = {
        "question": _question_text(row.get(question_field)),
        "answer": _gold_value(raw, from_solution=answer_field == "solution"),
        "id": _row_id(row) if own_id and _row_id(row) is not None else f"{stem}/{index}",
        "index": index,
    }
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        fields["raw_answer"] = raw
    for name in _DIFFICULTY_FIELDS:
        if name in row:
            fields["difficulty"] = _difficulty(row[name])
            break
    fields.update((name, row[name]) for name in keep_fields if not _is_empty(row.get(name)))  # labels
    return dspy.Example(**fields).with_inputs("question")


def _row_id(row: dict) -> str | None:
    """A row's own `id` as a string; None when it has none (absent, null or blank)."""
    value = row.get("id")
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        return None
    return str(value).strip()


def _check_unique_ids(examples: list[dspy.Example], source: str) -> None:
    first: dict[str, int] = {}
    for ex in examples:
        if ex["id"] in first:
            raise DataError(f"{source}: rows {first[ex['id']] + 1} and {ex['index'] + 1} have the same id "
                            f"{ex['id']!r}; ids must be unique (or leave them out to number the rows)")
        first[ex["id"]] = ex["index"]


def _convert(rows: list[dict], *, stem: str, source: str, question_field: str | None,
             answer_field: str | None, defaults: tuple[str, str] | None = None,
             own_ids: bool = False, keep_fields: Sequence[str] = ()) -> list[dspy.Example]:
    if not rows:
        raise DataError(f"{source}: no rows")
    columns = list(rows[0].keys())
    for name in keep_fields:
        if name in _EXAMPLE_FIELDS:
            raise DataError(f"{source}: keep_fields cannot name {name!r}, a field every example already has")
        if not any(name in row for row in rows):
            raise DataError(f"{source}: keep_fields names {name!r}, which no row has (columns: {', '.join(columns)})")
    if defaults is not None and question_field is None and answer_field is None:
        # Shipped field names; a hub copy of the benchmark may name them differently.
        if defaults[0] in columns and defaults[1] in columns:
            question_field, answer_field = defaults
    q_field = _pick_field(columns, question_field, _QUESTION_FIELDS, "question", source)
    a_field = _pick_field(columns, answer_field, _ANSWER_FIELDS, "answer", source)
    examples = [_to_example(row, stem=stem, index=i, question_field=q_field, answer_field=a_field, own_id=own_ids,
                            keep_fields=keep_fields) for i, row in enumerate(rows)]
    _check_unique_ids(examples, source)
    return examples


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


# ---------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------


def load_benchmark(name: str, path: str | os.PathLike | None = None, limit: int | None = None,
                   *, split: str = "test") -> list[dspy.Example]:
    """One of :data:`BENCHMARKS` as examples (``question`` -> ``answer``).

    ``path``: a local .jsonl/.json/.parquet file, or a hub dataset id loaded with
    ``datasets.load_dataset(path, split=split)``; default: the shipped copy.
    Gold: strings as they are; AMC's floats as canonical strings (``"27"``, the
    number kept in ``raw_answer``); OlympiadBench's ``final_answer`` list as is;
    Minerva's the last ``\\boxed{}`` of ``solution``.  Every row must have a
    question and a gold answer (ValueError naming the row otherwise).
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    _check_limit(limit)
    if path is None:
        rows, source = _read_local(find_data_root() / "benchmarks" / name / "test.jsonl"), name
    else:
        rows, source = _read_source(path, split)
    examples = _convert(rows, stem=name, source=source, question_field=None, answer_field=None,
                        defaults=_BENCHMARK_FIELDS[name])
    validate_examples(examples, ["question"])
    return examples if limit is None else examples[:limit]


def load_trainset(
    source: str | os.PathLike,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int | None = None,
    min_difficulty: float | None = None,
    max_difficulty: float | None = None,
    keep_fields: Sequence[str] = (),
    drop_invalid: bool = True,
) -> list[dspy.Example]:
    """Training problems as examples (``question`` -> ``answer``).

    ``source``: ``"math_train"`` or ``"aime"`` (the shipped files), a local
    .jsonl/.json/.parquet path, or a hub dataset id.  Fields are auto-detected
    (question: problem/question/prompt/...; answer: answer/final_answer/gold/
    target, else the last ``\\boxed{}`` of ``solution``) unless named.
    ``min/max_difficulty`` keep rows whose ``difficulty``/``level`` (MATH level
    1-5, ``"Level 3"`` works) lies in the range.  ``keep_fields``: row fields
    kept on each example under their own names, as labels (a worked solution
    named after the program's ``reasoning`` field is what DSPy's
    ``LabeledFewShot`` demos then show); a field no row has is a DataError.
    ``seed`` shuffles before
    ``limit``.  A row's own ``id`` is kept (as a string); a row without one gets
    ``"<stem>/<row>"``, whatever the filtering or shuffling; two rows with one id
    are a DataError.
    Rows without a question or gold are dropped with a warning (the shipped MATH
    file has four), or raise with ``drop_invalid=False``.
    """
    _check_limit(limit)
    source_str = os.fspath(source)
    if source_str in TRAINSETS:
        rows = _read_local(find_data_root() / "train" / TRAINSETS[source_str])
        stem, name = source_str, source_str
    else:
        rows, name = _read_source(source, split)
        is_local = Path(source_str).expanduser().is_file()
        stem = Path(source_str).stem if is_local else source_str.rstrip("/").split("/")[-1]
    examples = _convert(rows, stem=stem, source=name, question_field=question_field, answer_field=answer_field,
                        own_ids=True, keep_fields=keep_fields)
    examples = _drop_invalid(examples, name) if drop_invalid else examples
    validate_examples(examples, ["question"])
    examples = _filter_difficulty(examples, min_difficulty, max_difficulty, name)
    if seed is not None:
        random.Random(seed).shuffle(examples)
    return examples if limit is None else examples[:limit]


def _drop_invalid(examples: list[dspy.Example], source: str) -> list[dspy.Example]:
    kept, dropped = [], []
    for ex in examples:
        invalid = _is_empty(ex.get("question")) or _is_empty(ex.get("answer"))
        (dropped if invalid else kept).append(ex)
    if dropped:
        shown = ", ".join(ex["id"] for ex in dropped[:10]) + (" ..." if len(dropped) > 10 else "")
        logger.warning("%s: dropped %d rows without a question or gold answer: %s", source, len(dropped), shown)
    return kept


def _filter_difficulty(examples: list[dspy.Example], low: float | None, high: float | None,
                       source: str) -> list[dspy.Example]:
    if low is None and high is None:
        return examples
    if not any("difficulty" in ex for ex in examples):
        raise DataError(f"{source}: min/max_difficulty given but the data has no 'difficulty' or 'level' field")
    low = -math.inf if low is None else low
    high = math.inf if high is None else high
    kept = [ex for ex in examples if ex.get("difficulty") is not None and low <= ex["difficulty"] <= high]
    if not kept:
        raise DataError(f"{source}: no example has a difficulty in [{low}, {high}]")
    return kept


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (list, tuple)):
        return not value or all(_is_empty(v) for v in value)
    return False


def _describe(example: Any, position: int) -> str:
    ex_id = example.get("id") if hasattr(example, "get") else None
    return f"example {ex_id!r} (position {position})" if ex_id is not None else f"example at position {position}"


def validate_examples(examples: Iterable[Any], input_fields: Sequence[str] | str,
                      label_fields: Sequence[str] | str = ("answer",)) -> list[Any]:
    """Check that every example has non-empty input and label fields and a unique id.

    Raises ValueError naming the example (its ``id``, else its position) and the
    missing or empty field.  Returns the examples as a list.
    """
    fields = [input_fields] if isinstance(input_fields, str) else list(input_fields)
    fields += [label_fields] if isinstance(label_fields, str) else list(label_fields)
    examples = list(examples)
    seen: dict[Any, int] = {}
    for pos, example in enumerate(examples):
        if not hasattr(example, "get") or not hasattr(example, "__contains__"):
            raise TypeError(f"example at position {pos} is a {type(example).__name__}, not a dspy.Example")
        name = _describe(example, pos)
        for field in fields:
            if field not in example:
                raise ValueError(f"{name} has no field {field!r}")
            if _is_empty(example[field]):
                raise ValueError(f"{name} has an empty field {field!r}")
        ex_id = example.get("id")
        if ex_id is not None:
            if ex_id in seen:
                raise ValueError(f"{name} has the same id as the example at position {seen[ex_id]}")
            seen[ex_id] = pos
    return examples
