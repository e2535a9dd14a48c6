"""Inference engines: the embedded local engine and the vLLM server engine."""

from __future__ import annotations

from typing import Any

from dspy_p2o.engines.base import Completion, Engine, GenerationOutput, SamplingParams
from dspy_p2o.engines.local import LocalEngine

ENGINE_KINDS = ("local", "vllm")


def make_engine(kind: str, model: Any, **kwargs: Any) -> Engine:
    """`local` (in-process transformers) or `vllm` (a managed or attached vLLM server)."""
    if kind == "local":
        return LocalEngine(model, **kwargs)
    if kind == "vllm":
        from dspy_p2o.engines.vllm import VLLMEngine  # optional extra: imported only when asked for

        return VLLMEngine(model, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINE_KINDS}")


__all__ = ["Completion", "Engine", "ENGINE_KINDS", "GenerationOutput", "LocalEngine", "SamplingParams", "make_engine"]
