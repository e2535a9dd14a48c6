"""Fixtures and helpers for the trainer / rollout tests (imported by those test files)."""

from __future__ import annotations

import pytest
import torch

from dspy_p2o.rollouts import Rollout


@pytest.fixture(scope="session")
def trainer_model_dir(tmp_path_factory):
    """A random-init tiny Qwen3 (hidden 32, 2 layers) with the default BPE tokenizer."""
    from dspy_p2o.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("trainer_tiny") / "model", hidden_size=32, num_layers=2)


def random_ids(n: int, generator: torch.Generator, low: int = 10, high: int = 500) -> list[int]:
    return torch.randint(low, high, (n,), generator=generator).tolist()


def templated_group(example_id: str, x: list[int], x_tilde: list[int], completions: list[list[int]],
                    rewards: list[float], template: str | None = "z") -> list[Rollout]:
    """A group whose rollouts were all sampled from x_tilde (template=None makes them plain on x)."""
    sampled = x if template is None else x_tilde
    return [Rollout.of_call(example_id, list(x), list(sampled), list(c), [-1.0] * len(c), r, template)
            for c, r in zip(completions, rewards)]
