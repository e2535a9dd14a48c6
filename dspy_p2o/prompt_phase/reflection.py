"""The reflection LM that proposes new templates inside GEPA.

- "self": the frozen initial model pi_init on its own engine (never the policy being
  trained: the authors found the policy's late-training templates lost diversity). The
  engine is built lazily on the first reflection call, so an epoch whose hard set is too
  small never pays for it.
- "teacher:<litellm model>": any litellm model string (e.g. "teacher:openai/kimi-k2" with
  api_base). DSPy retries transient failures `num_retries` times with exponential
  back-off (honouring Retry-After). The API key is read from an environment variable
  named by `api_key_env`; only that name is ever shown, and DSPy strips `api_*` keys from
  its history and state dumps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import dspy

from dspy_p2o.engines.base import Engine
from dspy_p2o.engines.dspy_lm import EngineLMBackend

REFLECTION_SPECS = ('"self"', '"teacher:<litellm model>"')


class LazyEngineBackend:
    """A DSPy custom engine that builds its dspy_p2o Engine on first use."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self._backend: EngineLMBackend | None = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine | None:
        return None if self._backend is None else self._backend.engine

    def _get(self) -> EngineLMBackend:
        with self._lock:
            if self._backend is None:
                self._backend = EngineLMBackend(self._factory())
            return self._backend

    def complete(self, request):
        return self._get().complete(request)

    def stream(self, request):
        return self._get().stream(request)

    def close(self) -> None:
        """Release the pi_init engine (if it was ever built)."""
        with self._lock:
            if self._backend is not None:
                self._backend.engine.close()
                self._backend = None


def make_reflection_lm(spec: str, *, self_engine_factory: Callable[[], Engine] | None = None,
                       api_base: str | None = None, api_key_env: str | None = None, num_retries: int = 6,
                       temperature: float = 1.0, max_tokens: int = 4096, **lm_kwargs: Any) -> dspy.LM:
    """A `dspy.LM` for GEPA's reflection from "self" or "teacher:<litellm model>"."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reflection must be one of {', '.join(REFLECTION_SPECS)}; got {spec!r}")
    spec = spec.strip()
    if spec == "self":
        if self_engine_factory is None:
            raise ValueError('reflection="self" needs self_engine_factory: a callable building an engine for the '
                             "frozen initial model (never the policy being trained)")
        return dspy.LM("local/reflection-self", engine=LazyEngineBackend(self_engine_factory), cache=False,
                       temperature=temperature, max_tokens=max_tokens, **lm_kwargs)
    if spec.startswith("teacher:"):
        model = spec[len("teacher:"):].strip()
        if not model:
            raise ValueError(f'reflection {spec!r} names no model; write "teacher:<litellm model>", '
                             'e.g. "teacher:openai/gpt-4.1"')
        kwargs: dict[str, Any] = dict(lm_kwargs)
        if api_base:
            kwargs["api_base"] = api_base
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"environment variable {api_key_env!r} (the reflection teacher's API key) "
                                 "is not set or empty")
            kwargs["api_key"] = key
        return dspy.LM(model, num_retries=num_retries, temperature=temperature, max_tokens=max_tokens,
                       cache=False, **kwargs)
    raise ValueError(f"reflection must be one of {', '.join(REFLECTION_SPECS)}; got {spec!r}")


def preflight(lm: dspy.BaseLM) -> float:
    """One 1-token call to a teacher, so a wrong model, endpoint or key fails at start and not
    after a whole epoch; returns its seconds. Raises RuntimeError with one line (no key in it)."""
    start = time.perf_counter()
    quiet = logging.getLogger("dspy.clients.lm")  # "response was truncated": 1 token is the point
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        lm(messages=[{"role": "user", "content": "Reply with OK."}], max_tokens=1)
    except Exception as exc:  # litellm's auth / connection / not-found errors, after its retries
        message = (str(exc).strip().splitlines() or [""])[0][:300]
        key = (getattr(lm, "kwargs", {}) or {}).get("api_key")
        if key:
            message = message.replace(str(key), "***")
        raise RuntimeError(f"the reflection teacher {getattr(lm, 'model', '?')!r} failed its preflight call "
                           f"({type(exc).__name__}: {message}); check the model name, api_base and key "
                           "(or set reflection_preflight: false)") from None
    finally:
        quiet.setLevel(level)
    return time.perf_counter() - start


def close_reflection_lm(lm: dspy.BaseLM) -> None:
    """Free the pi_init engine behind a "self" reflection LM; a no-op for teachers."""
    backend = getattr(lm, "_engine_spec", None)
    if isinstance(backend, LazyEngineBackend):
        backend.close()
