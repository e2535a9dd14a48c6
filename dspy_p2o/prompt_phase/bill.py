"""What a prompt phase spends: the reflection LM's and the student's calls and tokens, and the
teacher's bill in USD.

A teacher reached through a provider (`teacher:<litellm model>`) is priced with litellm's cost map
(`litellm.cost_per_token`, per call, from the tokens the provider reported); a model the map does not
know, and an in-process LM (self-reflection's pi_init, a custom engine), has no price: its cost is
None, never a made-up 0. litellm reads the map shipped with it (`LITELLM_LOCAL_MODEL_COST_MAP=True`,
set here unless the environment says otherwise), so pricing needs no network; prices a user
registers (`litellm.register_model`) count too.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

logger = logging.getLogger(__name__)


def priced_model(lm: Any) -> str | None:
    """The litellm model name a reflection LM is billed under: a `dspy.LM` on a provider route (its
    model string), None for an LM served by a custom engine in process (no provider bill)."""
    spec = getattr(lm, "_engine_spec", None)
    model = getattr(lm, "model", None)
    return model if isinstance(spec, str) and isinstance(model, str) else None


def price_usd(model: str, input_tokens: int, output_tokens: int) -> float | None:
    """USD for one call of `model` with these tokens (litellm's cost map), None when the map has no price."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True  # an unknown model prints litellm's provider list otherwise
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(model=model, prompt_tokens=int(input_tokens),
                                                              completion_tokens=int(output_tokens))
    except Exception:  # litellm raises for a model it cannot price
        return None
    return float(prompt_cost) + float(completion_cost)


def entry_tokens(entry: dict) -> tuple[int, int]:
    """(input, output) tokens of one DSPy LM history entry (either usage spelling)."""
    usage = entry.get("usage") or {}
    def get(*names: str) -> int:
        return next((int(usage[n]) for n in names if usage.get(n) is not None), 0)

    return get("prompt_tokens", "input_tokens"), get("completion_tokens", "output_tokens")


@dataclass
class Spend:
    """Calls and tokens of one LM in a phase, and their USD cost (None: unpriced)."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    seconds: float = 0.0  # wall time spent waiting for this LM (calls made side by side count once)

    def add(self, calls: int, input_tokens: int, output_tokens: int, cost: float | None = None,
            seconds: float = 0.0) -> None:
        self.calls += calls
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.seconds += seconds
        if cost is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost

    def to_json(self) -> dict[str, Any]:
        return {"calls": self.calls, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 8)}


@dataclass
class Bill:
    """A phase's spend: the reflection LM (priced when it is a provider's model) and the student policy.
    Thread-safe: reflection calls of a round are recorded from their worker threads' results, in task order."""

    reflection_model: str | None = None  # litellm model name, None: no price applies
    reflection: Spend = field(default_factory=Spend)
    student: Spend = field(default_factory=Spend)
    unpriced_calls: int = 0  # reflection calls of a priced model that litellm's map could not price
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_reflection(self, entries: Iterable[dict], seconds: float = 0.0) -> None:
        """Add the DSPy history entries of reflection calls (one per call) and the wall time they took."""
        with self._lock:
            self.reflection.seconds += seconds
            for entry in entries:
                tokens_in, tokens_out = entry_tokens(entry)
                cost = None
                if self.reflection_model is not None:
                    cost = price_usd(self.reflection_model, tokens_in, tokens_out)
                    if cost is None:
                        self.unpriced_calls += 1
                self.reflection.add(1, tokens_in, tokens_out, cost)

    def record_student(self, calls: int, input_tokens: int, output_tokens: int, seconds: float = 0.0) -> None:
        with self._lock:
            self.student.add(calls, input_tokens, output_tokens, seconds=seconds)

    @property
    def cost_usd(self) -> float | None:
        """The teacher's bill so far (None when nothing could be priced)."""
        return self.reflection.cost_usd

    def to_json(self) -> dict[str, Any]:
        out = {"reflection_lm": {**self.reflection.to_json(), "model": self.reflection_model},
               "student_lm": {k: v for k, v in self.student.to_json().items() if k != "cost_usd"},  # the policy: no bill
               "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 8),
               "student_time_s": round(self.student.seconds, 3), "reflection_time_s": round(self.reflection.seconds, 3)}
        if self.unpriced_calls:
            out["reflection_lm"]["unpriced_calls"] = self.unpriced_calls
        return out
