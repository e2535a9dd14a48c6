"""Per-step metrics: one JSON object per line in the run directory, plus accelerate trackers.

The JSONL file is opened in append mode, so a resumed run continues the same file; a torn
last line (a crash or a full disk mid-write) is cut off first, and `truncate` drops the
records of steps a resume replays, so no step is logged twice.
Trackers (tensorboard, wandb, ...) go through `accelerate`'s tracking API and only when
asked for; only the main process writes. `check_trackers` refuses, before any work, a tracker
whose package is not installed (naming what to install) or that accelerate does not know.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from dspy_p2o.config import ConfigError, redact
from dspy_p2o.jsonio import repair_jsonl

# A tracker's importable modules (any one will do) and how to install one; other trackers need the
# module of their own name (wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio).
TRACKER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install 'dspy_p2o[tensorboard]'"),
                    "wandb": (("wandb",), "pip install 'dspy_p2o[wandb]'")}


def check_trackers(names: Iterable[str]) -> None:
    """A ConfigError naming what to install (or the trackers there are) for a tracker that could
    not start: called before a run claims its directory, not when the first step is logged."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"unknown tracker {name!r} in trackers; accelerate knows {sorted(LOGGER_TYPE_TO_CLASS)}")
        modules, install = TRACKER_PACKAGES.get(name, ((name,), f"pip install {name}"))
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f"tracker {name!r} needs the {modules[0]} package, which is not installed: {install} "
                              f"(or drop it from trackers)")


class MetricsLogger:
    """Log flat dicts of numbers per step to `path` (JSONL) and to accelerate trackers.

    Args:
        path: the JSONL file (its parent is created).
        accelerator: an `accelerate.Accelerator`: only its main process writes.
        trackers: accelerate tracker names, e.g. ("tensorboard",) or ("wandb",), built
            with accelerate's tracker classes; directory-based ones write under
            `<path's folder>/trackers`.
        project: the tracker project name; `config` its hyper-parameters (redacted here: secrets
            never reach a tracker).
    """

    def __init__(self, path: str | os.PathLike, *, accelerator: Any = None, trackers: Iterable[str] = (),
                 project: str = "dspy_p2o", config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.accelerator = accelerator
        self.trackers = tuple(trackers)
        self.is_main = accelerator is None or accelerator.is_main_process
        self._file = None
        self._trackers = []
        if self.is_main:
            # Trackers upload or store hparams in plain text: they only ever see the redacted config.
            safe_config = redact(dict(config or {}))
            self._trackers = [_start_tracker(name, project, self.path.parent / "trackers", safe_config)
                              for name in self.trackers]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_jsonl(self.path)
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Write one record {"step": step, "time": unix time, prefix + key: value, ...}."""
        values = {f"{prefix}{k}": _jsonable(v) for k, v in metrics.items()}
        if self._file is not None:
            record = {"step": int(step), "time": time.time(), **values}
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()  # a killed run keeps every finished step
        if self._trackers:
            numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for tracker in self._trackers:
                tracker.log(numeric, step=int(step))

    def offset(self) -> int:
        """Bytes of the JSONL file written so far (0 off the main process): a resume point."""
        return self._file.tell() if self._file is not None else 0

    def truncate(self, offset: int) -> None:
        """Drop every record written after `offset` (a resumed run replays those steps)."""
        if self._file is not None and offset < self._file.tell():
            self._file.truncate(offset)
            self._file.seek(offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file; a torn last line (a killed writer) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {n + 1} is not JSON: {line[:80]!r}") from None
    return records


def _start_tracker(name: str, project: str, logging_dir: Path, config: Mapping[str, Any]):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if name not in LOGGER_TYPE_TO_CLASS:
        raise ValueError(f"unknown tracker {name!r}; accelerate knows {sorted(LOGGER_TYPE_TO_CLASS)}")
    cls = LOGGER_TYPE_TO_CLASS[name]
    tracker = cls(project, str(logging_dir)) if cls.requires_logging_directory else cls(project)
    tracker.start()
    tracker.store_init_configuration(_flat_config(config))
    return tracker


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Trackers accept scalars only: stringify anything else."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}
