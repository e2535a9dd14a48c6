"""Strict, thread-safe, never-hanging maths answer checking (math-verify).

The reward of P^2O is binary: the program's output must parse AND its answer must
match the gold answer according to math-verify.

Why worker processes: math-verify bounds its own work with ``signal.alarm``, which
raises ``ValueError`` outside the main thread (DSPy's ``Evaluate`` and ``GEPA`` are
threaded), and with those timeouts disabled an input such as ``9^{9^{9}}`` runs for
minutes inside C code that no Python-level mechanism can interrupt.  So every check
runs in a small persistent pool of worker processes (math-verify's own timeouts
off); a worker that overruns the wall-clock limit is killed and replaced, and the
check scores False with reason ``"timeout"``.

The workers are plain ``python -c`` subprocesses speaking JSON lines over pipes,
not ``multiprocessing`` children: they import only math-verify (~1 s to start,
not the ~3 s of DSPy), never re-import the user's ``__main__`` script (which
spawn/forkserver would do, re-running unguarded top-level code), and are safe to
start from any thread.

Measured on the 2-core dev machine (Nov 2026), one thread: a check of a MATH500
gold (rendered as the answer) against itself takes a median of 3.7 ms, almost all
of it sympy parsing; the process round trip adds ~0.1 ms (median of an empty
request); a repeated (answer, gold) pair is an LRU-cache hit of ~3 µs.  Starting a
worker (importing math-verify) takes ~1 s and happens on first use and after a
worker is killed.

Environment: ``DSPY_P2O_VERIFY_WORKERS`` (pool size, default min(4, CPUs)) and
``DSPY_P2O_VERIFY_MEMORY_MB`` (per-worker address-space cap, default 4096; 0 = none).
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import logging
import math
import numbers
import os
import re
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal
from typing import Any, Callable, NamedTuple

import dspy

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Verdict",
    "check_answer",
    "extract_boxed",
    "math_metric",
    "math_reward",
    "normalize_gold",
    "safe_metric",
    "MetricError",
    "shutdown_verifier",
    "verify_answer",
    "warm_up_verifier",
]

#: Wall-clock seconds one answer check may compute before it is killed.
DEFAULT_TIMEOUT = 5.0
#: Seconds a fresh worker may take to import math-verify (not part of the limit above).
WORKER_STARTUP_TIMEOUT = 120.0
#: Default address-space cap of a worker (MiB): a pathological answer fails with
#: MemoryError inside the worker instead of waking the OOM killer (which might
#: pick the trainer).  Override with DSPY_P2O_VERIFY_MEMORY_MB (0 = no cap).
WORKER_MEMORY_MB = 4096
_CACHE_SIZE = 65536
_CACHE_MAX_CHARS = 2000  # longer answers skip the cache (bounds its memory at ~130 MB)
# A bare answer (no \boxed{} or $...$) longer than this is prose, not a final
# answer: boxing it would make sympy multiply thousands of symbols for seconds.
_MAX_BARE_ANSWER_CHARS = 1000

# ---------------------------------------------------------------------------
# \boxed{} extraction and gold normalisation (pure Python, in the caller's process)
# ---------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str | None) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are balanced (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``) and escaped
    braces ``\\{ \\}`` are literal.  The brace-less form ``\\boxed 5`` gives ``5``.
    Returns None when there is no box, or when the last box is never closed (a
    truncated completion has not finished its answer; an earlier box is not used).
    """
    if not text:
        return None
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    return _box_content(text, starts[-1])


def _box_content(text: str, pos: int) -> str | None:
    """Argument of the box command whose name ends at ``pos``."""
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        # "\boxed 5": the argument is the next whitespace/`$`-delimited token.
        token = re.match(r"[^\s$]+", text[pos:])
        return token.group(0) if token else None
    depth, i = 0, pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i].strip()
        i += 1
    return None


def normalize_gold(gold: Any, *, item: str | None = None) -> list[str]:
    """Gold answer -> list of acceptable gold strings (any one matching counts).

    - a string is stripped;
    - a number is written without a spurious fraction (AMC's ``27.0`` -> ``"27"``,
      ``0.5`` -> ``"0.5"``);
    - a list/tuple (OlympiadBench's ``final_answer``) is ONE answer, not a list of
      alternatives.  In the shipped data every one of the 675 lists has exactly one
      element, and the 94 multi-valued answers (``is_multiple_answer``) are written
      inside that element (``"$69$,$84$"``, ``"$(6,3),(9,3)$"``); upstream
      (OlympiadBench, Qwen2.5-Math's evaluator) also reads element 0.  So a list of
      several elements is taken as the parts of a multi-part answer and joined with
      ", ": the model must give all parts, as a set, to be correct.

    The result currently always has one element; the list type leaves room for
    genuine alternatives.  Empty or missing gold raises ValueError naming ``item``.
    """
    where = f" for {item}" if item else ""
    if gold is None:
        raise ValueError(f"gold answer is missing (None){where}")
    if isinstance(gold, (list, tuple)):
        if not gold:
            raise ValueError(f"gold answer is an empty list{where}")
        parts = [_gold_text(part, where) for part in gold]
        return [parts[0] if len(parts) == 1 else ", ".join(parts)]
    return [_gold_text(gold, where)]


