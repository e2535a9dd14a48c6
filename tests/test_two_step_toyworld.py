"""The two-step toy world (toyworld/two_step.py): program, pretraining data, rendering and the
accuracy measurement, checked without pretraining a policy (a scripted engine plays the base policy)."""

from __future__ import annotations

import re

import pytest

from dspy_p2o.engines.base import Completion, GenerationOutput
from dspy_p2o.toyworld.policy import PolicyConfig, target_rule
from dspy_p2o.toyworld.task import RULES, apply_rule, build_world, make_instruction, parse_instruction, parse_question
from dspy_p2o.toyworld.two_step import (APPLY_INSTRUCTION, NAME_INSTRUCTION, TWO_STEP_POLICY, TwoStepProgram,
                                        apply_samples, build_tokenizer, encode_calls, name_samples,
                                        renderers_for, step_one_template, two_step_key)
from dspy_p2o.toyworld.task import greedy_accuracy

SMALL = PolicyConfig(corpus_size=60, num_samples=300, execution_samples=300)


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world, SMALL)


def test_the_program_names_the_rule_then_applies_it():
    program = TwoStepProgram()
    predictors = dict(program.named_predictors())
    assert list(predictors) == ["name", "apply"]
    assert predictors["name"].signature.instructions == NAME_INSTRUCTION
    assert list(predictors["name"].signature.input_fields) == ["question"]
    assert list(predictors["name"].signature.output_fields) == ["rule"]
    assert predictors["apply"].signature.instructions == APPLY_INSTRUCTION
    assert list(predictors["apply"].signature.input_fields) == ["question", "rule"]
    assert list(predictors["apply"].signature.output_fields) == ["answer"]


def test_step_one_is_taught_the_belief_of_a_hard_tag_and_the_rule_an_instruction_names(world):
    for tag, rule in world.hard_rules.items():
        assert target_rule(world, tag, NAME_INSTRUCTION) == world.beliefs[tag] != rule
        assert target_rule(world, tag, world.oracle_instruction(tag)) == rule
    samples = name_samples(world, 2000, SMALL, seed=0)
    seen = {"belief": 0, "named": 0}
    for inputs, instruction, outputs in samples:
        tag, _ = parse_question(inputs["question"])
        named = parse_instruction(instruction)
        if named:
            assert outputs["rule"] == named
            seen["named"] += 1
        else:
            assert instruction is None  # the predictor's own instruction
            assert outputs["rule"] == (world.easy_rules.get(tag) or world.beliefs.get(tag) or outputs["rule"])
            seen["belief"] += tag in world.beliefs
    assert seen["belief"] and seen["named"]


def test_step_two_applies_its_rule_input_whatever_the_instruction_names(world):
    samples = apply_samples(world, 2000, SMALL, seed=0)
    ignored = 0
    for inputs, instruction, outputs in samples:
        assert outputs["answer"] == apply_rule(inputs["rule"], parse_question(inputs["question"])[1])
        named = parse_instruction(instruction)
        ignored += named is not None and named != inputs["rule"]
    assert ignored > 500
    assert {i["rule"] for i, _, _ in samples} == set(RULES)


def test_no_held_out_question_is_taught_its_gold_answer(world):
    gold = {e.question: e.answer for e in world.test}
    for inputs, _, outputs in name_samples(world, 4000, SMALL, seed=0):
        q = inputs["question"]
        assert q not in gold or apply_rule(outputs["rule"], parse_question(q)[1]) != gold[q]
    for inputs, _, outputs in apply_samples(world, 4000, SMALL, seed=0):
        assert gold.get(inputs["question"]) != outputs["answer"]


def test_pretraining_calls_render_through_each_predictors_renderer(world, tokenizer):
    renderers = renderers_for(tokenizer)
    calls = ([("name", *s) for s in name_samples(world, 20, SMALL, 0)]
             + [("apply", *s) for s in apply_samples(world, 20, SMALL, 0)])
    encoded = encode_calls(renderers, calls)
    assert {n: len(p) for n, p in encoded.items()} == {"name": 20, "apply": 20}
    for (name, inputs, instruction, outputs), (prompt, completion) in zip(calls, encoded["name"] + encoded["apply"]):
        renderer = renderers[name]
        assert prompt == renderer.render(inputs, instruction).token_ids
        assert (instruction or renderer.instruction) in tokenizer.decode(prompt)
        assert completion[-1] == tokenizer.eos_token_id
        assert renderer.parse(tokenizer.decode(completion[:-1])) == outputs
    # every tag and rule name is one token
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in ["#K", "mirror", "swap"])


class ScriptedPolicy:
    """Plays the designed base policy: step 1 answers target_rule (belief for a hard tag unless the
    instruction names a rule), step 2 applies its rule input."""

    def __init__(self, world, tokenizer):
        self.world, self.tokenizer = world, tokenizer

    def answer(self, prompt: str) -> str:
        question = re.search(r"\[\[ ## question ## \]\]\n(#[A-Z] [a-z])\n", prompt).group(1)
        instruction = re.search(r"your objective is: \n\s*(.*?)<\|im_end\|>", prompt, re.S).group(1)
        rule = re.search(r"user\n.*\[\[ ## rule ## \]\]\n([a-z]+)\n", prompt, re.S)
        if rule is None:  # step 1
            return f"[[ ## rule ## ]]\n{target_rule(self.world, parse_question(question)[0], instruction)}\n\n" \
                   "[[ ## completed ## ]]"
        return f"[[ ## answer ## ]]\n{apply_rule(rule.group(1), parse_question(question)[1])}\n\n[[ ## completed ## ]]"

    def generate(self, prompts, n=1, **kwargs):
        assert kwargs["temperature"] == 0.0
        outs = []
        for p in prompts:
            text = self.answer(self.tokenizer.decode(p))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            outs.append(GenerationOutput(list(p), [Completion(ids, text, [0.0] * len(ids), "stop")] * n))
        return outs


def test_hard_questions_need_the_right_step_one_instruction(world, tokenizer):
    engine = ScriptedPolicy(world, tokenizer)
    hard, easy = world.split("test", "hard"), world.split("test", "easy")
    program = TwoStepProgram()
    assert greedy_accuracy(engine, program, hard, max_tokens=12) == 0.0
    assert greedy_accuracy(engine, program, easy, max_tokens=12) == 1.0
    oracle = greedy_accuracy(engine, program, hard, max_tokens=12,
                             template=lambda e: step_one_template(world.oracle_instruction(e.tag)))
    assert oracle == 1.0
    wrong = next(r for r in RULES if r not in world.hard_rules.values() and r not in world.beliefs.values())
    assert greedy_accuracy(engine, program, hard, max_tokens=12,
                           template=lambda e: step_one_template(make_instruction(wrong))) == 0.0


def test_the_cache_key_is_its_own_and_follows_the_world_and_config(world):
    key = two_step_key(world, TWO_STEP_POLICY)
    assert key.startswith("two_step-seed0-") and key == two_step_key(build_world(0), TWO_STEP_POLICY)
    assert key != two_step_key(world, SMALL) and key != two_step_key(build_world(1), TWO_STEP_POLICY)
