"""A small persistent pool of math-verify worker processes, with a wall-clock limit per check.

Why worker processes: math-verify bounds its own work with ``signal.alarm``, which
raises ``ValueError`` outside the main thread (DSPy's ``Evaluate`` and ``GEPA`` are
threaded), and with those timeouts disabled an input such as ``9^{9^{9}}`` runs for
minutes inside C code that no Python-level mechanism can interrupt.  So every check
runs in a worker process (:mod:`dspy_p2o.rewards.worker`, math-verify's own timeouts
off); a worker that overruns the wall-clock limit is killed and replaced, and the
check scores False with reason ``"timeout"``.

The workers are plain subprocesses running the worker file, speaking JSON lines
over pipes, not ``multiprocessing`` children: they import only math-verify (~1 s to
start, not the ~3 s of DSPy), never re-import the user's ``__main__`` script (which
spawn/forkserver would do, re-running unguarded top-level code), and are safe to
start from any thread.

A check costs a few ms, almost all of it sympy parsing; starting a worker (importing
math-verify) ~1 s, on first use and after a worker is killed (benchmarks/RESULTS.md).

Settings: the pool size and the per-worker address-space cap are the run's
(``P2OConfig.rewards.verify_workers`` / ``.verify_memory_mb``), handed to the pool by
:func:`configure_verifier`; until then the pool uses their defaults.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import NamedTuple

from dspy_p2o.config import RewardsConfig
from dspy_p2o.rewards import worker as _worker_module

__all__ = ["Verdict", "check_in_worker", "configure_verifier", "shutdown_verifier", "warm_up_verifier"]

#: Seconds a fresh worker may take to import math-verify (not part of a check's limit).
WORKER_STARTUP_TIMEOUT = 120.0
#: The worker, run by path (``-P``: its folder is not put on sys.path).
WORKER_SCRIPT = _worker_module.__file__


class Verdict(NamedTuple):
    """Outcome of one check. ``reason`` is one of: correct, wrong, empty,
    unparseable, gold_unparseable, timeout, error."""

    correct: bool
    reason: str
    detail: str = ""


class _WorkerTimeout(Exception):
    pass


class _WorkerDied(Exception):
    pass


class _Worker:
    """One verifier subprocess, used by one thread at a time (the pool ensures it)."""

    def __init__(self, memory_mb: int) -> None:
        # The address-space cap: a pathological answer fails with MemoryError inside the worker
        # instead of waking the OOM killer (which might pick the trainer).
        self.proc = subprocess.Popen(
            [sys.executable, "-P", WORKER_SCRIPT, str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
            # Own session: a Ctrl-C in the terminal is for the parent, not the workers.
            start_new_session=True,
        )
        self._buf = b""
        self._poll = select.poll()  # poll, not select: fds above 1024 are fine
        self._poll.register(self.proc.stdout.fileno(), select.POLLIN)
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ensure_ready(self, timeout: float = WORKER_STARTUP_TIMEOUT) -> None:
        if self.ready:
            return
        try:
            line = self._readline(time.monotonic() + timeout)
        except _WorkerDied:
            line = None
        if line != b"ready":
            self.kill()
            raise RuntimeError(
                f"math-verify worker failed to start within {timeout:.0f}s "
                f"(exit code {self.proc.returncode}; is math-verify installed for {sys.executable}? "
                "If the memory cap is too small here, set rewards.verify_memory_mb=0)"
            )
        self.ready = True

    def poll_ready(self) -> bool:
        """Non-blocking: has the worker finished starting?"""
        if not self.ready:
            try:
                self.ready = self._readline(time.monotonic()) == b"ready"
            except _WorkerDied:
                return False
        return self.ready

    def check(self, answer: str, golds: list[str], timeout: float) -> Verdict:
        request = json.dumps({"a": answer, "g": golds, "t": timeout}) + "\n"
        try:
            self.proc.stdin.write(request.encode())
        except (BrokenPipeError, OSError) as exc:
            raise _WorkerDied(str(exc)) from exc
        line = self._readline(time.monotonic() + timeout)
        if line is None:
            raise _WorkerTimeout()
        reply = json.loads(line)
        return Verdict(reply["r"] == "correct", reply["r"], reply["d"])

    def _readline(self, deadline: float) -> bytes | None:
        """Next protocol line, or None when the deadline passes first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining_ms = max(0.0, (deadline - time.monotonic()) * 1000)
            if not self._poll.poll(remaining_ms):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _WorkerDied(f"worker exited (code {self.proc.wait()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._close_pipes()

    def close(self, grace: float = 1.0) -> None:
        """Ask politely (EOF on stdin ends the worker's loop), then kill."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class _WorkerPool:
    """A fixed number of workers; a thread borrows one for each check.

    Only the worker's compute time counts against a check's limit: waiting for a
    free worker, or for a fresh one to import math-verify, does not, so heavy load
    never turns a correct answer into a zero.
    """

    def __init__(self, size: int, memory_mb: int) -> None:
        self.pid = os.getpid()
        self.size, self.memory_mb = size, memory_mb
        self._lock = threading.Condition()
        self._workers: set[_Worker] = set()
        self._closed = False
        # Start them all now (Popen does not wait for the import): when a second
        # thread, or the replacement of a killed worker, is needed it is ready.
        self._idle: list[_Worker | None] = [self._spawn(None) for _ in range(size)]

    def check(self, answer: str, golds: list[str], timeout: float) -> Verdict:
        worker = self._acquire()
        try:
            # A worker may die for reasons of its own (OOM killer): retry once on a
            # fresh one before blaming the answer.
            for attempt in (1, 2):
                if worker is None or not worker.alive():
                    worker = self._spawn(replacing=worker)
                worker.ensure_ready()
                try:
                    return worker.check(answer, golds, timeout)
                except _WorkerTimeout:
                    worker = self._spawn(replacing=worker)  # the new one imports while we return
                    return Verdict(False, "timeout", f"verification exceeded {timeout:g}s and was killed")
                except _WorkerDied as exc:
                    worker = self._spawn(replacing=worker)
                    if attempt == 2:
                        return Verdict(False, "error", f"verifier worker died during the check: {exc}")
            raise AssertionError("unreachable")
        except BaseException:
            # Startup failure or an interrupt mid-request: the worker's protocol
            # state is unknown (a late reply would answer the next request), so drop it.
            if worker is not None:
                worker.kill()
                worker = None
            raise
        finally:
            self._release(worker)

    def warm_up(self) -> None:
        """Block until every idle worker has finished starting."""
        with self._lock:
            workers, self._idle = self._idle, []
        try:
            for i, worker in enumerate(workers):
                if worker is None or not worker.alive():
                    workers[i] = worker = self._spawn(replacing=worker)
                worker.ensure_ready()
        finally:
            for worker in workers:
                self._release(worker)

    def _acquire(self) -> _Worker | None:
        with self._lock:
            while not self._idle:
                self._lock.wait()
            # Prefer a worker that has finished importing over one still starting.
            for i, worker in enumerate(self._idle):
                if worker is not None and worker.poll_ready():
                    return self._idle.pop(i)
            return self._idle.pop()

    def _release(self, worker: _Worker | None) -> None:
        with self._lock:
            self._idle.append(worker)
            self._lock.notify()

    def _spawn(self, replacing: _Worker | None) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the math-verify worker pool has been shut down")
            if replacing is not None:
                replacing.kill()
                self._workers.discard(replacing)
            worker = _Worker(self.memory_mb)
            self._workers.add(worker)
            return worker

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.close()

    def abandon(self) -> None:
        """In a forked child: drop the parent's workers without signalling them."""
        for worker in list(self._workers):
            worker._close_pipes()
        self._workers = set()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False
# (workers, memory_mb) the next pool starts with: RewardsConfig's defaults until configure_verifier
_SETTINGS: tuple[int | None, int] = (RewardsConfig.verify_workers, RewardsConfig.verify_memory_mb)


def configure_verifier(*, workers: int | None = RewardsConfig.verify_workers,
                       memory_mb: int = RewardsConfig.verify_memory_mb) -> None:
    """Set the pool size (None: min(4, CPUs)) and each worker's address-space cap in MiB (0: none),
    as `P2OConfig.rewards` gives them. A running pool with other settings is stopped; the next
    check starts one with these."""
    global _SETTINGS
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"verify_workers must be an integer >= 1 or None, got {workers!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 0:
        raise ValueError(f"verify_memory_mb must be an integer >= 0 (0: no cap), got {memory_mb!r}")
    with _POOL_LOCK:
        changed, _SETTINGS = (workers, memory_mb) != _SETTINGS, (workers, memory_mb)
    if changed:
        shutdown_verifier()


def _pool_size() -> int:
    workers = _SETTINGS[0]
    return workers if workers is not None else max(1, min(4, os.cpu_count() or 1))


def _get_pool() -> _WorkerPool:
    global _POOL, _ATEXIT_REGISTERED
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        return pool
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid != os.getpid():
            _POOL.abandon()  # inherited through a fork the at-fork hook did not see
            _POOL = None
        if _POOL is None:
            _POOL = _WorkerPool(_pool_size(), _SETTINGS[1])
            if not _ATEXIT_REGISTERED:
                atexit.register(shutdown_verifier)
                _ATEXIT_REGISTERED = True
        return _POOL


def warm_up_verifier() -> None:
    """Start the worker pool now and wait until every worker can take a check.

    Optional: call it before a run so the first rewards do not wait ~1 s for
    workers to import math-verify.
    """
    _get_pool().warm_up()


def shutdown_verifier() -> None:
    """Stop the worker processes (runs at exit; the next check starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


def _after_fork_in_child() -> None:
    # Locks may have been held by other threads at fork time: start afresh.
    global _POOL, _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    if _POOL is not None:
        _POOL.abandon()
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_in_worker(answer_latex: str, golds: list[str], timeout: float) -> Verdict:
    """One check of ``answer_latex`` against ``golds`` in a worker, killed after ``timeout`` s of compute."""
    return _get_pool().check(answer_latex, golds, timeout)
