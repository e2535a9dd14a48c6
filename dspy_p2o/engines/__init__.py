"""Inference engines: the embedded local engine and the vLLM server engine.

Each engine takes its options from the run's config (`config.LocalOptions`,
`config.VLLMOptions`): `make_engine` builds the policy's engine of a run,
`make_reference_engine` the frozen engine of the initial weights that self-reflection asks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from dspy_p2o.config import ConfigError, LocalOptions, VLLMOptions

if TYPE_CHECKING:
    from dspy_p2o.config import P2OConfig
    from dspy_p2o.engines.base import Engine

_LAZY = {"Completion": "base", "Engine": "base", "GenerationOutput": "base", "SamplingParams": "base",
         "SyncReport": "base", "LocalEngine": "local"}


def __getattr__(name: str) -> Any:  # torch and dspy load on first use (the vLLM launcher needs neither)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dspy_p2o.engines.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dspy_p2o.engines' has no attribute {name!r}")


ENGINE_KINDS = ("local", "vllm")


def open_engine(kind: str, model: Any, options: LocalOptions | VLLMOptions | None = None, *, tokenizer: Any = None,
                frozen: bool = False) -> "Engine":
    """`local` (in-process transformers; `model` may be a loaded module, then with its tokenizer)
    or `vllm` (a managed or attached vLLM server of `model`, a directory or hub id)."""
    if kind == "local":
        from dspy_p2o.engines.local import LocalEngine

        options = options if options is not None else LocalOptions()
        return LocalEngine(model, tokenizer, device=options.device, dtype=options.dtype,
                           max_batch_size=options.max_batch_size)
    if kind == "vllm":
        from dspy_p2o.engines.vllm import VLLMEngine  # optional extra: imported only when asked for

        return VLLMEngine(model, options, tokenizer=tokenizer, frozen=frozen)
    raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINE_KINDS}")


def make_engine(config: "P2OConfig", model: Any, *, tokenizer: Any = None, processes: int = 1) -> "Engine":
    """The policy engine of a run: `config.engine` with its section's options. Under several
    processes a vLLM policy must be one shared server (`vllm.url`). A LoRA run's managed vLLM
    server serves adapters of rank trainer.lora.r, loaded at run time (`max_lora_rank`)."""
    if config.engine == "vllm" and processes > 1 and not config.vllm.url:
        raise ConfigError(f"engine='vllm' under {processes} processes needs a shared server (vllm.url; "
                          "benchmarks/gpu/run.sh starts one): a managed server per rank would load the policy "
                          "once per rank")
    options = config.engine_options
    if config.engine == "vllm" and config.trainer.lora is not None:
        options = dataclasses.replace(options, max_lora_rank=max(options.max_lora_rank or 0, config.trainer.lora.r))
    return open_engine(config.engine, model, options, tokenizer=tokenizer)


def make_reference_engine(config: "P2OConfig", model: Any) -> "Engine":
    """pi_init for self-reflection: a second, frozen engine on the initial weights `model`, never
    the policy's (vLLM: `config.vllm.reference_options()`)."""
    if config.engine == "vllm":
        return open_engine("vllm", model, config.vllm.reference_options(), frozen=True)
    return open_engine(config.engine, model, config.engine_options)


__all__ = ["Completion", "Engine", "ENGINE_KINDS", "GenerationOutput", "LocalEngine", "SamplingParams", "SyncReport",
           "make_engine", "make_reference_engine", "open_engine"]
