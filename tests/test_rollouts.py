import dspy
import pytest

from dspy_p2o.engines import LocalEngine
from dspy_p2o.renderer import Renderer
from dspy_p2o.rollouts import collect_rollouts, make_reward_fn


class RecordingEngine(LocalEngine):
    """The real local engine, remembering how it was called."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, prompt_token_ids, n=1, **kwargs):
        self.calls.append((len(prompt_token_ids), n))
        return super().generate(prompt_token_ids, n, **kwargs)


def exact_answer(gold, pred, trace=None):
    return float(pred.answer is not None and pred.answer.strip() == gold.answer)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    engine = RecordingEngine(tiny_model_dir)
    renderer = Renderer(dspy.Predict("question -> answer"), engine.tokenizer)
    examples = [dspy.Example(id=f"e{i}", question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question")
                for i in range(3)]
    return engine, renderer, examples


def test_templated_and_plain_rollouts_are_batched_per_n(setup):
    engine, renderer, examples = setup
    engine.calls.clear()
    assignments = {"e1": ["Add carefully.", "Think in tens."]}
    rollouts = collect_rollouts(engine, renderer, examples, make_reward_fn(renderer, exact_answer), k=4,
                                max_tokens=5, seed=0, assignments=assignments, plain_per_group=1, progress=False)
    # e0, e2: x with n=4; e1: z1 twice, z2 once, x once -> one generate call per distinct n
    assert sorted(engine.calls) == [(1, 2), (2, 1), (2, 4)]
    assert [r.example_id for r in rollouts] == ["e0"] * 4 + ["e1"] * 4 + ["e2"] * 4
    x1 = renderer.render(renderer.inputs_of(examples[1])).token_ids
    group = rollouts[4:8]
    assert all(len(r.calls) == 1 and r.calls[0].prompt_ids == x1 for r in group)  # the gradient prompt is always x
    assert sorted(str(r.template) for r in group) == ["Add carefully.", "Add carefully.", "None", "Think in tens."]
    for r in group:
        z, call = r.template, r.calls[0]
        expected = x1 if z is None else renderer.render(renderer.inputs_of(examples[1]), instruction=z).token_ids
        assert call.sampled_prompt_ids == expected and r.templated == call.templated == (z is not None)
    for r in rollouts:
        call = r.calls[0]
        assert len(call.behaviour_logprobs) == len(call.completion_ids) > 0
        assert all(lp <= 0 for lp in call.behaviour_logprobs)
        assert r.reward in (0.0, 1.0) and call.finish_reason in ("stop", "length")
    assert all(not r.templated and r.calls[0].sampled_prompt_ids == r.calls[0].prompt_ids
               for r in rollouts[:4] + rollouts[8:])


def test_all_templated_when_no_plain_rollouts_are_asked_for(setup):
    engine, renderer, examples = setup
    rollouts = collect_rollouts(engine, renderer, examples[:1], lambda ex, text: (0.0, ""), k=3, max_tokens=3,
                                assignments={"e0": ["Only hint."]}, progress=False)
    assert [r.template for r in rollouts] == ["Only hint."] * 3


def test_reward_fn_parses_and_scores(setup):
    _, renderer, examples = setup
    reward = make_reward_fn(renderer, exact_answer)
    good = renderer.adapter.format_assistant_message_content(renderer.signature, {"answer": "2"})
    assert reward(examples[1], good)[0] == 1.0
    assert reward(examples[1], "no fields at all")[0] == 0.0

    def broken(gold, pred, trace=None):
        raise RuntimeError("boom")

    score, feedback = make_reward_fn(renderer, broken)(examples[1], good)
    assert score == 0.0 and "boom" in feedback


def test_bad_arguments_are_named(setup):
    engine, renderer, examples = setup
    with pytest.raises(ValueError, match="plain_per_group"):
        collect_rollouts(engine, renderer, examples, lambda ex, t: (0.0, ""), k=2, plain_per_group=3, progress=False)
    dup = [examples[0], examples[0]]
    with pytest.raises(ValueError, match="duplicate example id 'e0'"):
        collect_rollouts(engine, renderer, dup, lambda ex, t: (0.0, ""), k=2, progress=False)
