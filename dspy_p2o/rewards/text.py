"""Answer text: the final answer of a completion (its last ``\\boxed{}``) and the gold answers.

Pure Python, run in the caller's process: no math-verify, no DSPy (``dspy_p2o.data``
uses it to read the benchmarks' golds).
"""

from __future__ import annotations

import math
import numbers
import re
from decimal import Decimal
from typing import Any

__all__ = ["MATH_DELIMITER_RE", "as_latex", "extract_boxed", "final_answer", "normalize_gold"]

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
MATH_DELIMITER_RE = re.compile(r"(?<!\\)\$|\\boxed|\\fbox|\\\(|\\\[")
_E_NOTATION_RE = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d+)")


def as_latex(text: str) -> str:
    """Make a bare answer (``\\frac{1}{2}``, ``x^2+1``) parseable by math-verify.

    math-verify only extracts LaTeX inside math delimiters or a box (a bare
    ``x^2+1`` parses to nothing), so text without delimiters is boxed.  It also
    reads ``4.5e33`` (Minerva's golds) as 4.5*E*33 with Euler's e, so a lone
    e-notation number is rewritten as ``4.5\\times10^{33}``.
    """
    if MATH_DELIMITER_RE.search(text):
        return text
    sci = _E_NOTATION_RE.fullmatch(text)
    if sci:
        text = f"{sci.group(1)}\\times10^{{{int(sci.group(2))}}}"
    return "\\boxed{" + text + "}"


def final_answer(answer: str | None) -> str | None:
    """The answer to verify: the last box's content if the text has a box."""
    if answer is None:
        return None
    text = str(answer)
    if _BOX_RE.search(text):
        return extract_boxed(text)  # None for an unclosed box: no finished answer
    return text
