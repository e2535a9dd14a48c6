import dspy
import pytest

from dspy_p2o.engines import LocalEngine
from dspy_p2o.engines.base import Completion, GenerationOutput
from dspy_p2o.renderer import Renderer
from rollout_helpers import collect, template


class RecordingEngine(LocalEngine):
    """The real local engine, remembering how it was called."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, prompt_token_ids, n=1, **kwargs):
        self.calls.append((len(prompt_token_ids), n))
        return super().generate(prompt_token_ids, n, **kwargs)


class ScriptedEngine(LocalEngine):
    """The real local engine's tokenizer, answering every prompt with a fixed completion text."""

    def __init__(self, *args, text="", **kwargs):
        super().__init__(*args, **kwargs)
        self.text = text

    def generate(self, prompt_token_ids, n=1, **kwargs):
        ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"] or [self.pad_id]
        return [GenerationOutput(list(p), [Completion(ids, self.text, [-0.1] * len(ids), "stop") for _ in range(n)])
                for p in prompt_token_ids]


def exact_answer(gold, pred, trace=None):
    return float(pred.answer is not None and pred.answer.strip() == gold.answer)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    engine = RecordingEngine(tiny_model_dir)
    program = dspy.Predict("question -> answer")
    renderer = Renderer(program, engine.tokenizer, name="self")
    examples = [dspy.Example(id=f"e{i}", question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question")
                for i in range(3)]
    return engine, program, renderer, examples


def test_templated_and_plain_rollouts_are_batched_per_n(setup):
    engine, program, renderer, examples = setup
    engine.calls.clear()
    assignments = {"e1": ["Add carefully.", "Think in tens."]}
    rollouts = collect(engine, program, examples, exact_answer, k=4, max_tokens=5, seed=0, assignments=assignments,
                       plain_per_group=1)
    # e0, e2: x with n=4; e1: z1 twice, z2 once, x once -> one generate call per distinct n
    assert sorted(engine.calls) == [(1, 2), (2, 1), (2, 4)]
    assert [r.example_id for r in rollouts] == ["e0"] * 4 + ["e1"] * 4 + ["e2"] * 4
    x1 = renderer.render(renderer.inputs_of(examples[1])).token_ids
    group = rollouts[4:8]
    assert all(len(r.calls) == 1 and r.calls[0].prompt_ids == x1 for r in group)  # the gradient prompt is always x
    assert sorted(r.template["self"].instruction if r.template else "None" for r in group) == \
        ["Add carefully.", "Add carefully.", "None", "Think in tens."]
    for r in group:
        z, call = r.template, r.calls[0]
        expected = x1 if z is None else renderer.render(renderer.inputs_of(examples[1]),
                                                        instruction=z["self"].instruction).token_ids
        assert call.sampled_prompt_ids == expected and r.templated == call.templated == (z is not None)
    for r in rollouts:
        call = r.calls[0]
        assert len(call.behaviour_logprobs) == len(call.completion_ids) > 0
        assert all(lp <= 0 for lp in call.behaviour_logprobs)
        assert r.reward in (0.0, 1.0) and call.finish_reason in ("stop", "length")
    assert all(not r.templated and r.calls[0].sampled_prompt_ids == r.calls[0].prompt_ids
               for r in rollouts[:4] + rollouts[8:])


def test_all_templated_when_no_plain_rollouts_are_asked_for(setup):
    engine, program, _, examples = setup
    rollouts = collect(engine, program, examples[:1], lambda ex, pred: 0.0, k=3, max_tokens=3,
                       assignments={"e0": ["Only hint."]})
    assert [r.template for r in rollouts] == [template(program, "Only hint.")] * 3


def test_a_template_with_demos_samples_from_its_demos_and_trains_on_the_original_render(setup):
    """T(x, z) with z = instruction + demos: the sampled prompt carries the demos, the gradient prompt
    is the program's own render (no demos)."""
    engine, program, renderer, examples = setup
    demos = [{"question": "What is 7 + 1?", "answer": "8"}]
    z = template(program, {"self": {"instruction": program.signature.instructions, "demos": demos}})
    rollouts = collect(engine, program, examples[:1], lambda ex, pred: 0.0, k=2, max_tokens=3,
                       assignments={"e0": [z]})
    inputs = renderer.inputs_of(examples[0])
    with_demos = renderer.render(inputs, demos=[dspy.Example(**d) for d in demos]).token_ids
    for r in rollouts:
        assert r.calls[0].templated and r.calls[0].sampled_prompt_ids == with_demos
        assert r.calls[0].prompt_ids == renderer.render(inputs).token_ids != with_demos


def test_the_metric_scores_parsed_outputs_and_failures_are_counted(tiny_model_dir, setup):
    _, program, renderer, examples = setup
    good = renderer.adapter.format_assistant_message_content(renderer.signature, {"answer": "2"})
    engine = ScriptedEngine(tiny_model_dir, text=good)
    batch = collect(engine, program, examples[1:2], exact_answer, k=2)
    assert [r.reward for r in batch] == [1.0, 1.0] and (batch.scored, batch.failures) == (2, 0)

    def broken(gold, pred, trace=None):
        raise RuntimeError("boom")

    batch = collect(engine, program, examples[1:2], broken, k=2)
    assert [r.reward for r in batch] == [0.0, 0.0] and "boom" in batch[0].feedback
    assert (batch.scored, batch.failures) == (2, 2) and "boom" in batch.last_failure


def test_an_output_outside_the_format_scores_zero_and_is_the_policys_failure_not_the_metrics(tiny_model_dir, setup):
    _, program, _, examples = setup
    engine = ScriptedEngine(tiny_model_dir, text="no fields at all")
    batch = collect(engine, program, examples, exact_answer, k=2)
    assert all(r.reward == 0.0 and len(r.calls) == 1 for r in batch)  # the call is kept: it is trained away from
    assert (batch.scored, batch.failures, batch.format_failures) == (0, 0, 6)
    assert "outside the adapter's format" in batch[0].feedback


def test_the_programs_own_forward_runs_in_every_rollout(tiny_model_dir, setup):
    """What serving sees is what training sees: a one-predictor program's forward rewrites its input."""
    _, _, _, examples = setup

    class Shouting(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict("question -> answer")

        def forward(self, question):
            return self.answer(question=question.upper())

    program = Shouting()
    engine = RecordingEngine(tiny_model_dir)
    batch = collect(engine, program, examples[:1], exact_answer, k=2, max_tokens=3)
    shouted = Renderer(program.answer, engine.tokenizer, name="answer").render({"question": "WHAT IS 0 + 1?"})
    assert all(r.calls[0].prompt_ids == shouted.token_ids for r in batch)

    class Guarded(Shouting):
        def forward(self, question):
            raise ValueError("refused by the program's guard")

    batch = collect(engine, Guarded(), examples[:1], exact_answer, k=2, max_tokens=3)
    assert (batch.scored, batch.failures) == (2, 2) and "guard" in batch.last_failure


def test_bad_arguments_are_named(setup):
    engine, program, _, examples = setup
    with pytest.raises(ValueError, match="plain_per_group"):
        collect(engine, program, examples, lambda ex, pred: 0.0, k=2, plain_per_group=3)
    dup = [examples[0], examples[0]]
    with pytest.raises(ValueError, match="duplicate example id 'e0'"):
        collect(engine, program, dup, lambda ex, pred: 0.0, k=2)
