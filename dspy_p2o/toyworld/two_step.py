"""The two-step toy world: P^2O on a COMPOUND DSPy program (results: benchmarks/toyworld/RESULTS.md).

The world, its rules, tags, beliefs, splits, metric and reflection LM are the one-step toy
world's (task.py, reflection.py). The program has two predictors sharing the policy:

  * ``name``  (question -> rule): "Name the rule for the tag." -- the step that decides;
  * ``apply`` (question, rule -> answer): "Apply the rule to the letter." -- executes the rule
    it is given.

The base policy is pretrained so that the decision lives in step 1 only: ``name`` is taught
`policy.target_rule` (the rule an instruction names, else the tag's own rule -- for a hard tag
its wrong belief), ``apply`` is taught to apply its ``rule`` input whatever its instruction says.
A hard question is then solved only when ``name``'s instruction names the true rule: GRPO sees
zero-reward groups, GEPA's candidate programs {name: ..., apply: ...} unlock the hard tags
through ``name``'s instruction, and context distillation (each templated call trained on its
predictor's ORIGINAL render, trainer/grpo.py) moves that into the weights of step 1.

The experiment runs `experiment.run_arm` (the same `P2OLoop` path, config, seed and reflection
LM as the one-step world) with this program and measures held-out accuracy WITHOUT templates
by executing the whole program greedily (`task.greedy_accuracy`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy

from dspy_p2o.toyworld.policy import (PolicyConfig, curriculum, default_cache_dir, execution_samples, fresh_model,
                                      policy_key, pretraining_samples, save_policy, torch_threads)
from dspy_p2o.template import Template
from dspy_p2o.toyworld.task import (BASE_INSTRUCTION, RULES, TAGS, World, apply_rule, greedy_accuracy, parse_question)

TWO_STEP_VERSION = 1  # bump whenever the two-step pretraining data or format changes


class NameRule(dspy.Signature):
    """Name the rule for the tag."""

    question: str = dspy.InputField()
    rule: str = dspy.OutputField()


class ApplyRule(dspy.Signature):
    """Apply the rule to the letter."""

    question: str = dspy.InputField()
    rule: str = dspy.InputField()
    answer: str = dspy.OutputField()


NAME_INSTRUCTION = NameRule.instructions  # "Name the rule for the tag."
APPLY_INSTRUCTION = ApplyRule.instructions  # "Apply the rule to the letter."


class TwoStepProgram(dspy.Module):
    """Step 1 names the rule for the question's tag, step 2 applies the named rule to its letter."""

    def __init__(self) -> None:
        super().__init__()
        self.name = dspy.Predict(NameRule)
        self.apply = dspy.Predict(ApplyRule)

    def forward(self, question: str) -> dspy.Prediction:
        rule = self.name(question=question).rule
        return self.apply(question=question, rule=rule)


# The pretraining policy of the two-step world: the one-step world's PolicyConfig, its `num_samples`
# read as step-1 samples and `execution_samples` as step-2 samples. Measured (seed 0, RESULTS.md):
# with the one-step steps (1400 + 300) and 3000 step-2 samples, step 1 named every rule right but
# step 2 applied the given rule to 5 of 39 held-out easy letters (whole program: easy 12.8%); with
# 8000 step-2 samples (two thirds of each batch) and 2400 + 400 steps: easy 100, hard 0, oracle 100.
TWO_STEP_POLICY = PolicyConfig(execution_samples=8000, short_steps=2400, steps=400)


def step_instruction(instruction: str) -> str | None:
    """A pretraining instruction for one predictor: the one-step world's plain instruction becomes
    the predictor's own (None: rendered with the signature's instruction); an instruction naming a
    rule ("Transform the letter. Rule: X.", what the reflection LM proposes) is kept."""
    return None if instruction == BASE_INSTRUCTION else instruction


