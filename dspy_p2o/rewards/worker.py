"""The math-verify worker process: reads check requests on stdin, answers on stdout.

Run by :mod:`dspy_p2o.rewards.pool` as ``python -P <this file> <memory_mb>``, by
path rather than ``-m``: ``-m dspy_p2o.rewards.worker`` would first import the
``dspy_p2o`` and ``dspy_p2o.rewards`` packages (and with them DSPy, ~3 s), while this
file imports only the standard library and math-verify (~1 s), so a killed worker is
replaced quickly.  Keep it that way: no imports from ``dspy_p2o`` here.

Protocol: one JSON object per line.  The worker writes ``ready`` once math-verify is
imported, then answers each request ``{"a": answer, "g": [gold, ...], "t": limit_s}``
with ``{"r": reason, "d": detail}``, reason one of correct, wrong, unparseable,
gold_unparseable, error.  math-verify's own ``signal.alarm`` timeouts are off (the
pool's wall-clock limit bounds a check); the worker ends at EOF on stdin.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings

#: Seconds past a request's limit after which the worker's own SIGALRM ends it: the
#: pool kills an overrunning worker first, so this only ends an orphaned one.
ORPHAN_GRACE_S = 5.0


def _cap_memory(mem_mb: int) -> None:
    """Cap the address space so a pathological answer fails with MemoryError here
    instead of waking the OOM killer (which might pick the trainer)."""
    if mem_mb <= 0:
        return
    try:
        import resource

        limit = mem_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


def _check(parse, verify, answer: str, golds: list[str]) -> tuple[str, str]:
    """(reason, detail) of ``answer`` against the acceptable ``golds`` (any one matching counts)."""
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


def main(argv: list[str]) -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    _cap_memory(int(argv[0]))
    from math_verify import parse, verify

    # Default SIGALRM action terminates the process even inside C code: an orphaned
    # worker (parent gone) stuck on a huge power still dies shortly after its limit.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    proto.write("ready\n")
    for line in sys.stdin:
        req = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, float(req["t"]) + ORPHAN_GRACE_S)
        try:
            reason, detail = _check(parse, verify, req["a"], req["g"])
        except BaseException as exc:  # MemoryError, RecursionError, ...
            reason, detail = "error", type(exc).__name__ + ": " + str(exc)[:200]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        proto.write(json.dumps({"r": reason, "d": detail}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
