"""The inference-engine interface shared by the local (in-process) and vLLM engines.

An engine samples completions for prompts given as token ids and reports, for each
sampled token, its log-probability under the distribution it was sampled from (after
temperature / top-k / top-p). The trainer uses those as behaviour log-probs; DSPy
programs reach the same engine through `dspy_lm()`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs, named as in vLLM. temperature == 0 means greedy.

    top_k <= 0 and top_p >= 1 disable those filters. `stop` strings end a completion
    (the stop string is kept out of the returned text, as vLLM does); `stop_token_ids`
    are added to the tokenizer's end-of-sequence tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    text: str
    logprobs: list[float]  # one per token in token_ids, under the sampling distribution
    finish_reason: str  # "stop" (eos / stop string) or "length"


@dataclass
class GenerationOutput:
    """All n completions of one prompt, in sampling order."""

    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)


@dataclass
class SyncReport:
    """What one `Engine.sync_weights` did and cost."""

    seconds: float = 0.0  # total wall time, saving and verification included (0: nothing to do)
    #: max |served log-prob - trainer log-prob| over a probe's tokens; None when not measured
    #: (a shared module, a sync from a path or a state dict, verify_sync off, a rank that did not sync)
    logprob_diff: float | None = None
    save_seconds: float = 0.0  # writing the weights where the server reloads them
    reload_seconds: float = 0.0  # the transfer: pause -> reload -> reset cache -> resume
    attempts: int = 1  # transfers made (2 when the first one's check failed)
    weights_path: str | None = None  # what the server reloaded (a LoRA adapter's directory: the adapter)
    bytes_written: int = 0  # what the sync wrote for the server to read (0: nothing written)


class Engine(abc.ABC):
    """What the trainer, the prompt phase and the evaluation need from an inference engine."""

    #: the policy tokenizer (a transformers tokenizer with a chat template)
    tokenizer: Any
    #: a short name for logs and the DSPy model string
    name: str = "policy"
    #: the most tokens (prompt + completion) one sequence may hold; None when unknown
    context_length: int | None = None

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int = 1,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 256,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> list[GenerationOutput]:
        """Sample n completions for each prompt; outputs are in prompt order.

        The one place arguments are checked (for every engine): then `_generate` samples.
        """
        params = sampling_params(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                 stop=tuple(stop or ()), stop_token_ids=tuple(stop_token_ids or ()), seed=seed)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            self._check_prompt(i, p, params)
        return self._generate(prompts, n, params, progress)

    def _check_prompt(self, index: int, prompt: list[int], params: SamplingParams) -> None:
        """An engine-specific check of one prompt (e.g. the server's context length)."""

    @abc.abstractmethod
    def _generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                  progress: bool) -> list[GenerationOutput]:
        """Sample n completions for each (checked) prompt, in prompt order."""

    @abc.abstractmethod
    def sync_weights(self, source: Any) -> SyncReport:
        """Make the engine serve new weights: a torch module, a state dict or a saved model dir."""

    def close(self) -> None:
        """Release processes, servers and memory. Idempotent."""

    def without_adapter(self) -> "Engine":
        """pi_init of a LoRA policy: this engine's base model with the adapter disabled, sharing the
        weights (and server) with this engine instead of loading a second copy. Frozen."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve a LoRA policy's base model")

    @abc.abstractmethod
    def dspy_lm(self, **defaults: Any):
        """A `dspy.LM` served by this engine, usable by any DSPy program (thread-safe)."""

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat messages under the policy's chat template, ready for generation."""
        from dspy_p2o.renderer import chat_token_ids

        return chat_token_ids(self.tokenizer, messages)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sampling_params(**kwargs: Any) -> SamplingParams:
    """Build SamplingParams from keyword arguments, ignoring None values."""
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
