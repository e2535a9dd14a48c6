"""The toy world: task, reflection LM, base-policy cache and the experiment path (tiny budget)."""

from __future__ import annotations

import json
import re

import dspy
import pytest

from dspy_p2o.toyworld.reflection import ReflectionNoise, ToyReflection, infer_rules, reflection_lm
from dspy_p2o.toyworld.task import (BASE_INSTRUCTION, RULES, WorldConfig, apply_rule, build_world,
                                    make_instruction, metric, parse_instruction, parse_question)


def test_world_is_seeded_disjoint_and_hard_questions_defeat_the_base_beliefs():
    a, b = build_world(3), build_world(3)
    assert [e.id for e in a.train] == [e.id for e in b.train] and a.hard_rules == b.hard_rules
    assert build_world(4).rules != a.rules or [e.id for e in build_world(4).train] != [e.id for e in a.train]
    assert not set(a.easy_rules) & set(a.hard_rules)
    assert set(a.beliefs) == set(a.hard_rules)
    used = list(a.easy_rules.values()) + list(a.hard_rules.values()) + list(a.beliefs.values())
    assert len(set(used)) == len(used) and "copy" not in used  # every tag and belief has a rule of its own
    assert not {e.question for e in a.train} & {e.question for e in a.test}
    for e in a.train + a.test:
        tag, letter = parse_question(e.question)
        assert e.answer == apply_rule(a.rules[tag], letter) != letter  # copying never scores
        if tag in a.beliefs:  # nor does the base policy's belief about a hard tag
            assert apply_rule(a.beliefs[tag], letter) != e.answer
        assert e.kind == ("hard" if tag in a.hard_rules else "easy")
    assert len({e.id for e in a.train + a.test}) == len(a.train) + len(a.test)
    assert len(a.split("test", "hard")) == 3 * WorldConfig().test_per_tag
    with pytest.raises(ValueError, match="num_easy"):
        WorldConfig(num_easy=4, num_hard=3)
    with pytest.raises(ValueError, match="letters"):
        WorldConfig(train_per_tag=20, test_per_tag=10)
    for bad in ("K g", "#K 12", "#K gh"):
        with pytest.raises(ValueError, match="not a toy-world question"):
            parse_question(bad)


def test_instruction_round_trip_and_metric_feedback_names_the_gold():
    assert parse_instruction(make_instruction("mirror")) == "mirror"
    assert parse_instruction(BASE_INSTRUCTION) is None
    with pytest.raises(ValueError, match="unknown rule"):
        make_instruction("sort")
    world = build_world(0)
    ex = world.split("train", "hard")[0]
    good = metric(ex, dspy.Prediction(answer=ex.answer))
    bad = metric(ex, dspy.Prediction(answer=None))
    assert good.score == 1.0 and bad.score == 0.0
    assert ex.answer in bad.feedback and "no parseable answer" in bad.feedback


def _gepa_prompt(examples, answers):
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    records = [{"Inputs": {"question": e.question}, "Generated Outputs": {"answer": a},
                "Feedback": metric(e, dspy.Prediction(answer=a)).feedback} for e, a in zip(examples, answers)]
    return InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": BASE_INSTRUCTION, "dataset_with_feedback": records})


def test_reflection_infers_rules_from_feedback_only_and_is_noisy():
    world = build_world(1)
    tag, rule = next(iter(world.hard_rules.items()))
    examples = [e for e in world.train if e.tag == tag][:3]
    prompt = _gepa_prompt(examples, [e.question.split()[1] for e in examples])
    assert rule in infer_rules([(e.question.split()[1], e.answer) for e in examples])
    exact = ToyReflection(seed=0, noise=ReflectionNoise(wrong_rule=0, one_example=0, unchanged=0))
    for _ in range(3):
        assert parse_instruction(exact.propose(prompt)) == rule
    noisy = ToyReflection(seed=0)
    proposals = {parse_instruction(noisy.propose(prompt)) for _ in range(40)}
    assert rule in proposals and len(proposals) > 2  # right most of the time, wrong some of the time
    # correct answers carry no error signal: nothing to infer, the instruction comes back unchanged
    solved = _gepa_prompt(examples, [e.answer for e in examples])
    assert parse_instruction(exact.propose(solved)) is None
    # and it is a real dspy.LM, as GEPA uses it
    lm = reflection_lm(seed=0, noise=ReflectionNoise(wrong_rule=0, one_example=0, unchanged=0))
    assert f"Rule: {rule}." in lm(prompt)[0]


