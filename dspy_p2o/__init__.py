"""dspy_p2o: co-optimise the prompt and the weights of a small open LM for DSPy programs (P^2O).

    import dspy, dspy_p2o
    result = dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), trainset,
                              metric=dspy_p2o.rewards.math_metric, policy="Qwen/Qwen3-4B")
    result.program(question="...")
"""

__version__ = "0.1.0"

_LAZY = {
    "compile": ("dspy_p2o.api", "compile"),
    "P2O": ("dspy_p2o.api", "P2O"),
    "P2OConfig": ("dspy_p2o.config", "P2OConfig"),
    "CompileResult": ("dspy_p2o.loop", "CompileResult"),
    "merge_adapter": ("dspy_p2o.lora", "merge_adapter"),
}


def __getattr__(name):  # heavy modules (torch, dspy) load on first use, keeping the CLI snappy
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("rewards", "data", "programs", "engines", "renderer", "tiny"):
        return importlib.import_module(f"dspy_p2o.{name}")
    raise AttributeError(f"module 'dspy_p2o' has no attribute {name!r}")


__all__ = ["compile", "P2O", "P2OConfig", "CompileResult", "merge_adapter"]
