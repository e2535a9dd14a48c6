"""Rewards of P^2O: strict maths answer checking (math-verify) and the DSPy metrics built on it.

One job per module:

- :mod:`~dspy_p2o.rewards.text`: the final answer of a completion (last ``\\boxed{}``)
  and gold normalisation (pure Python);
- :mod:`~dspy_p2o.rewards.worker`: the math-verify worker process (a script run by path);
- :mod:`~dspy_p2o.rewards.pool`: the pool of worker processes, with a wall-clock limit per check;
- :mod:`~dspy_p2o.rewards.checker`: the cached check API (:func:`check_answer`, :func:`math_reward`);
- :mod:`~dspy_p2o.rewards.metric`: DSPy/GEPA metrics (:func:`math_metric`, :func:`safe_metric`,
  :func:`check_metric`).
"""

# Loaded on first use, so that ``text``, ``pool`` and ``worker`` import neither DSPy nor torch.
_HOMES = {
    "DEFAULT_TIMEOUT": "checker", "check_answer": "checker", "math_reward": "checker", "verify_answer": "checker",
    "MetricError": "metric", "NotAScore": "metric", "check_metric": "metric", "math_metric": "metric",
    "safe_metric": "metric",
    "Verdict": "pool", "configure_verifier": "pool", "shutdown_verifier": "pool", "warm_up_verifier": "pool",
    "extract_boxed": "text", "normalize_gold": "text",
}
_MODULES = ("checker", "metric", "pool", "text", "worker")


def __getattr__(name):
    import importlib

    if name in _HOMES:
        return getattr(importlib.import_module(f"dspy_p2o.rewards.{_HOMES[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"dspy_p2o.rewards.{name}")
    raise AttributeError(f"module 'dspy_p2o.rewards' has no attribute {name!r}")


__all__ = sorted(_HOMES)
