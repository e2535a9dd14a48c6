"""Atomic JSON / JSONL writes: a run killed mid-write never leaves a truncated file behind.

The one writer every artefact goes through (run state, checkpoints' trainer state, the
prompt phase's result, evaluation samples and results): write a temporary file beside
the target, fsync it, rename it over the target. Files appended to line by line
(`metrics.jsonl`, evaluation samples) are opened after `repair_jsonl`, which cuts a torn
last line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def _replace_with(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Indented, UTF-8 (people read templates), non-JSON values written as strings."""
    _replace_with(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    _replace_with(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def check_writable(path: str | os.PathLike, *, directory: bool = False) -> Path:
    """Fail BEFORE the work when `path` (a file, or with `directory` a folder) cannot be written:
    its folder is created and a probe file is written and removed there. Raises PermissionError
    with one line naming the path."""
    path = Path(path)
    folder = path if directory else path.parent
    try:
        if not directory and path.is_dir():
            raise IsADirectoryError(21, "it is a directory")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
        if not directory and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "the file is read-only")
    except OSError as exc:
        raise PermissionError(f"output path {str(path)!r} is not writable ({exc.strerror or exc})") from None
    return path


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a torn last line (a crash or a full disk mid-write) off a JSONL file, so the next
    record starts on a line of its own; returns the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:  # back to the last newline
            f.seek(max(0, end - 65536))
            chunk = f.read(end - max(0, end - 65536))
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = max(0, end - len(chunk)) + cut + 1
                break
            end = max(0, end - len(chunk))
        if end < size:
            f.truncate(end)
    return size - end