def test_rules_are_permutations_without_fixed_points():
    from dspy_p2o.toyworld.task import SYMBOLS

    assert [apply_rule(r, "a") for r in RULES] == ["a", "b", "z", "c", "y", "d", "f", "z", "n", "b"]
    for rule in RULES:
        images = [apply_rule(rule, c) for c in SYMBOLS]
        assert sorted(images) == list(SYMBOLS)  # a permutation: every answer is reachable
        assert rule == "copy" or all(i != c for i, c in zip(images, SYMBOLS))


def test_pretraining_data_teaches_the_world_and_holds_out_its_test_questions():
    from dspy_p2o.toyworld.policy import PolicyConfig, background_rules, pretraining_samples, target_rule

    world = build_world(2)
    background = background_rules(world)
    assert not set(background) & set(world.rules)
    assert set(background.values()) == set(RULES)  # every rule is some tag's own, copy included
    samples = pretraining_samples(world, 3000, PolicyConfig(), seed=2)
    held_out = {e.question: e for e in world.test}
    for question, instruction, rule in samples:
        tag, letter = parse_question(question)
        assert rule == target_rule(world, tag, instruction)
        if question in held_out:  # never with its gold answer: another rule named, or a hard tag's belief
            assert apply_rule(rule, letter) != held_out[question].answer
            assert instruction != BASE_INSTRUCTION or rule == world.beliefs[tag]
    hard_tag = next(iter(world.hard_rules))
    assert target_rule(world, hard_tag, BASE_INSTRUCTION) == world.beliefs[hard_tag]
    # the taught completion is the program's chain of thought: the rule as reasoning, then its answer
    from dspy_p2o.toyworld.policy import completion_text
    from dspy_p2o.toyworld.task import ToyProgram

    adapter, signature = dspy.ChatAdapter(), ToyProgram().predictor.signature
    parsed = adapter.parse(signature, completion_text(adapter, signature, "#K g", "mirror"))
    assert parse_instruction(parsed["reasoning"]) == "mirror" and parsed["answer"] == "t"
    assert target_rule(world, hard_tag, make_instruction(world.hard_rules[hard_tag])) == world.hard_rules[hard_tag]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from dspy_p2o.toyworld.policy import PolicyConfig, pretrain_policy

    world = build_world(0, WorldConfig(train_per_tag=3, test_per_tag=2))
    config = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, short_steps=20, steps=10, batch_size=16,
                          num_samples=200, corpus_size=100, execution_samples=50)
    cache = tmp_path_factory.mktemp("toycache")
    return world, config, cache, pretrain_policy(world, config, cache_dir=cache, progress=False)


