"""Demonstrations as templates (prompt.optimizer fewshot / gepa+fewshot) on a real tiny policy that
follows a demo: shown another question with its answer, it answers what the demo answered
(prompt_phase_fixtures.build_policy(demos=True)); without one it answers "one", so every double and
triple question is hard and a demo of the right kind unlocks it."""

import json
import re

import dspy
import prompt_phase_fixtures as world
import pytest
from loop_fixtures import tiny_overrides

import dspy_p2o
from dspy_p2o.config import PromptPhaseConfig
from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.prompt_phase import PolicyStudent, run_prompt_phase
from dspy_p2o.renderer import Renderer, program_renderers
from dspy_p2o.trainer import GRPOTrainer
from dspy_p2o.trainer.grpo import gradient_prompt

pytestmark = pytest.mark.slow  # builds and fine-tunes the demo-following policy (~30-60 s on a loaded 2-core box)

ADAPTER = dspy.ChatAdapter(use_json_adapter_fallback=False)
EXAMPLES = world.hard_examples(words=True)
KIND = {ex.id: ex.factor for ex in EXAMPLES}


def easy_examples():
    """Questions the policy answers without help (the factor 1 is its plain answer)."""
    return [dspy.Example(id=f"e{n}", question=world.question(n), answer="one", factor=1, n=n).with_inputs("question")
            for n in world.NUMBERS]


@pytest.fixture(scope="module")
def demo_policy(tmp_path_factory):
    engine = world.build_policy(tmp_path_factory.mktemp("demo") / "base", demos=True)
    out = tmp_path_factory.mktemp("demo") / "policy"
    engine.model.save_pretrained(out)
    engine.tokenizer.save_pretrained(out)
    yield engine, out
    engine.close()


def student_of(engine, max_tokens=16):
    return PolicyStudent(engine, program_renderers(world.make_program(), engine.tokenizer, ADAPTER),
                         SamplingParams(temperature=0.0, max_tokens=max_tokens))


def fewshot_config(**kw):
    base = dict(optimizer="fewshot", min_hard=4, dev_size=6, budget=200, fewshot_k=1, fewshot_candidates=6)
    return PromptPhaseConfig(**{**base, **kw})


def test_fewshot_candidates_are_demo_sets_scored_and_assigned_without_a_questions_own_demo(demo_policy, tmp_path):
    engine, _ = demo_policy
    out = run_prompt_phase(world.make_program(), EXAMPLES, student=student_of(engine), reflection_lm=None,
                           metric=world.metric, config=fewshot_config(), k=3, log_dir=tmp_path, labeled_demos=EXAMPLES)
    assert out.ran and out.pool[0]["source"] == "seed" and out.pool[0]["mean_dev_score"] == 0.0
    fewshot = [p for p in out.pool if p["source"] == "fewshot"]
    assert len(fewshot) == 6 and out.cost["metric_calls_fewshot"] == 6 * len(out.dev_ids)
    assert out.cost["metric_calls_fewshot"] + len(out.dev_ids) <= out.cost["metric_calls_budget"]
    for entry in fewshot:
        (name, part), = entry["template"].items()
        (demo,) = part["demos"]  # fewshot_k demos, DSPy's LabeledFewShot drew them from the gold answers
        assert part["instruction"] == world.make_program().signature.instructions
        assert demo == {"question": world.question(EXAMPLES[[e.id for e in EXAMPLES].index(demo["id"])].n),
                        "answer": world.answer_of(KIND[demo["id"]], True), "id": demo["id"]}
        # a demo solves the questions of its kind -- except its own question, scored WITHOUT its own demo
        assert [s == 1.0 for s in out.scores[entry["index"]]] == [KIND[q] == KIND[demo["id"]] and q != demo["id"]
                                                                   for q in out.dev_ids]
    # every hard question gets demo sets, never its own gold answer; a dev question some candidate solved
    # gets those (demos of its kind), one that nothing solved the covering set's (Alg. 2)
    assert sorted(out.assignments) == sorted(KIND)
    solved_dev = {q for j, q in enumerate(out.dev_ids) if any(row[j] == 1.0 for row in out.scores)}
    assert solved_dev
    for qid, templates in out.assignments.items():
        assert len(templates) == 3
        for z in templates:
            demos = z[name].demos
            assert demos and all(d["id"] != qid for d in demos)
            assert qid not in solved_dev or all(KIND[d["id"]] == KIND[qid] for d in demos)
    saved = json.loads((tmp_path / "prompt_phase.json").read_text())
    assert saved["assignments"] == out.to_json()["assignments"]


