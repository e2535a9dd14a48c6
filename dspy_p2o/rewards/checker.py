"""Strict, thread-safe, never-hanging maths answer checking (math-verify), cached.

The reward of P^2O is binary: the program's output must parse AND its answer must
match the gold answer according to math-verify.  Each check runs in a worker
process (:mod:`dspy_p2o.rewards.pool`) with a wall-clock limit; a repeated
(answer, gold) pair is an LRU-cache hit of ~3 µs instead of a ~4 ms check.
"""

from __future__ import annotations

import functools
from typing import Any

from dspy_p2o.rewards.pool import Verdict, check_in_worker
from dspy_p2o.rewards.text import MATH_DELIMITER_RE, as_latex, final_answer, normalize_gold

__all__ = ["DEFAULT_TIMEOUT", "Verdict", "check_answer", "math_reward", "verify_answer"]

#: Wall-clock seconds one answer check may compute before it is killed.
DEFAULT_TIMEOUT = 5.0
_CACHE_SIZE = 65536
_CACHE_MAX_CHARS = 2000  # longer answers skip the cache (bounds its memory at ~130 MB)
# A bare answer (no \boxed{} or $...$) longer than this is prose, not a final
# answer: boxing it would make sympy multiply thousands of symbols for seconds.
_MAX_BARE_ANSWER_CHARS = 1000


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _check_cached(answer_latex: str, golds: tuple[str, ...], timeout: float) -> Verdict:
    # Timeouts are cached too: the same pathological answer would time out again.
    return check_in_worker(answer_latex, list(golds), timeout)


def check_answer(answer: str | None, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """Check ``answer`` against ``gold`` and say why it failed.

    ``answer`` is the final answer text (``"27"``, ``"\\frac{1}{2}"``, ``"$x^2+1$"``,
    ``"\\boxed{5}"``); ``gold`` is anything :func:`normalize_gold` accepts.
    Thread-safe; ends within ``timeout`` seconds of verifier compute time.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    golds = tuple(as_latex(g) for g in normalize_gold(gold))
    if answer is None or not str(answer).strip():
        return Verdict(False, "empty", "the answer is empty")
    text = str(answer).strip()
    if len(text) > _MAX_BARE_ANSWER_CHARS and not MATH_DELIMITER_RE.search(text):
        return Verdict(False, "unparseable", f"{len(text)} characters of text without \\boxed{{}} or $...$")
    answer_latex = as_latex(text)
    if len(answer_latex) > _CACHE_MAX_CHARS:
        return check_in_worker(answer_latex, list(golds), float(timeout))
    return _check_cached(answer_latex, golds, float(timeout))


def verify_answer(answer: str, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True iff math-verify finds ``answer`` equal to ``gold`` within ``timeout`` s."""
    return check_answer(answer, gold, timeout).correct


def math_reward(answer: str | None, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Strict binary reward: 1.0 iff ``answer`` (or its last ``\\boxed{}``) verifies."""
    final = final_answer(answer)
    if final is None or not final.strip():
        return 0.0
    return 1.0 if verify_answer(final, gold, timeout) else 0.0
