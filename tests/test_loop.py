"""The P^2O loop end to end on a real tiny model: compile(), run directory, switches, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dspy
import pytest
import yaml

import dspy_p2o
from dspy_p2o.config import ConfigError, P2OConfig
from dspy_p2o.rewards import math_metric
from loop_fixtures import assert_continued, kill_in_epoch_two, sum_examples, tiny_overrides, write_jsonl
from rollout_helpers import instruction


def program():
    return dspy.ChainOfThought("question -> answer")


@pytest.fixture(scope="module")
def factor_policy(tmp_path_factory):
    """The prompt-phase world: a policy that answers 1 unless the instruction says DOUBLE / TRIPLE."""
    import prompt_phase_fixtures as world

    engine = world.build_policy(tmp_path_factory.mktemp("factor") / "base")
    out = tmp_path_factory.mktemp("factor") / "policy"
    engine.model.save_pretrained(out)
    engine.tokenizer.save_pretrained(out)
    return out


def test_compile_two_epochs_with_prompt_phase(tmp_path, factor_policy):
    import prompt_phase_fixtures as world

    run_dir = tmp_path / "run"
    reflection, script = world.scripted_reflection_lm()
    trainset = world.hard_examples()
    result = dspy_p2o.compile(world.make_program(), trainset, metric=world.metric, policy=factor_policy,
                              reflection=reflection, valset=trainset[:4], run_dir=run_dir,
                              **tiny_overrides(batch_size=6, min_hard=4, dev_size=4, budget=60, plain_per_group=1, temperature=0.5,
                                               max_tokens=12))
    assert [h["epoch"] for h in result.history] == [1, 2]
    for name in ("config.yaml", "metrics.jsonl", "summary.md", "state.json", "templates/epoch-1.json",
                 "templates/epoch-2.json", "hard/epoch-1.jsonl", "hard/epoch-2.jsonl", "plots/training.png",
                 "plots/hard.png", "plots/templates.png"):
        assert (run_dir / name).exists(), name
    assert (result.checkpoint / "config.json").exists() and (result.checkpoint / "tokenizer_config.json").exists()
    assert any(p.name.startswith("checkpoint-") for p in (run_dir / "checkpoints").iterdir())
    # epoch 1: every question fails without a template -> all hard; GEPA finds DOUBLE and TRIPLE
    hard = [json.loads(line) for line in (run_dir / "hard/epoch-1.jsonl").read_text().splitlines()]
    assert len(hard) >= 10 and all(h["success_rate"] == 0 for h in hard)  # sampling at T=1 may luck out once
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert record["ran"] and script.requests
    front = {instruction(p["template"]) for p in record["pool"] if p["on_front"]}
    assert front & {world.DOUBLE, world.TRIPLE}  # a helpful template was found and kept
    assignments = record["assignments"]
    assert len(assignments) >= 8 and all({instruction(z) for z in zs} <= {instruction(p["template"]) for p in record["pool"]}
                                         for zs in assignments.values())
    # epoch 2: templated rollouts succeed, plain ones do not yet -> real gradient steps on x
    second = result.history[1]
    assert second["templated/pass@1"] > second.get("plain/pass@1", 0.0)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batches = [m for m in metrics if "train/reward_mean" in m]
    assert len(batches) == 4  # 2 epochs x 2 batches
    assert sum(m["train/steps"] for m in batches if m["train/epoch"] == 2) == 2
    assert any("epoch/val/pass@1" in m for m in metrics)
    # the returned program answers through DSPy with the trained weights and its ORIGINAL instruction
    assert result.program(question=world.question(3)).answer is not None
    assert result.program.signature.instructions == world.make_program().signature.instructions
    assert "| epoch |" in (run_dir / "summary.md").read_text()


@pytest.mark.parametrize("switch", [
    {"method": "grpo"},
    {"distill": False},
    {"same_template_in_group": True},
    {"near_hard": True, "hardness_on": "plain", "plain_per_group": 1},
])
def test_switches_share_the_code_path(tmp_path, format_model_dir, switch):
    run_dir = tmp_path / "run"
    result = dspy_p2o.compile(program(), sum_examples(8, 0, "train"), metric=math_metric, policy=format_model_dir,
                              run_dir=run_dir, **tiny_overrides(**switch))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    if switch.get("method") == "grpo":
        assert cfg["method"] == "grpo" and not record["ran"] and result.templates == {}
    if "distill" in switch:
        assert cfg["trainer"]["distill"] is False
    if switch.get("same_template_in_group"):
        assert cfg["prompt"]["same_template_in_group"] is True
        assert all(len({instruction(z) for z in zs}) == 1 for zs in record.get("assignments", {}).values())
    if switch.get("near_hard"):
        hard = [json.loads(line) for line in (run_dir / "hard/epoch-1.jsonl").read_text().splitlines()]
        assert all(h["success_rate"] <= 1 / 4 for h in hard)
    assert len(result.history) == 2


class TrainerSpy:
    """What the trainer was given in a run: every batch's rollouts (`train_on`), and each trained row's
    call with the prompt its gradient was taken on (`_prepare`)."""

    def __init__(self, monkeypatch) -> None:
        from dspy_p2o.trainer.grpo import GRPOTrainer

        self.batches: list[list] = []
        self.rows: list[tuple] = []  # (Call, gradient prompt ids)
        train_on, prepare = GRPOTrainer.train_on, GRPOTrainer._prepare

        def spy_train_on(trainer, rollouts, *args, **kwargs):
            self.batches.append(list(rollouts))
            return train_on(trainer, rollouts, *args, **kwargs)

        def spy_prepare(trainer, chosen, *args, **kwargs):
            seqs, tilde = prepare(trainer, chosen, *args, **kwargs)
            self.rows.extend(zip(chosen, seqs.prompts))
            return seqs, tilde

        monkeypatch.setattr(GRPOTrainer, "train_on", spy_train_on)
        monkeypatch.setattr(GRPOTrainer, "_prepare", spy_prepare)

    def templates_per_group(self) -> dict[str, list]:
        """Per question: the templates its templated rollouts were sampled under, over the whole run."""
        out: dict[str, list] = {}
        for rollout in (r for batch in self.batches for r in batch if r.templated):
            out.setdefault(rollout.example_id, []).append(rollout.template)
        return out


def either_factor_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """The factor world where the double and the triple are both right: DOUBLE and TRIPLE solve every question."""
    answer = str(getattr(pred, "answer", "") or "").strip()
    return dspy.Prediction(score=float(answer in ("2", "3")),
                           feedback="Correct." if answer in ("2", "3") else f"Incorrect: answered {answer!r}.")


def factor_run(tmp_path, factor_policy, metric=None, **overrides):
    """A 2-epoch P^2O run in the factor world (every question hard in epoch 1; the reflection proposes
    DOUBLE, then TRIPLE, in turn); returns the result, the run dir and the reflection's record."""
    import prompt_phase_fixtures as world

    reflection, script = world.scripted_reflection_lm(cycle=(world.DOUBLE, world.TRIPLE))
    run_dir = tmp_path / "run"
    result = dspy_p2o.compile(world.make_program(), world.hard_examples(), metric=metric or world.metric,
                              policy=factor_policy, reflection=reflection, run_dir=run_dir,
                              **tiny_overrides(**{**dict(batch_size=6, min_hard=4, dev_size=4, budget=60,
                                                         plain_per_group=1, temperature=0.5, max_tokens=12),
                                                  **overrides}))
    return result, run_dir, script


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_template_in_group_samples_each_group_under_one_template(tmp_path, factor_policy, monkeypatch):
    spy = TrainerSpy(monkeypatch)
    _, run_dir, _ = factor_run(tmp_path, factor_policy, metric=either_factor_metric, same_template_in_group=True)
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    # the switch can show: some assigned question was solved on hard_dev by two different templates, so
    # Alg. 2 without it gives that question's 3 templated rollouts both (draws without replacement)
    pool = [instruction(p["template"]) for p in record["pool"]]
    solvers = {q: {pool[c] for c, row in enumerate(record["scores"]) if row[j] >= 1}
               for j, q in enumerate(record["dev_ids"])}
    assert any(len(solvers.get(q, ())) >= 2 for q in record["assignments"]), solvers
    groups = spy.templates_per_group()  # what the trainer received (epoch 2: the assigned questions)
    assert set(groups) == set(record["assignments"])
    assert all(len(zs) == 3 and len(set(zs)) == 1 for zs in groups.values()), groups