class ShortContext:
    """The policy engine with a smaller context, recording every prompt it is asked to sample."""

    def __init__(self, engine, context_length):
        self.engine, self.context_length, self.tokenizer, self.prompts = engine, context_length, engine.tokenizer, []

    def generate(self, prompts, n=1, **kwargs):
        self.prompts.extend(prompts)
        return self.engine.generate(prompts, n, **kwargs)


def test_demo_sets_that_do_not_fit_the_context_are_refused_with_a_clear_message(demo_policy, tmp_path):
    """Demos count against the context: a candidate whose prompt + demos + max_tokens exceeds it on some
    hard question is refused before any scoring, naming the question and the token counts."""
    engine, _ = demo_policy
    renderer = Renderer(world.make_program(), engine.tokenizer, adapter=ADAPTER)
    plain = max(len(renderer.render({"question": ex.question}).token_ids) for ex in EXAMPLES)
    with_demo = min(len(renderer.render({"question": ex.question}, demos=[EXAMPLES[0]]).token_ids) for ex in EXAMPLES)
    assert with_demo > plain
    short = ShortContext(engine, plain + 16 + (with_demo - plain) // 2)  # the plain prompt fits, one demo does not
    student = PolicyStudent(short, program_renderers(world.make_program(), engine.tokenizer, ADAPTER),
                            SamplingParams(temperature=0.0, max_tokens=16))
    out = run_prompt_phase(world.make_program(), EXAMPLES, student=student, reflection_lm=None, metric=world.metric,
                           config=fewshot_config(), k=3, log_dir=tmp_path, labeled_demos=EXAMPLES)
    assert out.ran and out.cost["fewshot_candidates"] == 0 and out.cost["fewshot_refused"] == 6
    assert re.fullmatch(r"question '\w+' renders to \d+ prompt tokens with 1 demo\(s\) per predictor \+ max_tokens 16 "
                        rf"> the policy's context \({short.context_length} tokens\)", out.cost["fewshot_refused_first"])
    assert [p["source"] for p in out.pool] == ["seed"] and out.assignments == {}
    assert short.prompts and all(len(p) + 16 <= short.context_length for p in short.prompts)  # nothing too long sampled


@pytest.fixture
def trained_rollouts(monkeypatch):
    """Every batch of rollouts the trainer is given."""
    batches = []
    train_on = GRPOTrainer.train_on

    def spy(self, rollouts, *args, **kwargs):
        batches.append(list(rollouts))
        return train_on(self, rollouts, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "train_on", spy)
    return batches


def compile_fewshot(tmp_path, policy_dir, **overrides):
    reflection, script = world.scripted_reflection_lm()
    trainset = EXAMPLES + easy_examples()
    result = dspy_p2o.compile(world.make_program(), trainset, metric=world.metric, policy=policy_dir,
                              reflection=reflection, run_dir=tmp_path / "run",
                              **tiny_overrides(batch_size=6, min_hard=4, dev_size=4, budget=60, plain_per_group=1,
                                               temperature=0.5, max_tokens=12, fewshot_k=1, fewshot_candidates=4,
                                               **overrides))
    return result, script


def test_a_fewshot_compile_distills_demo_templates_into_the_plain_prompt(demo_policy, tmp_path, trained_rollouts):
    """Both phases with optimizer fewshot: the prompt phase assigns demo sets (never a question's own
    answer); epoch 2 samples those questions under the demos and takes the gradient on the ORIGINAL
    render (token ids); the returned program is unchanged."""
    engine, policy_dir = demo_policy
    result, script = compile_fewshot(tmp_path, policy_dir, optimizer="fewshot")
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert record["ran"] and not script.requests  # no reflection LM in a fewshot phase
    assert {p["source"] for p in record["pool"]} == {"seed", "fewshot"}
    assignments = record["assignments"]
    assert assignments and set(assignments) <= set(KIND)
    for qid, templates in assignments.items():
        for z in templates:
            assert all(d["id"] != qid for d in z["self"]["demos"])
    # epoch 2: the demo-templated calls were sampled from the render with demos, trained on the original render
    renderer = Renderer(world.make_program(), engine.tokenizer, adapter=ADAPTER)
    by_id = {ex.id: ex for ex in EXAMPLES + easy_examples()}
    epoch2 = [r for batch in trained_rollouts[3:] for r in batch]
    templated = [(r, c) for r in epoch2 for c in r.calls if c.templated]
    assert templated
    for r, call in templated:
        inputs = {"question": by_id[r.example_id].question}
        demos = [dspy.Example(**d) for d in call.template.demos]
        assert demos and all(d["id"] != r.example_id for d in call.template.demos)
        assert call.sampled_prompt_ids == renderer.render(inputs, demos=demos).token_ids
        assert gradient_prompt(call, True) == call.prompt_ids == renderer.render(inputs).token_ids
    assert result.history[1]["templated/pass@1"] > result.history[1].get("plain/pass@1", 0.0)
    # the bill and the summary of the phase
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phase = next(m for m in metrics if "gepa/metric_calls_fewshot" in m)
    assert phase["gepa/metric_calls_fewshot"] > 0 and phase["gepa/student_lm/calls"] > 0
    assert phase["gepa/cost_usd"] is None and phase["gepa/reflection_lm/calls"] == 0
    summary = (run_dir / "summary.md").read_text()
    assert "## Prompt phases" in summary and "| 1 | fewshot |" in summary
    # the returned program: its own instruction, no demos
    assert result.program.signature.instructions == world.make_program().signature.instructions
    assert not result.program.demos
    result.close()


def test_a_gepa_fewshot_compile_pools_instructions_and_bootstrapped_demos(demo_policy, tmp_path):
    """Both phases with optimizer gepa+fewshot and bootstrapped demos only: the few-shot candidates are the
    run's own successful plain rollouts on questions that are not hard (the easy ones), pooled with GEPA's
    instructions; GEPA's templates solve the hard questions and are assigned."""
    _, policy_dir = demo_policy
    result, script = compile_fewshot(tmp_path, policy_dir, optimizer="gepa+fewshot", fewshot_source="bootstrapped")
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert record["ran"] and script.requests
    pool = record["pool"]
    fewshot = [p for p in pool if p["source"] == "fewshot"]
    assert fewshot and {p["source"] for p in pool} == {"gepa", "fewshot"}
    easy = {ex.id for ex in easy_examples()}
    for entry in fewshot:  # bootstrapped: the demos are the easy questions the policy answered itself
        demos = entry["template"]["self"]["demos"]
        assert demos and all(d["id"] in easy and d["answer"] == "one" for d in demos)
    cost = record["cost"]
    assert cost["metric_calls_fewshot"] <= cost["metric_calls_budget"] // 2
    assert {world.DOUBLE, world.TRIPLE} & {p["template"]["self"]["instruction"] for p in pool if p["on_front"]}
    assert record["assignments"]
    state = json.loads((run_dir / "state.json").read_text())  # the last epoch's successes, one record per question
    gold = {ex.id: ex.answer for ex in EXAMPLES + easy_examples()}
    assert easy & set(state["demos"]) and all(r["answer"] == gold[i] == gold[r["id"]] for i, r in state["demos"].items())
    assert len(result.history) == 2
    result.close()