def name_samples(world: World, n: int, config: PolicyConfig, seed: int) -> list[tuple[dict, str | None, dict]]:
    """Step 1's pretraining calls: (inputs, instruction or None, outputs) with outputs {rule: target_rule(...)}.

    The (question, instruction, rule) triples are the one-step world's `pretraining_samples`: the
    rule an instruction names, else the tag's own (a hard tag's belief); no held-out question
    appears with the rule that gives its gold answer."""
    return [({"question": q}, step_instruction(i), {"rule": rule})
            for q, i, rule in pretraining_samples(world, n, config, seed)]


def apply_samples(world: World, n: int, config: PolicyConfig, seed: int) -> list[tuple[dict, str | None, dict]]:
    """Step 2's pretraining calls: a random rule as input, any tag, any instruction (often one
    naming ANOTHER rule, which must be ignored); the output applies the input rule.

    The triples are the one-step world's `execution_samples` (held-out questions never with their
    gold answer)."""
    return [({"question": q, "rule": rule}, step_instruction(i),
             {"answer": apply_rule(rule, parse_question(q)[1])})
            for q, i, rule in execution_samples(world, n, config, seed)]


def two_step_key(world: World, config: PolicyConfig) -> str:
    """Cache key: the one-step key (seed, rules, beliefs, config, held-out questions) plus this module's version."""
    blob = json.dumps({"v": TWO_STEP_VERSION, "one_step": policy_key(world, config)}, sort_keys=True)
    return f"two_step-seed{world.seed}-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def predictor_map(program: TwoStepProgram | None = None) -> dict[str, dspy.Predict]:
    return dict((program or TwoStepProgram()).named_predictors())


def renderers_for(tokenizer: Any, program: TwoStepProgram | None = None, adapter: dspy.Adapter | None = None):
    """One Renderer per predictor, named as P2OLoop names them (ChatAdapter without JSON fallback by default)."""
    from dspy_p2o.renderer import Renderer

    return {name: Renderer(p, tokenizer, adapter=adapter, name=name) for name, p in predictor_map(program).items()}


def _samples(world: World, config: PolicyConfig, seed: int, n_name: int, n_apply: int):
    """(predictor name, inputs, instruction, outputs) for both steps."""
    return ([("name", *s) for s in name_samples(world, n_name, config, seed)]
            + [("apply", *s) for s in apply_samples(world, n_apply, config, seed)])


def build_tokenizer(world: World, config: PolicyConfig):
    """BPE on rendered two-step prompts + completions; tags and rule names become single added tokens."""
    from dspy_p2o.tiny import train_tokenizer

    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    predictors = predictor_map()
    texts = []
    n = config.corpus_size // 2
    for name, inputs, instruction, outputs in _samples(world, config, -1, n, n):
        sig = predictors[name].signature
        sig = sig if instruction is None else sig.with_instructions(instruction)
        messages = adapter.format(sig, [], inputs)
        texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
                     + f"<|im_start|>assistant\n{adapter.format_assistant_message_content(sig, outputs)}<|im_end|>")
    tokenizer = train_tokenizer(texts, config.vocab_size)
    tokenizer.add_tokens(list(TAGS) + list(RULES))
    return tokenizer


