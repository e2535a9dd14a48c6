"""The run directory: every artefact of a P^2O run, and the state that lets it resume.

    config.yaml            resolved config (no secrets); rewritten when a resume changes a resumable key
    identity.json          what makes the directory this run (written when the run really starts)
    run.lock               flock held by the live run (its pid, host and start time)
    resumes.jsonl          one line per resume: where it resumed from (epoch from 1, phase, batch,
                           step, checkpoint, processes) and the accepted config changes
    state.json             where the loop is (epoch, phase, next batch) + the latest checkpoint
    metrics.jsonl          one JSON object per optimiser step / epoch / evaluation
    checkpoints/checkpoint-N/  model/ (the full weights; LoRA: the adapter) + state/ (AdamW, scheduler, RNG): checkpoints.py
    templates/epoch-N.json the prompt phase after epoch N: pool, score matrix, assignment (used in epoch N+1)
    rewards/epoch-N.jsonl  every question's rollout rewards of epoch N (what hard mining saw)
    hard/epoch-N.jsonl     ids and success rates of the hard questions of epoch N
    gepa/epoch-N/          GEPA's own log dir (lets an interrupted prompt phase resume)

Epochs are numbered from 1 everywhere a person looks (console, file names, metrics' `epoch`
fields, summary.md); only state.json counts from 0 internally.
    plots/*.png            training dynamics
    summary.md             what a person reads first
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from dspy_p2o import checkpoints as ckpt
from dspy_p2o.config import RESUMABLE, ConfigError, P2OConfig, identity_keys, resume_rule, sections
from dspy_p2o.jsonio import write_json

log = logging.getLogger(__name__)

class RunDirBusy(ConfigError):
    """Another live process holds the run directory."""


# Keys that older run directories recorded (config.MOVED): nested copies of top-level keys, and
# engine_kwargs (resumable, as the engine sections that replace it); dropped on comparison.
LEGACY_KEYS = ("trainer.temperature", "trainer.seed", "prompt.k", "prompt.seed", "engine_kwargs")


def fingerprint(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -------------------------------------------------------------- paths
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    # Per-epoch artefacts take the epoch's number as the console shows it, from 1 ("epoch 1/2").
    def templates_file(self, epoch: int) -> Path:
        return self.path / "templates" / f"{self._epoch_name(epoch)}.json"

    def rewards_file(self, epoch: int) -> Path:
        return self.path / "rewards" / f"{self._epoch_name(epoch)}.jsonl"

    def hard_file(self, epoch: int) -> Path:
        return self.path / "hard" / f"{self._epoch_name(epoch)}.jsonl"

    def gepa_dir(self, epoch: int) -> Path:
        return self.path / "gepa" / self._epoch_name(epoch)

    def _epoch_name(self, epoch: int) -> str:
        """`epoch-N` for epoch number N (1-based). A run directory written by an older version counted
        from 0 (it has an `epoch-0` artefact, which a newer run never writes): it keeps its own numbering,
        so a resume finds the prompt phase it interrupted (`gepa/epoch-N/`) and nothing is named twice."""
        if epoch < 1:
            raise ValueError(f"epochs are numbered from 1, got {epoch}")
        return f"epoch-{epoch - 1 if self.counts_epochs_from_zero() else epoch}"

    def counts_epochs_from_zero(self) -> bool:
        """Whether this directory names its per-epoch artefacts from epoch-0 (written by an older version)."""
        return any((self.path / part).exists() for part in
                   ("templates/epoch-0.json", "rewards/epoch-0.jsonl", "hard/epoch-0.jsonl", "gepa/epoch-0"))

    @property
    def lock_file(self) -> Path:
        return self.path / "run.lock"

    @property
    def identity_file(self) -> Path:
        return self.path / "identity.json"

    @property
    def resumes_file(self) -> Path:
        return self.path / "resumes.jsonl"

    # -------------------------------------------------------------- lifecycle
    def exists(self) -> bool:
        return self.state_file.exists()

    def lock(self) -> "RunLock":
        """Take the run directory for this process (see RunLock); the main process only."""
        self.path.mkdir(parents=True, exist_ok=True)
        return RunLock(self.lock_file).acquire()

    def check(self, config: P2OConfig, identity: dict[str, Any]) -> bool:
        """Refuse a run directory written by an incompatible run, writing nothing. True when resuming.

        Per key: a change in the identity (policy, trainset, ...) or in any config key not
        declared RESUMABLE (config.resume_rule) is refused with the keys named; a change of a
        resumable key is accepted, and `start` records it."""
        self._accepted: dict[str, tuple[Any, Any]] = {}
        if not self.identity_file.exists():
            return False
        previous = _upgrade(json.loads(self.identity_file.read_text()))
        changed = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
        resuming = self.exists()
        if resuming and self.config_file.exists():
            for key, (old, new) in config_changes(yaml.safe_load(self.config_file.read_text()) or {},
                                                  config.redacted()).items():
                target = self._accepted if resumable(key) else changed
                target[key] = (old, new)
        if changed:
            details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(f"run directory {str(self.path)!r} belongs to an incompatible run ({details}); "
                              "use a new run directory, or the original settings to resume")
        return resuming

    def start(self, config: P2OConfig, identity: dict[str, Any], resuming: bool) -> None:
        """The run really starts (model loaded, engine up): write the config and the identity of a
        new run; on resume, the accepted config changes go into config.yaml (and, with the resume
        point, into resumes.jsonl: `record_resume`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not resuming:
            self.config_file.write_text(config.to_yaml())
            write_json(self.identity_file, identity)
            return
        accepted = getattr(self, "_accepted", {})
        if accepted:
            log.warning("resuming %s with changed settings: %s", self.path,
                        "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in accepted.items()))
            self.config_file.write_text(config.to_yaml())

    def record_resume(self, point: dict[str, Any]) -> None:
        """One line of resumes.jsonl: when, from where (`point`: the loop's epoch, phase, batch, step and
        checkpoint) and with which accepted config changes a run resumed."""
        accepted = getattr(self, "_accepted", {})
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": point,
                  "changed": {k: list(v) for k, v in accepted.items()}}
        with self.resumes_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def resumable_checkpoint(self, recorded: str | None) -> str | None:
        """The checkpoint a resume loads: the one state.json records (looked up by name in this
        directory, so a moved run dir resumes) when complete, else the newest complete one."""
        if not recorded:
            return None
        candidate = self.checkpoints / Path(recorded).name
        if (candidate / ckpt.STATE_FILE).is_file():
            return str(candidate)
        newest = ckpt.latest_checkpoint(self.checkpoints)
        if newest is None:
            raise ConfigError(f"run directory {str(self.path)!r} cannot resume: its checkpoint {candidate.name} is "
                              "missing or incomplete and no complete checkpoint is left")
        log.warning("checkpoint %s is missing or incomplete; resuming from %s, the newest complete one",
                    candidate.name, newest.name)
        return str(newest)

    def load_state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        write_json(self.state_file, state)


def resumable(key: str) -> bool:
    """Whether a config key may change when a run resumes: declared RESUMABLE next to its field
    (or its section's) in config.py -- how long the run goes, where its servers are, how it
    reports and what it costs in memory, not what it optimises."""
    return resume_rule(key) == RESUMABLE


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs (sections are compared key by key;
    a dict-valued field such as reflection_kwargs or vllm.env counts as one key)."""
    flat_old, flat_new = _upgrade(_flatten(old)), _flatten(new)
    return {k: (flat_old.get(k), flat_new.get(k)) for k in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(k) != flat_new.get(k)}


def _upgrade(recorded: dict[str, Any]) -> dict[str, Any]:
    """A flat config or identity an older run directory recorded, in today's keys: without the
    nested copies of k, seed and temperature, and `prompt_phase` (a bool) as `method`."""
    out = {k: v for k, v in recorded.items() if k not in LEGACY_KEYS}
    if "prompt_phase" in out:
        out["method"] = "p2o" if out.pop("prompt_phase") else "grpo"
    return out


SECTIONS = tuple(sections())  # compared key by key on resume


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


class RunLock:
    """An exclusive lock on a run directory for a run's lifetime: `flock` on `run.lock`.

    The kernel drops a flock when its holder exits or is killed, so a dead run's lock is
    taken over by the next one without any clean-up; the file keeps the holder's pid, host
    and start time, which a refused second run names. A run that ends before it claimed its
    directory releases with `discard=True`: the file is removed (while still locked), and a
    process that had opened the removed file finds, once it gets the lock, that the path no
    longer names that file, and locks the path again -- so no two processes ever hold it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncate: it names the holder
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirBusy(f"run directory {str(self.path.parent)!r} is in use by pid {holder.get('pid', '?')} "
                                 f"on {holder.get('host', '?')} (started {holder.get('started', '?')}); "
                                 "wait for that run to end or use another run directory") from None
            if _names(self.path, fd):
                break
            os.close(fd)  # discarded by its holder after we opened it: lock the path again
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self, *, discard: bool = False) -> None:
        """Let go of the lock; `discard`: and remove its file (a run that never claimed the directory)."""
        if self._fd is not None:
            if discard and _names(self.path, self._fd):
                self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _names(path: Path, fd: int) -> bool:
    """Whether `path` is still the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def identity_of(config: P2OConfig, policy: str, train_ids: list[str]) -> dict[str, Any]:
    values = {key: getattr(config, key) for key in identity_keys()}
    values["policy"] = str(policy)
    values["trainset"] = fingerprint(train_ids)
    return values
