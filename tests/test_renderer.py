"""The renderer produces exactly what DSPy sends, and T(x, z) differs only in the instruction."""

import dspy
import pytest
from dspy.lm15 import Message, Response, Usage
from transformers import AutoTokenizer

from dspy_p2o.renderer import Renderer, chat_token_ids, single_predictor
from dspy_p2o.engines.dspy_lm import request_messages


class RecordingEngine:
    """A DSPy custom engine that records requests and answers in the adapter's format."""

    def __init__(self):
        self.requests = []

    def complete(self, request):
        self.requests.append(request)
        text = "[[ ## reasoning ## ]]\nadd\n\n[[ ## answer ## ]]\n5\n\n[[ ## completed ## ]]"
        return Response(id=None, model="rec", message=Message.assistant(text), finish_reason="stop",
                        usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


class Solve(dspy.Signature):
    """Solve the arithmetic problem carefully."""

    question: str = dspy.InputField()
    context: str = dspy.InputField(desc="facts that may help")
    answer: str = dspy.OutputField(desc="a number")


@pytest.fixture
def program():
    prog = dspy.ChainOfThought(Solve)
    prog.predict.demos = [dspy.Example(question="1 + 1?", context="none", reasoning="1+1", answer="2")]
    return prog


def test_messages_and_ids_equal_what_dspy_sends(program, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recorder = RecordingEngine()
    inputs = {"question": "2 + 3?", "context": "integers"}
    with dspy.context(lm=dspy.LM("local/rec", engine=recorder, cache=False)):
        pred = program(**inputs)
    assert pred.answer == "5"
    sent = request_messages(recorder.requests[0])
    renderer = Renderer(single_predictor(program), tok)
    rendered = renderer.render(inputs)
    assert rendered.messages == sent
    assert len(sent) == 4  # system, demo user, demo assistant, user
    assert rendered.token_ids == chat_token_ids(tok, sent)
    assert tok.decode(rendered.token_ids).endswith("<|im_start|>assistant\n")


def test_templated_render_replaces_only_the_instruction(program, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = Renderer(program.predict, tok)
    inputs = {"question": "2 + 3?", "context": "integers"}
    plain = renderer.render(inputs)
    templated = renderer.render(inputs, instruction="Add the two numbers; answer digits only.")
    assert plain.instruction == Solve.instructions
    assert templated.instruction == "Add the two numbers; answer digits only."
    assert "Add the two numbers" in templated.messages[0]["content"]
    assert Solve.instructions not in templated.messages[0]["content"]
    assert templated.messages[1:] == plain.messages[1:]
    assert program.predict.signature.instructions == Solve.instructions  # the program is untouched


def test_parse_round_trip_and_failures(program, tiny_model_dir):
    renderer = Renderer(program.predict, AutoTokenizer.from_pretrained(tiny_model_dir))
    text = renderer.adapter.format_assistant_message_content(renderer.signature, {"reasoning": "r", "answer": "42"})
    assert renderer.parse(text) == {"reasoning": "r", "answer": "42"}
    assert renderer.prediction(text).answer == "42"
    assert renderer.parse("no fields here") is None
    assert renderer.prediction("garbage").answer is None


def test_input_errors_name_the_example(program, tiny_model_dir):
    renderer = Renderer(program.predict, AutoTokenizer.from_pretrained(tiny_model_dir))
    bad = dspy.Example(id="train/7", question="1+1?", answer="2").with_inputs("question")
    with pytest.raises(ValueError, match=r"train/7.*context"):
        renderer.inputs_of(bad)
    good = dspy.Example(id="train/8", question="1+1?", context="c", answer="2").with_inputs("question", "context")
    assert renderer.inputs_of(good) == {"question": "1+1?", "context": "c"}


def test_multi_predictor_programs_are_refused_clearly():
    class TwoStep(dspy.Module):
        def __init__(self):
            super().__init__()
            self.draft = dspy.Predict("question -> draft")
            self.final = dspy.Predict("question, draft -> answer")

    with pytest.raises(ValueError, match="exactly one predictor.*draft, final"):
        single_predictor(TwoStep())


def test_adapter_config_key_builds_dspy_adapters_and_names_the_choices():
    from dspy_p2o.config import ConfigError, P2OConfig
    from dspy_p2o.renderer import make_adapter

    assert P2OConfig().adapter == "chat" and P2OConfig.load(None, {"adapter": "json"}).adapter == "json"
    assert make_adapter("chat").use_json_adapter_fallback is False  # rewarded = parsed by this format alone
    assert isinstance(make_adapter("json"), dspy.JSONAdapter) and isinstance(make_adapter("xml"), dspy.XMLAdapter)
    with pytest.raises(ConfigError, match="adapter must be one of chat, json, xml, got 'yaml'"):
        P2OConfig(adapter="yaml")
