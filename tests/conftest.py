"""Shared test setup: offline, no writes to the home directory, small threads."""

import os
import tempfile

os.environ.setdefault("DSPY_CACHEDIR", os.path.join(tempfile.gettempdir(), "dspy_p2o_test_dspy_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price map from the network

import random

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
    return teach_format(tiny_model_dir, tmp_path_factory.mktemp("format") / "model")


@pytest.fixture(scope="session")
def vllm_format_model_dir(tmp_path_factory):
    """`format_model_dir` in a shape a real vLLM CPU server serves (head_dim 32, 2 heads)."""
    from dspy_p2o.tiny import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model", hidden_size=32, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=32)
    return teach_format(base, tmp_path_factory.mktemp("vllm-format") / "model")


def teach_format(model_dir, out):
    """Fine-tune `model_dir` on the CoT format of single-digit sums; save_pretrained into `out`."""
    import dspy

    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.renderer import Renderer
    from dspy_p2o.tiny import supervised_finetune

    engine = LocalEngine(model_dir)
    renderer = Renderer(dspy.ChainOfThought("question -> answer").predict, engine.tokenizer)
    rng = random.Random(0)
    pairs = []
    for _ in range(200):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = renderer.render({"question": f"What is {a} + {b}?"}).token_ids
        text = renderer.adapter.format_assistant_message_content(
            renderer.signature, {"reasoning": f"{a} + {b} = {a + b}", "answer": str(a + b)})
        completion = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [engine.tokenizer.eos_token_id]
        pairs.append((prompt, completion))
    supervised_finetune(engine.model, pairs, steps=150, lr=8e-3, batch_size=16, pad_id=engine.pad_id)
    engine.model.save_pretrained(out)
    engine.tokenizer.save_pretrained(out)
    return out
