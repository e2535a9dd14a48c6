"""Inference engines: the embedded local engine and the vLLM server engine."""

from __future__ import annotations

from typing import Any

_LAZY = {"Completion": "base", "Engine": "base", "GenerationOutput": "base", "SamplingParams": "base",
         "LocalEngine": "local"}


def __getattr__(name: str) -> Any:  # torch and dspy load on first use (the vLLM launcher needs neither)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dspy_p2o.engines.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dspy_p2o.engines' has no attribute {name!r}")


ENGINE_KINDS = ("local", "vllm")


def make_engine(kind: str, model: Any, **kwargs: Any) -> "Engine":
    """`local` (in-process transformers) or `vllm` (a managed or attached vLLM server)."""
    if kind == "local":
        from dspy_p2o.engines.local import LocalEngine

        return LocalEngine(model, **kwargs)
    if kind == "vllm":
        from dspy_p2o.engines.vllm import VLLMEngine  # optional extra: imported only when asked for

        return VLLMEngine(model, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINE_KINDS}")


__all__ = ["Completion", "Engine", "ENGINE_KINDS", "GenerationOutput", "LocalEngine", "SamplingParams", "make_engine"]
