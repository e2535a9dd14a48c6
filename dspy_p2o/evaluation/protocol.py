"""The paper's sampling protocol per benchmark, with every knob overridable.

Table 1 of P^2O: a benchmark with fewer than 100 problems (AIME24, AIME25, AMC23) is
scored as the mean accuracy over 16 samples per problem at temperature 0.6 (pass@16 is
reported alongside); a larger one is decoded greedily once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

SMALL_BENCHMARK_SIZE = 100  # fewer problems than this -> sampled protocol
SAMPLED_N = 16
SAMPLED_TEMPERATURE = 0.6


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is decoded. temperature == 0 is greedy (then samples must be 1)."""

    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 4096
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(f"greedy decoding (temperature 0) gives {self.samples} identical samples; use samples=1 "
                             "or a temperature > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def protocol_for(
    n_problems: int,
    *,
    samples: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int = 4096,
    seed: int | None = 0,
    sampled_below: int = SMALL_BENCHMARK_SIZE,
) -> Protocol:
    """The protocol of a benchmark of `n_problems` (its full size, not a --limit).

    Benchmarks with fewer than `sampled_below` problems are sampled (`samples`, default
    16, at `temperature`, default 0.6; temperature 0 makes them greedy too); the others
    are decoded greedily once. `sampled_below=0` makes every benchmark greedy, a huge
    value makes every benchmark sampled.
    """
    if n_problems < sampled_below:
        temperature = SAMPLED_TEMPERATURE if temperature is None else temperature
        samples = (SAMPLED_N if temperature > 0 else 1) if samples is None else samples
    else:
        temperature, samples = 0.0, 1
    return Protocol(samples=samples, temperature=temperature, top_p=1.0 if top_p is None else top_p,
                    top_k=0 if top_k is None else top_k, max_tokens=max_tokens, seed=seed)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