def _gold_text(value: Any, where: str) -> str:
    """One scalar gold value as a non-empty string."""
    if isinstance(value, bool):
        raise ValueError(f"gold answer is a bool ({value!r}){where}: expected a string or number")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            raise ValueError(f"gold answer is not finite ({value!r}){where}")
        if x.is_integer():
            return str(int(x))
        # Decimal(repr) avoids '1e-07', which LaTeX parsers read as 1*e - 7.
        return format(Decimal(repr(x)), "f")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"gold answer is an empty string{where}")
        return value.strip()
    raise ValueError(
        f"gold answer has unsupported type {type(value).__name__}{where}: expected a string, number or list"
    )


# An escaped dollar (MATH's currency golds: ``\\$18.90``) is text, not a delimiter.
_MATH_DELIMITER_RE = re.compile(r"(?<!\\)\$|\\boxed|\\fbox|\\\(|\\\[")
_E_NOTATION_RE = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d+)")


def _as_latex(text: str) -> str:
    """Make a bare answer (``\\frac{1}{2}``, ``x^2+1``) parseable by math-verify.

    math-verify only extracts LaTeX inside math delimiters or a box (a bare
    ``x^2+1`` parses to nothing), so text without delimiters is boxed.  It also
    reads ``4.5e33`` (Minerva's golds) as 4.5*E*33 with Euler's e, so a lone
    e-notation number is rewritten as ``4.5\\times10^{33}``.
    """
    if _MATH_DELIMITER_RE.search(text):
        return text
    sci = _E_NOTATION_RE.fullmatch(text)
    if sci:
        text = f"{sci.group(1)}\\times10^{{{int(sci.group(2))}}}"
    return "\\boxed{" + text + "}"


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------

# Runs as `python -P -c _WORKER_SOURCE <memory_mb>`. Protocol: one JSON object per
# line; the worker writes "ready" once imported, then answers each request
# {"a": answer, "g": [gold, ...], "t": limit_s} with {"r": reason, "d": detail}.
_WORKER_SOURCE = r"""
import json, logging, os, signal, sys, warnings

def _main():
    # The protocol owns the real stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    mem_mb = int(sys.argv[1])
    if mem_mb > 0:
        try:
            import resource
            limit = mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    from math_verify import parse, verify
    # Default SIGALRM action terminates the process even inside C code: an orphaned
    # worker (parent gone) stuck on a huge power still dies shortly after its limit.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    def check(answer, golds):
        pred = parse(answer, parsing_timeout=None)
        if not pred:
            return "unparseable", "math-verify found no expression in the answer"
        parsed_gold = False
        for gold in golds:
            target = parse(gold, parsing_timeout=None)
            if not target:
                continue
            parsed_gold = True
            if verify(target, pred, timeout_seconds=None):
                return "correct", ""
        if not parsed_gold:
            return "gold_unparseable", "math-verify could not parse the gold answer"
        return "wrong", ""

    proto.write("ready\n")
    for line in sys.stdin:
        req = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, float(req["t"]) + 5.0)
        try:
            reason, detail = check(req["a"], req["g"])
        except BaseException as exc:  # MemoryError, RecursionError, ...
            reason, detail = "error", type(exc).__name__ + ": " + str(exc)[:200]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        proto.write(json.dumps({"r": reason, "d": detail}) + "\n")

_main()
"""


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

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _WORKER_SOURCE,
             str(_env_int("DSPY_P2O_VERIFY_MEMORY_MB", WORKER_MEMORY_MB, minimum=0))],
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
                "If the memory cap is too small here, set DSPY_P2O_VERIFY_MEMORY_MB=0)"
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

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
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
            worker = _Worker()
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


