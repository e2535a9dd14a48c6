"""Compound DSPy programs: rollouts of whole programs, every predictor call trained, P^2O end to end.

The world (compound_fixtures): `plan` names a rule, `solve` applies it, `check` runs only for even
numbers. The tiny policy plans "one" unless the plan instruction says DOUBLE / TRIPLE, so every
question is hard until the right plan instruction is found and distilled.
"""

import json
from types import SimpleNamespace

import dspy
import pytest

import compound_fixtures as world
import dspy_p2o
from dspy_p2o.config import ConfigError
from dspy_p2o.renderer import Renderer
from rollout_helpers import collect
from dspy_p2o.trainer import GRPOTrainer
from dspy_p2o.trainer.grpo import gradient_prompt
from loop_fixtures import tiny_overrides

ADAPTER = dspy.ChatAdapter(use_json_adapter_fallback=False)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return world.save_policy(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(policy):
    from dspy_p2o.engines import LocalEngine

    return LocalEngine(policy)


def renderers_of(program, tokenizer):
    return {name: Renderer(p, tokenizer, adapter=ADAPTER, name=name) for name, p in program.named_predictors()}


def expected_inputs(call, previous, example):
    """The inputs a call was made with, rebuilt from the question and the previous call's parsed output."""
    if call.predictor == "plan":
        return {"question": example.question}
    if call.predictor == "solve":
        return {"question": example.question, "rule": ADAPTER.parse(world.PlanSolve().plan.signature,
                                                                    previous.completion_text)["rule"]}
    return {"question": example.question, "answer": ADAPTER.parse(world.PlanSolve().solve.signature,
                                                                  previous.completion_text)["answer"]}


def check_call_prompts(rollouts, renderers, by_id, distill=True):
    """Every call's gradient prompt is its predictor's ORIGINAL render of the inputs it was made with;
    a templated call was sampled from the render under its template."""
    for r in rollouts:
        for previous, call in zip([None] + r.calls, r.calls):
            renderer = renderers[call.predictor]
            inputs = expected_inputs(call, previous, by_id[r.example_id])
            assert call.prompt_ids == renderer.render(inputs).token_ids
            assert gradient_prompt(call, distill) == (call.prompt_ids if distill or not call.templated
                                                      else call.sampled_prompt_ids)
            if call.templated:
                assert call.sampled_prompt_ids == renderer.render(inputs, instruction=call.template.instruction).token_ids
                assert call.sampled_prompt_ids != call.prompt_ids
            else:
                assert call.sampled_prompt_ids == call.prompt_ids


class CountingEngine:
    """Wraps an engine, counting generate calls."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, n=1, **kwargs):
        self.calls.append((len(prompts), n))
        return self.engine.generate(prompts, n, **kwargs)


def test_a_rollout_records_every_predictor_call_with_its_original_and_sampled_prompt(engine):
    program = world.PlanSolve()
    renderers = renderers_of(program, engine.tokenizer)
    examples = world.hard_examples()[:2] + world.hard_examples()[6:8]  # d1 d2 t1 t2
    by_id = {ex.id: ex for ex in examples}
    solve_instruction = program.solve.signature.instructions
    assignments = {"d1": [{"plan": world.DOUBLE, "solve": solve_instruction}],
                   "t2": [{"plan": world.TRIPLE, "solve": solve_instruction}]}
    counting = CountingEngine(engine)
    counting.tokenizer = engine.tokenizer

    def collect_both():
        return collect(counting, program, examples, world.metric, k=4, temperature=0.5, max_tokens=12, seed=3,
                       assignments=assignments, plain_per_group=1, renderers=renderers)

    rollouts = collect_both()
    assert [r.example_id for r in rollouts] == [i for i in by_id for _ in range(4)]
    assert all([c.predictor for c in r.calls] == ["plan", "solve"] for r in rollouts)
    check_call_prompts(rollouts, renderers, by_id)
    d1 = rollouts[:4]
    assert [r.templated for r in d1] == [True, True, True, False]
    # the template changes plan's instruction only: solve's calls stay plain
    assert all(r.calls[0].template.instruction == world.DOUBLE and r.calls[1].template is None for r in d1[:3])
    assert sum(r.reward for r in d1[:3]) >= 2 and all(r.reward == 0 for r in rollouts[4:12])  # d2, t1: no template
    # two rounds (plan, then solve); a round's prompts go out in one generate call per distinct n
    assert len(counting.calls) <= 6 and sum(p * n for p, n in counting.calls) == 2 * 16
    # rounds form at quiescent points only: with a seed, a second collection samples the same tokens
    again = collect_both()
    assert [[c.completion_ids for c in r.calls] for r in again] == [[c.completion_ids for c in r.calls] for r in rollouts]
    assert (again.scored, again.failures, again.format_failures) == (16, 0, 0)


def test_an_optional_call_appears_only_in_the_rollouts_that_make_it(engine):
    program = world.PlanSolveCheck()
    renderers = renderers_of(program, engine.tokenizer)
    examples = world.hard_examples()[:4]  # d1..d4: check runs for d2, d4
    rollouts = collect(engine, program, examples, world.metric, k=2, temperature=0.5, max_tokens=12, seed=0,
                       renderers=renderers)
    calls = {r.example_id: [c.predictor for c in r.calls] for r in rollouts}
    assert calls == {"d1": ["plan", "solve"], "d2": ["plan", "solve", "check"],
                     "d3": ["plan", "solve"], "d4": ["plan", "solve", "check"]}
    check_call_prompts(rollouts, renderers, {ex.id: ex for ex in examples})


def test_a_failing_execution_scores_zero_keeps_its_calls_and_is_counted(engine):
    class Broken(world.PlanSolve):
        def forward(self, question):
            self.plan(question=question)
            raise RuntimeError("the program broke after planning")

    program = Broken()
    rollouts = collect(engine, program, world.hard_examples()[:2], world.metric, k=2, max_tokens=12, seed=0)
    assert all(r.reward == 0 and [c.predictor for c in r.calls] == ["plan"] for r in rollouts)
    assert "the program broke after planning" in rollouts[0].feedback
    calls, failures, last = rollouts.scored, rollouts.failures, rollouts.last_failure
    assert (calls, failures) == (4, 4) and "RuntimeError" in last


def test_predictors_the_policy_cannot_serve_are_refused_naming_them(tmp_path):
    program = world.PlanSolve()
    program.solve.lm = dspy.LM("openai/gpt-4o-mini")

    class Looks(dspy.Signature):
        image: dspy.Image = dspy.InputField()
        answer: str = dspy.OutputField()

    program.look = dspy.Predict(Looks)
    with pytest.raises(ConfigError, match=r"cannot serve: 'solve' has its own LM \(openai/gpt-4o-mini.*"
                                          r"'look' has a dspy.Image field 'image'"):
        dspy_p2o.compile(program, world.hard_examples(), metric=world.metric, policy=str(tmp_path / "no-model"),
                         run_dir=tmp_path / "run")


@pytest.fixture
def trained_batches(monkeypatch):
    """`batches`: every batch the trainer is given (the rollouts); `sequences`: per batch, the (call,
    prompt ids the loss is computed on) pairs of its trained sequences (`_prepare`'s output)."""
    batches, sequences = [], []
    train_on, prepare = GRPOTrainer.train_on, GRPOTrainer._prepare

    def spy_train_on(self, rollouts, *args, **kwargs):
        batches.append(list(rollouts))
        return train_on(self, rollouts, *args, **kwargs)

    def spy_prepare(self, chosen, advantages, **kwargs):
        seqs, tilde = prepare(self, chosen, advantages, **kwargs)
        sequences.append(list(zip(chosen, seqs.prompts)))
        return seqs, tilde

    monkeypatch.setattr(GRPOTrainer, "train_on", spy_train_on)
    monkeypatch.setattr(GRPOTrainer, "_prepare", spy_prepare)
    return SimpleNamespace(batches=batches, sequences=sequences)


def test_a_two_predictor_program_compiles_end_to_end_distilling_each_call(tmp_path, policy, engine, trained_batches):
    import prompt_phase_fixtures

    run_dir = tmp_path / "run"
    reflection, script = prompt_phase_fixtures.scripted_reflection_lm()
    trainset = world.hard_examples()
    program = world.PlanSolve()
    originals = {name: p.signature.instructions for name, p in program.named_predictors()}
    result = dspy_p2o.compile(program, trainset, metric=world.metric, policy=policy, reflection=reflection,
                              run_dir=run_dir, **tiny_overrides(batch_size=6, min_hard=4, dev_size=4, budget=80,
                                                                plain_per_group=1, temperature=0.5, max_tokens=12))
    # phase 2 ran on candidate programs: one instruction per predictor, the plan instruction evolved
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert record["ran"] and script.requests
    assert all(set(p["template"]) == {"plan", "solve"} for p in record["pool"])
    assert {world.DOUBLE, world.TRIPLE} & {p["template"]["plan"]["instruction"] for p in record["pool"] if p["on_front"]}
    assignments = record["assignments"]
    assert assignments and all(isinstance(z, dict) for zs in assignments.values() for z in zs)
    # epoch 2's batches: both predictors' calls, the templated plan calls trained on plan's ORIGINAL render
    renderers = renderers_of(world.PlanSolve(), engine.tokenizer)
    by_id = {ex.id: ex for ex in trainset}
    epoch2 = [r for batch in trained_batches.batches[2:] for r in batch]
    assert {c.predictor for r in epoch2 for c in r.calls} == {"plan", "solve"}
    assert any(c.templated and c.predictor == "plan" for r in epoch2 for c in r.calls)
    check_call_prompts(epoch2, renderers, by_id)
    # the ids the loss is computed on: a distilled call's ORIGINAL render, for both predictors' calls
    trained = [pair for batch in trained_batches.sequences for pair in batch]
    assert {c.predictor for c, _ in trained} == {"plan", "solve"}
    assert any(c.templated for c, _ in trained)
    assert all(prompt == c.prompt_ids for c, prompt in trained)
    assert result.history[1]["templated/pass@1"] > result.history[1].get("plain/pass@1", 0.0)
    # the returned program keeps every ORIGINAL instruction and answers with the trained weights
    assert {name: p.signature.instructions for name, p in result.program.named_predictors()} == originals
    with dspy.context(adapter=result.adapter):
        assert result.program(question=world.question(2)).answer is not None
    result.close()


def test_a_three_predictor_program_with_an_optional_call_compiles(tmp_path, policy, engine, trained_batches):
    run_dir = tmp_path / "run"
    trainset = world.hard_examples()
    dspy_p2o.compile(world.PlanSolveCheck(), trainset, metric=world.metric, policy=policy, run_dir=run_dir,
                     valset=trainset[:4], **tiny_overrides(method="grpo", batch_size=6, temperature=1.0,
                                                            max_tokens=12))
    rollouts = [r for batch in trained_batches.batches for r in batch]
    by_id = {ex.id: ex for ex in trainset}
    whole = [r for r in rollouts if "outside the adapter's format" not in r.feedback]  # no call stopped it
    assert all(len(r.calls) == (3 if by_id[r.example_id].n % 2 == 0 else 2) for r in whole)  # check: even n only
    assert {len(r.calls) for r in whole} == {2, 3}
    renderers = renderers_of(world.PlanSolveCheck(), engine.tokenizer)
    check_call_prompts(rollouts, renderers, {ex.id: ex for ex in trainset})
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_batch = [m["train/calls_per_rollout"] for m in metrics if "train/calls_per_rollout" in m]
    assert len(per_batch) == 4 and all(1 <= c <= 3 for c in per_batch) and 2 < sum(per_batch) / 4 < 3
    assert any("epoch/val/pass@1" in m for m in metrics)


def test_a_weak_policy_on_a_compound_program_trains_its_format_failures_score_zero(tmp_path, tiny_model_dir):
    """An untrained policy answers outside the format at every call: that is the policy's failure (reward 0,
    calls kept), not a metric failure that aborts the run."""
    run_dir = tmp_path / "run"
    result = dspy_p2o.compile(world.PlanSolveCheck(), world.hard_examples()[:4], metric=world.metric,
                              policy=tiny_model_dir, run_dir=run_dir, **tiny_overrides(epochs=1, method="grpo"))
    assert len(result.history) == 1 and result.history[0]["metric_failures"] == 0
    batch = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if "train/reward_mean" in line)
    assert batch["train/reward_mean"] == 0.0 and batch["train/rollouts"] == 16


def test_a_react_program_with_tools_rolls_out_through_its_own_forward(tmp_path, engine):
    """dspy.ReAct's inputs come from its signature (its first predictor also takes `trajectory`); its tools
    run inside the rollout, and every predictor call is recorded."""
    calls = []

    def factor_of(n: int) -> int:
        """The factor of a number."""
        calls.append(n)
        return 2

    program = dspy.ReAct("question -> answer", tools=[factor_of], max_iters=2)
    batch = collect(engine, program, world.hard_examples()[:2], world.metric, k=2, max_tokens=24, seed=0)
    assert len(batch) == 4 and all(r.calls and r.calls[0].predictor == "react" for r in batch)
    assert batch.failures == 0  # outputs outside the format are the policy's: scored 0, never a metric failure