def encode_calls(renderers, calls) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(prompt ids, completion ids + EOS) per call, grouped by predictor; rendered by each predictor's Renderer."""
    out: dict[str, list[tuple[list[int], list[int]]]] = {name: [] for name in renderers}
    for name, inputs, instruction, outputs in calls:
        renderer = renderers[name]
        tok = renderer.tokenizer
        prompt = renderer.render(inputs, instruction).token_ids
        text = renderer.adapter.format_assistant_message_content(renderer.signature, outputs)
        out[name].append((prompt, tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    return out


def pretrain_two_step(world: World, config: PolicyConfig | None = None, *, cache_dir: str | Path | None = None,
                      progress: bool = True, force: bool = False) -> Path:
    """The directory of the two-step base policy for `world`: loaded from the cache or pretrained now,
    with the one-step world's model, curriculum (the preamble cut per predictor: the two system
    messages differ early) and atomic cache write (policy.py)."""
    config = config or TWO_STEP_POLICY
    out = Path(cache_dir or default_cache_dir()) / two_step_key(world, config)
    if (out / "toyworld_policy.json").exists() and not force:
        return out
    start = time.time()
    tokenizer = build_tokenizer(world, config)
    model = fresh_model(tokenizer, config, world.seed)
    by_predictor = encode_calls(renderers_for(tokenizer),
                                _samples(world, config, world.seed, config.num_samples, config.execution_samples))
    losses = curriculum(model, list(by_predictor.values()), config, world.seed, tokenizer.pad_token_id, progress)
    save_policy(out, model, tokenizer, {"seed": world.seed, "program": "two_step", "config": asdict(config),
                                        "final_loss": losses[-1], "seconds": round(time.time() - start, 1)})
    return out


def base_accuracy(world: World, policy_dir: Path, max_tokens: int) -> dict[str, float]:
    """The base policy, no template: held-out hard (0 by construction), easy; hard with the oracle
    instruction in step 1 (what GEPA should find), each one greedy execution of the whole program."""
    from dspy_p2o.engines import LocalEngine

    engine, program = LocalEngine(policy_dir, device="cpu"), TwoStepProgram()
    hard, easy = world.split("test", "hard"), world.split("test", "easy")
    return {"hard_acc": greedy_accuracy(engine, program, hard, max_tokens=max_tokens),
            "easy_acc": greedy_accuracy(engine, program, easy, max_tokens=max_tokens),
            "hard_acc_oracle": greedy_accuracy(engine, program, hard, max_tokens=max_tokens,
                                               template=lambda e: step_one_template(world.oracle_instruction(e.tag)))}


def step_one_template(instruction: str) -> Template:
    """A template giving step 1 (`name`) `instruction` and step 2 (`apply`) its own."""
    return Template({"name": instruction, "apply": APPLY_INSTRUCTION})


@dataclass
class TwoStepRun:
    seed: int
    base: dict[str, float]
    arms: dict[str, dict[str, Any]]
    world: dict[str, dict[str, str]]
    policy_seconds: float
    seconds: float
    config: dict[str, Any]  # the loop's settings it ran with (a finished seed is reused only under the same)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_two_step(seed: int, arms: Sequence[str] = ("grpo", "p2o"), *, out_dir: str | Path = "runs/toyworld_two_step",
                 config=None, policy_config: PolicyConfig | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrain (or load) the two-step base policy and run each arm through `experiment.run_arm`."""
    from dspy_p2o.toyworld.experiment import run_arm, toy_config
    from dspy_p2o.toyworld.task import build_world

    config = config or toy_config()
    world = build_world(seed)
    out_dir = Path(out_dir) / f"seed{seed}"
    t0 = time.time()
    log(f"[two-step] seed {seed}: easy rules {world.easy_rules}, hard rules {world.hard_rules}")
    policy_dir = pretrain_two_step(world, policy_config, cache_dir=cache_dir, progress=progress)
    policy_seconds = round(time.time() - t0, 1)
    log(f"[two-step] base policy ready in {policy_seconds:.0f}s: {policy_dir}")
    with torch_threads(1):
        base = base_accuracy(world, policy_dir, config.max_tokens)
    log(f"[two-step] base policy without templates: hard {base['hard_acc']:.2f}, easy {base['easy_acc']:.2f}; "
        f"hard with the oracle instruction in step 1: {base['hard_acc_oracle']:.2f}")

    results: dict[str, Any] = {}
    for arm in arms:
        log(f"[two-step] arm {arm} ...")
        with torch_threads(1):
            r = run_arm(arm, world, policy_dir, out_dir, config, progress=progress, program=TwoStepProgram())
        results[arm] = r.to_json()
        log(f"[two-step] arm {arm}: hard {r.hard_acc:.2f}, easy {r.easy_acc:.2f}, hard per epoch "
            f"{r.hard_per_epoch} ({r.seconds:.0f}s)")
    return TwoStepRun(seed, base, results, {"easy": world.easy_rules, "hard": world.hard_rules,
                                            "beliefs": world.beliefs}, policy_seconds,
                      round(time.time() - t0, 1), config.redacted()).to_json()
