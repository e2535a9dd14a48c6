"""Shared test setup: offline, no writes to the home directory, small threads."""

import os
import tempfile

os.environ.setdefault("DSPY_CACHEDIR", os.path.join(tempfile.gettempdir(), "dspy_p2o_test_dspy_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price map from the network

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Qwen3 with a BPE tokenizer trained on rendered DSPy prompts."""
    from dspy_p2o.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2)


@pytest.fixture(scope="session")
def format_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model taught DSPy's ChatAdapter output format for `question -> answer` CoT
    (single-digit sums), so real DSPy calls parse. Accuracy is not the point; format is."""
    from dspy_p2o.tiny import teach_sum_format

    return teach_sum_format(tiny_model_dir, tmp_path_factory.mktemp("format") / "model")


@pytest.fixture(scope="session")
def vllm_format_model_dir(tmp_path_factory):
    """`format_model_dir` in a shape a real vLLM CPU server serves (head_dim 32, 2 heads)."""
    from dspy_p2o.tiny import build_tiny_model, teach_sum_format

    base = build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model", hidden_size=32, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=32)
    return teach_sum_format(base, tmp_path_factory.mktemp("vllm-format") / "model")