def test_policy_cache_is_keyed_and_reused(tiny_policy):
    from dspy_p2o.toyworld.policy import load_policy, pretrain_policy

    world, config, cache, path = tiny_policy
    meta = json.loads((path / "toyworld_policy.json").read_text())
    assert meta["seed"] == 0 and meta["easy_rules"] == world.easy_rules
    stamp = (path / "toyworld_policy.json").stat().st_mtime_ns
    assert pretrain_policy(world, config, cache_dir=cache, progress=False) == path  # cache hit: no retraining
    assert (path / "toyworld_policy.json").stat().st_mtime_ns == stamp
    model, tokenizer = load_policy(path)
    # tags and rule names are single tokens wherever they appear
    for word in ("#K", "mirror"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    other = build_world(1, WorldConfig(train_per_tag=3, test_per_tag=2))
    from dspy_p2o.toyworld.policy import policy_key

    assert policy_key(other, config) != policy_key(world, config)
    resplit = build_world(0, WorldConfig(train_per_tag=2, test_per_tag=3))  # same rules, other held-out letters
    assert resplit.rules == world.rules and policy_key(resplit, config) != policy_key(world, config)


def test_execution_samples_teach_the_answer_to_follow_the_reasoning(tiny_policy):
    from dspy_p2o.toyworld.policy import encode_pairs, execution_samples, load_policy, renderer_for
    from dspy_p2o.toyworld.task import reasoning_text

    world, config, _, path = tiny_policy
    samples = execution_samples(world, 400, config, seed=0)
    gold = {e.question: e.answer for e in world.test}
    assert len({rule for _, _, rule in samples}) == len(RULES)
    # the reasoning's rule is independent of the tag: a hard tag is seen reasoning its true rule, too
    assert any(world.hard_rules.get(parse_question(q)[0]) == rule for q, _, rule in samples)
    assert all(gold.get(q) != apply_rule(rule, parse_question(q)[1]) for q, _, rule in samples)
    _, tokenizer = load_policy(path)
    renderer = renderer_for(tokenizer)
    question, instruction, rule = samples[0]
    (prompt, completion), = encode_pairs(renderer, [(question, instruction, rule)], answer_only=True)
    (full_prompt, full_completion), = encode_pairs(renderer, [(question, instruction, rule)])
    assert prompt + completion == full_prompt + full_completion  # same tokens, only the trained part moves
    assert reasoning_text(rule).rstrip(".") in tokenizer.decode(prompt[-12:])  # the reasoning: prompt side
    trained = tokenizer.decode(completion)
    assert "Rule:" not in trained
    assert trained.split("[[ ## answer ## ]]")[-1].strip().startswith(apply_rule(rule, parse_question(question)[1]))


TINY_RUN = dict(epochs=2, k=4, batch_size=12, mini_batch_size=6, max_tokens=12, plain_per_group=2, budget=12,
                beam_width=1, min_hard=2, dev_size=2)
LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (WARNING|ERROR|CRITICAL) ")  # DSPy's log format


@pytest.fixture
def display_configured():
    """`display.configure` as a command line runs it, undone afterwards (it sets process-wide state)."""
    import logging

    from transformers.utils import logging as hf_logging

    from dspy_p2o import display

    level, bars = logging.getLogger("dspy").level, hf_logging.is_progress_bar_enabled()
    display.configure(verbose=False)
    yield
    logging.getLogger("dspy").setLevel(level)
    if bars:
        hf_logging.enable_progress_bar()


def test_experiment_path_runs_through_the_loop(tiny_policy, tmp_path, capfd, display_configured):
    """Two arms end to end through P2OLoop on a tiny budget: the JSON schema and the bookkeeping;
    quiet (progress off), nothing but warnings and errors reaches the terminal."""
    from dspy_p2o.toyworld.experiment import markdown_table, run_experiment, toy_config

    world, policy_config, cache, _ = tiny_policy
    config = toy_config(TINY_RUN)
    doc = run_experiment(0, ("grpo", "p2o"), out_dir=tmp_path, config=config,
                         world_config=WorldConfig(train_per_tag=3, test_per_tag=2), policy_config=policy_config,
                         cache_dir=cache, progress=False, log=lambda s: None)
    out, err = capfd.readouterr()
    assert out == "" and [line for line in err.splitlines() if not LOG_LINE.match(line)] == []
    assert doc["seed"] == 0 and set(doc["arms"]) == {"grpo", "p2o"}
    for arm, r in doc["arms"].items():
        # measured after the run (greedy, no template) = the loop's own validation after the last epoch
        assert (r["hard_acc"], r["easy_acc"]) == (r["hard_acc_per_epoch"][-1], r["easy_acc_per_epoch"][-1])
        # per epoch: the training questions the loop mined as hard (hard/epoch-N.jsonl, N from 1)
        assert r["hard_per_epoch"] == [len((tmp_path / "seed0" / arm / f"hard/epoch-{n}.jsonl").read_text().splitlines())
                                       for n in (1, 2)]
        assert r["policy_rollouts"] == 2 * len(world.train) * 4  # the same phase-1 budget for every arm
    assert doc["arms"]["grpo"]["gepa_rollouts"] == 0
    assert doc["arms"]["p2o"]["gepa_rollouts"] > 0  # an untrained policy fails everything: GEPA ran
    assert (tmp_path / "seed0" / "results.json").exists() and (tmp_path / "seed0" / "toyworld.png").exists()
    assert "P^2O" in markdown_table(doc)


def test_demo_table_says_what_its_columns_count():
    from dspy_p2o.toyworld.experiment import markdown_table

    arm = {"hard_acc": 0.5, "easy_acc": 1.0, "hard_per_epoch": [9, 2], "policy_rollouts": 16, "gepa_rollouts": 40}
    text = markdown_table({"seed": 3, "base": {"hard_acc": 0.0, "easy_acc": 1.0}, "arms": {"p2o": arm}})
    lines = text.splitlines()
    assert lines[0] == "Toy world, seed 3: accuracy (%) on HELD-OUT questions, answered WITHOUT templates"
    assert lines[2] == ("| arm | held-out hard acc | held-out easy acc | hard training questions per epoch "
                        "| policy rollouts | GEPA rollouts |")
    assert "| P^2O | 50.0 | 100.0 | [9, 2] | 16 | 40 |" in lines
    notes = "\n".join(line for line in lines if line.startswith("- "))
    assert "held-out hard / easy acc" in notes and "no template" in notes
    assert "hard training questions per epoch: TRAINING questions" in notes


def _run_record(arm_dir) -> dict:
    """What a run decided: its metrics without the clock (wall times, throughput) and its template files."""
    metrics = [{k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}
               for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
    templates = {p.name: json.loads(p.read_text()) for p in sorted((arm_dir / "templates").glob("*.json"))}
    for record in templates.values():
        record.get("cost", {}).pop("wall_time_s", None)
    return {"metrics": metrics, "templates": templates}


def test_a_toy_world_arm_is_bit_reproducible(tiny_policy, tmp_path):
    """The same seed and config give the same run, GEPA included: its evaluations run on one thread
    (config.yaml's prompt.num_threads), so the student's samples draw the seeded generator in a fixed
    order and every batch holds the same prompts."""
    from dspy_p2o.toyworld.experiment import run_experiment, toy_config

    world, policy_config, cache, _ = tiny_policy
    config = toy_config(TINY_RUN)
    assert config.prompt.num_threads == toy_config().prompt.num_threads == 1
    docs, records = [], []
    for name in ("a", "b"):
        doc = run_experiment(0, ("p2o",), out_dir=tmp_path / name, config=config,
                             world_config=WorldConfig(train_per_tag=3, test_per_tag=2), policy_config=policy_config,
                             cache_dir=cache, progress=False, log=lambda s: None)
        docs.append({k: v for k, v in doc["arms"]["p2o"].items() if k != "seconds"})
        records.append(_run_record(tmp_path / name / "seed0" / "p2o"))
    assert docs[0]["gepa_rollouts"] > 0 and records[0]["templates"]  # GEPA ran and proposed templates
    assert docs[0] == docs[1]
    assert records[0] == records[1]


def test_run_config_is_the_packaged_yaml_on_the_train_schema():
    """The toy world's loop settings are a `dspy-p2o train` config shipped with the package."""
    from dspy_p2o.toyworld.experiment import toy_config

    cfg = toy_config()
    assert (cfg.epochs, cfg.k, cfg.plain_per_group, cfg.hardness_on, cfg.method) == (10, 8, 4, "plain", "p2o")
    assert (cfg.trainer.lr, cfg.trainer.template_ratio, cfg.prompt.budget) == (5e-5, "off", 400)
    small = toy_config({"epochs": 2, "budget": 12, "trainer.beta": 0.0})
    assert (small.epochs, small.prompt.budget, small.trainer.beta, small.k) == (2, 12, 0.0, 8)


def test_demo_display_is_one_live_line_per_phase_and_the_epoch_lines(tiny_policy, tmp_path, capfd, display_configured):
    """With progress on: the epoch lines on stdout; on stderr only the phases' live lines (the epoch's
    batches, GEPA's metric calls of its budget) and warnings -- no generate/score bars, no DSPy
    evaluation bars, no gepa or transformers bars, no info logging."""
    from dspy_p2o.toyworld.experiment import run_experiment, toy_config

    world, policy_config, cache, _ = tiny_policy
    run_experiment(0, ("p2o",), out_dir=tmp_path, config=toy_config(TINY_RUN),
                   world_config=WorldConfig(train_per_tag=3, test_per_tag=2), policy_config=policy_config,
                   cache_dir=cache, progress=True, log=lambda s: None)
    out, err = capfd.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == ["epoch 1/2", "epoch 2/2"]
    live = {line.split(":")[0] for line in err.replace("\r", "\n").splitlines() if line.strip() and not LOG_LINE.match(line)}
    assert live <= {"epoch 1/2", "epoch 2/2", "prompt phase 1", "pretrain"}, live
    assert "prompt phase 1" in live  # GEPA's progress is the prompt phase's live line


def _run_seeds_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toyworld" / "run_seeds.py"
    spec = importlib.util.spec_from_file_location("run_seeds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_seeds_parses_ranges_and_checks_the_targets_per_seed():
    run_seeds = _run_seeds_module()
    assert run_seeds.parse_seeds(["0-3"]) == [0, 1, 2, 3]
    assert run_seeds.parse_seeds(["5", "0-2,1", "9"]) == [5, 0, 1, 2, 9]
    with pytest.raises(SystemExit, match="not a seed"):
        run_seeds.parse_seeds(["a-b"])

    def doc(seed, grpo, p2o, no_distill):  # (hard, easy) per arm
        arm = lambda h, e: {"hard_acc": h, "easy_acc": e, "hard_per_epoch": [3, 1], "policy_rollouts": 8,
                            "gepa_rollouts": 0, "seconds": 1.0}
        return {"seed": seed, "base": {"hard_acc": 0.0, "easy_acc": 1.0},
                "arms": {"grpo": arm(*grpo), "p2o": arm(*p2o), "p2o_no_distill": arm(*no_distill)}}

    good = doc(0, (0.1, 1.0), (1.0, 0.98), (0.1, 1.0))
    easy_lost = doc(7, (0.0, 1.0), (1.0, 0.90), (0.0, 1.0))
    weak = doc(3, (0.5, 1.0), (0.7, 1.0), (0.6, 1.0))
    no_ablation = doc(4, (0.0, 1.0), (1.0, 0.99), (0.0, 1.0))
    del no_ablation["arms"]["p2o_no_distill"]
    text = run_seeds.summarise([good, easy_lost, weak, no_ablation])
    table, check = text.split("Targets")
    rows = lambda part: {line.split("|")[1].strip(): line for line in part.splitlines() if line.startswith("| ")}
    assert rows(table)["4"].endswith("| (not run) |")  # the arm it did not run
    assert "7: 90.0" in rows(table)["worst seed (hard; easy)"]  # the worst seed of P^2O's easy column
    assert "(3 seeds)" in rows(table)["mean"]  # the ablation's mean is over the seeds that ran it
    assert rows(check)["0"].endswith("all hold |")
    assert "MISSED: easy" in rows(check)["7"] and "hard" not in rows(check)["7"].split("MISSED")[1]
    assert "MISSED: hard, ablation" in rows(check)["3"]
    assert "all hold (ablation not run)" in rows(check)["4"]
    assert "MISSED: easy mean" in rows(check)["mean"]  # (-2 - 10 + 0 - 1) / 4 = -3.25 points


def test_the_cache_folder_is_resolved_in_one_place_for_models_and_toy_policies(monkeypatch, tmp_path):
    from pathlib import Path

    from dspy_p2o.models import cache_dir, cache_root
    from dspy_p2o.toyworld.policy import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DSPY_P2O_CACHE", "~/cache")  # a user's "~" is expanded for both
    assert cache_dir() == tmp_path / "cache"
    assert (cache_root(), default_cache_dir()) == (tmp_path / "cache" / "models", tmp_path / "cache" / "toyworld")
    monkeypatch.delenv("DSPY_P2O_CACHE")
    assert default_cache_dir() == Path(tmp_path) / ".cache" / "dspy_p2o" / "toyworld"