@pytest.mark.parametrize("distill", [True, False])
def test_distill_decides_the_prompt_a_templated_call_is_trained_on(tmp_path, factor_policy, monkeypatch, distill):
    """Context distillation trains a templated call on x (its original prompt), with the template ratio;
    distill=False on the T(x, z) it was sampled from, without one."""
    spy = TrainerSpy(monkeypatch)
    _, run_dir, _ = factor_run(tmp_path, factor_policy, distill=distill)
    templated = [(call, prompt) for call, prompt in spy.rows if call.templated]
    assert templated and all(call.prompt_ids != call.sampled_prompt_ids for call, _ in templated)
    expected = (lambda call: call.prompt_ids) if distill else (lambda call: call.sampled_prompt_ids)
    assert all(prompt == expected(call) for call, prompt in templated)
    ratio_logged = any("train/template_masked_frac" in m for m in read_jsonl(run_dir / "metrics.jsonl"))
    assert ratio_logged == distill


def test_hardness_on_plain_mines_templated_questions_by_their_plain_rollouts(tmp_path, factor_policy):
    from dspy_p2o.prompt_phase.hard import mine_hard

    _, run_dir, _ = factor_run(tmp_path, factor_policy, hardness_on="plain")
    rows = read_jsonl(run_dir / "rewards/epoch-2.jsonl")  # epoch 2: the assigned questions were templated
    plain = {r["id"]: [x for x, t in zip(r["rewards"], r["templated"]) if not t] or r["rewards"] for r in rows}
    everything = {r["id"]: r["rewards"] for r in rows}
    # the switch can show: a question whose templates succeeded and whose plain rollout failed
    assert mine_hard(plain) != mine_hard(everything), rows
    assert [h["id"] for h in read_jsonl(run_dir / "hard/epoch-2.jsonl")] == mine_hard(plain)


