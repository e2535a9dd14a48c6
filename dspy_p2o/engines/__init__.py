"""Inference engines: the embedded local engine and the vLLM server engine."""

from dspy_p2o.engines.base import Completion, Engine, GenerationOutput, SamplingParams
from dspy_p2o.engines.local import LocalEngine

__all__ = ["Completion", "Engine", "GenerationOutput", "LocalEngine", "SamplingParams"]