def _env_int(name: str, default: int, minimum: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if not value.strip().isdigit() or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pool_size() -> int:
    return _env_int("DSPY_P2O_VERIFY_WORKERS", max(1, min(4, os.cpu_count() or 1)), minimum=1)


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
            _POOL = _WorkerPool(_pool_size())
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


# ---------------------------------------------------------------------------
# Public checking API
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _check_cached(answer_latex: str, golds: tuple[str, ...], timeout: float) -> Verdict:
    # Timeouts are cached too: the same pathological answer would time out again.
    return _get_pool().check(answer_latex, list(golds), timeout)


def check_answer(answer: str | None, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """Check ``answer`` against ``gold`` and say why it failed.

    ``answer`` is the final answer text (``"27"``, ``"\\frac{1}{2}"``, ``"$x^2+1$"``,
    ``"\\boxed{5}"``); ``gold`` is anything :func:`normalize_gold` accepts.
    Thread-safe; ends within ``timeout`` seconds of verifier compute time.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    golds = tuple(_as_latex(g) for g in normalize_gold(gold))
    if answer is None or not str(answer).strip():
        return Verdict(False, "empty", "the answer is empty")
    text = str(answer).strip()
    if len(text) > _MAX_BARE_ANSWER_CHARS and not _MATH_DELIMITER_RE.search(text):
        return Verdict(False, "unparseable", f"{len(text)} characters of text without \\boxed{{}} or $...$")
    answer_latex = _as_latex(text)
    if len(answer_latex) > _CACHE_MAX_CHARS:
        return _get_pool().check(answer_latex, list(golds), float(timeout))
    return _check_cached(answer_latex, golds, float(timeout))


def verify_answer(answer: str, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True iff math-verify finds ``answer`` equal to ``gold`` within ``timeout`` s."""
    return check_answer(answer, gold, timeout).correct


def _final_answer(answer: str | None) -> str | None:
    """The answer to verify: the last box's content if the text has a box."""
    if answer is None:
        return None
    text = str(answer)
    if _BOX_RE.search(text):
        return extract_boxed(text)  # None for an unclosed box: no finished answer
    return text


def math_reward(answer: str | None, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Strict binary reward: 1.0 iff ``answer`` (or its last ``\\boxed{}``) verifies."""
    final = _final_answer(answer)
    if final is None or not final.strip():
        return 0.0
    return 1.0 if verify_answer(final, gold, timeout) else 0.0


# ---------------------------------------------------------------------------
# DSPy / GEPA metrics
# ---------------------------------------------------------------------------


def _example_name(example: Any) -> str:
    ex_id = _field(example, "id")
    return f"example {ex_id}" if ex_id is not None else "example"


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` for Examples/Predictions/dicts; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return obj.get(name) if hasattr(obj, "get") else getattr(obj, name, None)
    except Exception:
        return getattr(obj, name, None)


def _has_field(obj: Any, name: str) -> bool:
    if isinstance(obj, dict) or hasattr(obj, "keys"):
        try:
            return name in obj.keys()
        except Exception:
            pass
    return hasattr(obj, name)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def math_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction:
    """DSPy/GEPA metric: strict binary score plus feedback for reflection.

    ``gold`` is a ``dspy.Example`` with ``answer``; ``pred`` a ``dspy.Prediction``
    with ``answer`` (None, or without ``answer``, when the output failed to parse).
    The feedback gives the gold answer, what the model answered and why it failed.
    """
    gold_answer = _field(gold, "answer")
    gold_text = normalize_gold(gold_answer, item=_example_name(gold))[0]

    # None, or DSPy's FailedPrediction (raw completion_text only): the adapter could not parse.
    if pred is None or (_has_field(pred, "completion_text") and not _has_field(pred, "answer")):
        return _scored(0.0, "Incorrect: the program's output could not be parsed into its output fields, "
                            f"so there is no answer to check. The correct answer is {gold_text}.")
    if not _has_field(pred, "answer"):
        return _scored(0.0, "Incorrect: the program's output has no `answer` field. "
                            f"The correct answer is {gold_text}.")
    answer = _field(pred, "answer")
    final = _final_answer(None if answer is None else str(answer))
    if final is None or not final.strip():
        return _scored(0.0, f"Incorrect: the answer field is empty or has an unclosed \\boxed{{. "
                            f"The correct answer is {gold_text}.")
    verdict = check_answer(final, gold_answer, timeout=DEFAULT_TIMEOUT)  # read at call time
    return _scored(1.0 if verdict.correct else 0.0, _feedback(verdict, _shorten(final.strip()), gold_text))


def _feedback(verdict: Verdict, answer: str, gold_text: str) -> str:
    if verdict.correct:
        return f"Correct: the answer {answer} matches the correct answer {gold_text}."
    if verdict.reason == "wrong":
        return f"Incorrect: the model answered {answer}, but the correct answer is {gold_text}."
    if verdict.reason == "unparseable":
        return (f"Incorrect: the answer {answer!r} is not a number or LaTeX expression that math-verify "
                f"can read; the answer field must hold only the final answer. The correct answer is {gold_text}.")
    if verdict.reason == "timeout":
        return (f"Incorrect: verifying the answer {answer} timed out ({verdict.detail}); "
                f"the expression is too large to evaluate. The correct answer is {gold_text}.")
    return (f"Incorrect: the answer {answer} could not be verified ({verdict.reason}: {verdict.detail}). "
            f"The correct answer is {gold_text}.")


class MetricError(ValueError):
    """A metric unusable as a reward: a score outside [0, 1], or every call of a batch failing."""


def _scored(score: float, feedback: str, error: str | None = None) -> dspy.Prediction:
    """A normalised metric result; `metric_error` is set when the metric raised (scored 0)."""
    if error is None:
        return dspy.Prediction(score=float(score), feedback=feedback)
    return dspy.Prediction(score=float(score), feedback=feedback, metric_error=error)


def _call_adapter(metric: Callable) -> Callable:
    """A 5-argument caller for ``metric``, passing only what it accepts.

    Classic DSPy metrics take (gold, pred, trace=None); passing five arguments to
    them would raise TypeError, which ``safe_metric`` would silently score 0.
    """
    try:
        params = list(inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):
        return metric
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return metric
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    n = max(2, min(5, len(positional)))
    return lambda *args: metric(*args[:n])


def _metric_name(metric: Callable) -> str:
    return getattr(metric, "__qualname__", None) or getattr(metric, "__name__", None) or repr(metric)


def _as_prediction(value: Any, name: str) -> dspy.Prediction:
    """Normalise a metric's return value to Prediction(score=float, feedback=str)."""
    if isinstance(value, bool):
        return _scored(float(value), f"Score: {float(value):g}.")
    if isinstance(value, numbers.Real):
        return _scored(_finite(value, name), f"Score: {float(value):g}.")
    if _has_field(value, "score"):
        raw = _field(value, "score")
        if not isinstance(raw, numbers.Real):  # bool is a Real: True -> 1.0
            raise TypeError(f"metric {name} returned a score of type {type(raw).__name__}; expected a number")
        score = _finite(raw, name)
        feedback = _field(value, "feedback")
        return _scored(score, str(feedback) if feedback is not None else f"Score: {score:g}.")
    raise TypeError(
        f"metric {name} returned {type(value).__name__}; expected a number, a bool, or an object "
        "with a `score` (e.g. dspy.Prediction(score=..., feedback=...))"
    )


def _finite(value: numbers.Real, name: str) -> float:
    """The score as a float in [0, 1]: rewards, tau and GEPA's perfect-score stopper assume that range."""
    score = float(value)
    if not math.isfinite(score):
        raise TypeError(f"metric {name} returned a non-finite score {score!r}")
    if not 0.0 <= score <= 1.0:
        raise MetricError(f"metric {name} returned the score {score:g}; scores must be in [0, 1] "
                          "(rescale it, e.g. divide by the maximum)")
    return score


def safe_metric(metric: Callable) -> Callable:
    """Wrap ``metric`` so it never kills a run and always returns a Prediction.

    An exception inside the metric becomes ``Prediction(score=0.0, feedback="metric
    raised <ExcType>: <msg>", metric_error="<ExcType>: <msg>")`` (callers count those);
    float/bool/Prediction returns are normalised to ``Prediction(score=float, feedback=str)``;
    a return value with no usable score raises TypeError naming the metric (a programming
    error, not a bad answer), and a score outside [0, 1] raises MetricError.
    The wrapper has the 5-argument GEPA signature and accepts 2/3/5-arg metrics.
    """
    if getattr(metric, "_dspy_p2o_safe", False):
        return metric
    if not callable(metric):
        raise TypeError(f"metric must be callable, got {type(metric).__name__}")
    name = _metric_name(metric)
    call = _call_adapter(metric)

    def wrapped(gold, pred, trace=None, pred_name=None, pred_trace=None):
        try:
            value = call(gold, pred, trace, pred_name, pred_trace)
        except Exception as exc:
            logger.warning("metric %s raised %s: %s", name, type(exc).__name__, exc)
            return _scored(0.0, f"metric raised {type(exc).__name__}: {exc}", error=f"{type(exc).__name__}: {exc}")
        return _as_prediction(value, name)

    wrapped.__name__ = getattr(metric, "__name__", "metric")
    wrapped.__qualname__ = f"safe_metric({name})"
    wrapped.__doc__ = getattr(metric, "__doc__", None)
    wrapped._dspy_p2o_safe = True  # type: ignore[attr-defined]
    return wrapped