class OneSuccessInK:
    """A metric that scores 1 on every k-th call per question and 0 otherwise: K consecutive rollouts of a
    question get at most one success, and exactly one when every rollout is scored."""

    def __init__(self, k: int) -> None:
        import threading

        self.k, self.calls, self.lock = k, {}, threading.Lock()

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
        with self.lock:
            n = self.calls[gold.id] = self.calls.get(gold.id, -1) + 1
        return float(n % self.k == 0)


def test_near_hard_mines_questions_with_exactly_one_success(tmp_path, factor_policy):
    import prompt_phase_fixtures as world

    run_dir = tmp_path / "run"
    dspy_p2o.compile(world.make_program(), world.hard_examples(), metric=OneSuccessInK(4), policy=factor_policy,
                     run_dir=run_dir, **tiny_overrides(method="grpo", epochs=1, batch_size=6, near_hard=True,
                                                        temperature=0.5, max_tokens=12))
    rewards = {r["id"]: r["rewards"] for r in read_jsonl(run_dir / "rewards/epoch-1.jsonl")}
    assert any(sum(rs) == 1 for rs in rewards.values()), rewards  # not hard without near_hard (tau ~ 0)
    assert all(sum(rs) <= 1 for rs in rewards.values())
    assert sorted(h["id"] for h in read_jsonl(run_dir / "hard/epoch-1.jsonl")) == sorted(rewards)


def test_grpo_trains_without_templates_and_never_reflects(tmp_path, factor_policy, monkeypatch):
    """method=grpo in the world where P^2O finds templates (every question hard): no prompt phase, no
    reflection call, no templated rollout reaches the trainer."""
    spy = TrainerSpy(monkeypatch)
    result, run_dir, script = factor_run(tmp_path, factor_policy, method="grpo")
    assert len(spy.batches) == 4 and not any(r.templated for batch in spy.batches for r in batch)
    assert script.requests == [] and result.templates == {}
    assert [json.loads((run_dir / f"templates/epoch-{n}.json").read_text())["ran"] for n in (1, 2)] == [False, False]
    assert len(read_jsonl(run_dir / "hard/epoch-1.jsonl")) >= 10  # P^2O would have run GEPA on these


def test_incompatible_run_dir_is_refused(tmp_path, format_model_dir):
    run_dir = tmp_path / "run"
    dspy_p2o.compile(program(), sum_examples(4, 0, "train"), metric=math_metric, policy=format_model_dir,
                     run_dir=run_dir, **tiny_overrides(epochs=1, method="grpo"))
    with pytest.raises(ConfigError, match=r"incompatible run \(k: 4 -> 2"):
        dspy_p2o.compile(program(), sum_examples(4, 0, "train"), metric=math_metric, policy=format_model_dir,
                         run_dir=run_dir, **tiny_overrides(epochs=1, method="grpo", k=2))


def test_bad_trainset_and_config_errors(tmp_path, format_model_dir):
    bad = [dspy.Example(id="q1", prompt="no question field", answer="1").with_inputs("prompt")]
    with pytest.raises(ValueError, match="q1"):
        dspy_p2o.compile(program(), bad, metric=math_metric, policy=format_model_dir, run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="unknown config key 'epochz'"):
        P2OConfig.load(None, {"epochz": 2})
    with pytest.raises(ConfigError, match="'trainer.lr' must be a number"):
        P2OConfig.load({"trainer": {"lr": "fast"}})
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        P2OConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="plain_per_group"):
        P2OConfig.load(None, {"plain_per_group": 6})


def test_the_run_knobs_reach_the_trainer_as_given(tmp_path, format_model_dir):
    """One home per knob: a dotted trainer override and the run's temperature arrive unchanged."""
    from dspy_p2o.loop import P2OLoop

    cfg = P2OConfig.load(None, {"policy": str(format_model_dir), **tiny_overrides(temperature=0.7, seed=3),
                                "trainer.lr": 2e-3, "trainer.epsilon_high": 0.3})
    loop = P2OLoop(program(), sum_examples(4, 0, "train"), metric=math_metric, policy=format_model_dir, config=cfg,
                   run_dir=tmp_path / "run")
    try:
        loop._build()
        assert loop.trainer.temperature == 0.7 and loop.trainer.config == cfg.trainer
        assert (loop.trainer.config.lr, loop.trainer.config.epsilon_high) == (2e-3, 0.3)
    finally:
        loop.release()


def test_command_line_overrides_parse_like_their_documentation():
    from dspy_p2o.config import parse_overrides

    # YAML 1.1 reads `off` as False and `1e-5` as a string; the README's examples must work as written
    cfg = P2OConfig.load(None, parse_overrides(["trainer.lr=1e-5", "trainer.template_ratio=off", "epochs=2",
                                                "distill=false"]))
    assert (cfg.trainer.lr, cfg.trainer.template_ratio, cfg.epochs, cfg.trainer.distill) == (1e-5, "off", 2, False)
    assert parse_overrides(["a=-2E+3", "b=1e-4x", "c=[1, 2]", "d=true"]) == {"a": -2000.0, "b": "1e-4x", "c": [1, 2],
                                                                            "d": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def _train_cmd(config, run_dir, *extra):
    return [sys.executable, "-m", "dspy_p2o.cli", "train", "--config", str(config), "--run-dir", str(run_dir), *extra]


def test_cli_killed_in_epoch_two_resumes_to_the_same_step_count(tmp_path, format_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, sum_examples(8, 0, "train"))
    config = tmp_path / "tiny.yaml"
    overrides = tiny_overrides(epochs=2, batch_size=4, method="grpo")
    flat = {"policy": str(format_model_dir), "trainer": {}, "prompt": {},
            "data": {"train": str(data), "metric": "loop_fixtures:slow_closeness_metric",
                     "program": "loop_fixtures:sum_program"}}
    for key, value in overrides.items():
        section = {"lr": "trainer", "micro_batch_tokens": "trainer", "min_hard": "prompt", "dev_size": "prompt",
                   "budget": "prompt", "beam_width": "prompt", "num_threads": "prompt"}.get(key)
        (flat[section] if section else flat)[key] = value
    config.write_text(yaml.safe_dump(flat))
    here = Path(__file__).parent  # the checkout under test, not an installed copy
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    run_dir = tmp_path / "killed"
    killed = kill_in_epoch_two(_train_cmd(config, run_dir), run_dir, env=env, timeout_s=240)
    refused = subprocess.run(_train_cmd(config, run_dir), env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    resumed = subprocess.run(_train_cmd(config, run_dir, "--resume", "--quiet"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [line[:5] for line in resumed.stdout.splitlines()] == ["done:"]  # --quiet: the result line only...
    assert "%|" not in resumed.stderr and " INFO " not in resumed.stderr  # ...no bar, no info logging
    assert_continued(run_dir, killed)  # from the killed run's checkpoint, not from scratch
    fresh_dir = tmp_path / "fresh"
    fresh = subprocess.run(_train_cmd(config, fresh_dir), env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def final(run):
        state = json.loads((run / "state.json").read_text())
        return state["done"], json.loads((Path(state["checkpoint"]) / "trainer_state.json").read_text())

    done_resumed, resumed_state = final(run_dir)
    done_fresh, fresh_state = final(fresh_dir)
    assert done_resumed and done_fresh
    assert resumed_state["global_step"] == fresh_state["global_step"] > 0


def test_vllm_engine_run_against_the_test_server(tmp_path, format_model_dir):
    """engine="vllm" end to end over HTTP: rollouts with token ids, weight reload, GEPA through the served LM."""
    from dspy_p2o.testing.fake_vllm import FakeVLLMServer
    from loop_fixtures import closeness_metric

    key = "sekret-test-key"
    with FakeVLLMServer(format_model_dir, api_key=key) as server:
        options = {"url": server.url, "api_key": key, "reference": {"url": server.url, "api_key": key}}
        result = dspy_p2o.compile(program(), sum_examples(8, 0, "train"), metric=closeness_metric,
                                  policy=format_model_dir, engine="vllm", vllm=options,
                                  run_dir=tmp_path / "run", **tiny_overrides(tau=0.5, near_hard=False))
        paths = [path for _, path in server.request_log]
    assert len(result.history) == 2
    assert paths.count("/v1/completions") >= 4
    assert any(p.startswith("/collective_rpc") for p in paths)  # weights reloaded after optimiser steps
    assert key not in (tmp_path / "run" / "config.yaml").read_text()
