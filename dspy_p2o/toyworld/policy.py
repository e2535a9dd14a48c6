"""The toy world's base policy: a tiny Qwen3 pretrained offline in two to three minutes.

The tokenizer is a BPE trained on rendered DSPy prompts (so the ChatAdapter boilerplate
costs a few tokens) with each tag as one added token (and so is each rule name). The model is taught, on the adapter's own output
format, to
  * apply the rule an instruction names ("Transform the letter. Rule: mirror."),
  * apply the rule of every tag it knows (the world's easy tags and background tags),
  * apply a wrong rule (its belief) for each hard tag, whose true rule it never sees
    without an instruction, and copy the letter for tags it does not know.
Pretrained weights are cached on disk keyed by the seed and the configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dspy_p2o.models import cache_dir
from dspy_p2o.toyworld.task import (BASE_INSTRUCTION, DEFAULT_RULE, RULES, SYMBOLS, TAGS, ToyProgram, World,
                                    apply_rule, make_instruction, parse_instruction, parse_question,
                                    reasoning_text)

CACHE_VERSION = 7  # bump whenever the pretraining data or format changes


@dataclass(frozen=True)
class PolicyConfig:
    """Size of the base policy and of its pretraining."""

    vocab_size: int = 512
    hidden_size: int = 96  # measured: 64 executed the ten rules imperfectly (easy 69-92% held out)
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    short_steps: int = 1400  # curriculum phase 1: prompts without DSPy's constant preamble
    steps: int = 300  # phase 2: the full rendered prompts
    batch_size: int = 32
    lr: float = 1e-3  # measured: 4e-3 left some seeds on the chance plateau for 2000 steps
    num_samples: int = 4000  # distinct pretraining questions (rendering dominates data preparation)
    corpus_size: int = 600  # rendered prompts the tokenizer is trained on
    instructed_fraction: float = 0.65  # pretraining prompts whose instruction names a rule
    execution_samples: int = 1000  # extra questions whose reasoning names a random rule; only the answer is taught


def default_cache_dir() -> Path:
    """Where base policies are cached: `dspy_p2o.models.cache_dir()/toyworld`."""
    return cache_dir() / "toyworld"


def policy_key(world: World, config: PolicyConfig) -> str:
    # The held-out questions are part of the key: pretraining leaves them out, so a policy cached for
    # another split (another WorldConfig) would have seen this split's test questions.
    blob = json.dumps({"v": CACHE_VERSION, "seed": world.seed, "rules": world.rules, "beliefs": world.beliefs,
                       "cfg": asdict(config), "held_out": sorted(e.question for e in world.test)}, sort_keys=True)
    return f"seed{world.seed}-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def renderer_for(tokenizer: Any, program: ToyProgram | None = None):
    from dspy_p2o.renderer import Renderer

    return Renderer((program or ToyProgram()).predictor, tokenizer)


def sample_instruction(rng: random.Random, config: PolicyConfig) -> str:
    """A pretraining instruction: the program's own, or one naming a random rule."""
    if rng.random() >= config.instructed_fraction:
        return BASE_INSTRUCTION
    return make_instruction(rng.choice(list(RULES)))


def background_rules(world: World) -> dict[str, str]:
    """Rules for the tags outside the world: every non-default rule once, the remaining tags copy.

    Measured: with only the world's three easy tags applying rules on their own, the policy
    memorised (tag, letter) pairs and got 5-26% of held-out easy questions; with every rule
    also applied by other tags it learns "a tag selects a rule" and generalises (97%).
    The tag -> rule mechanism is what context distillation has to re-point for a hard tag.
    """
    others = [t for t in TAGS if t not in world.rules]
    rules = [r for r in RULES if r != DEFAULT_RULE]
    random.Random(f"background-{world.seed}").shuffle(rules)
    return {tag: rules[i] if i < len(rules) else DEFAULT_RULE for i, tag in enumerate(others)}


def target_rule(world: World, tag: str, instruction: str, background: dict[str, str] | None = None) -> str:
    """What the base policy is taught: the named rule, else the tag's own rule (its belief for a hard tag)."""
    background = background_rules(world) if background is None else background
    return (parse_instruction(instruction) or world.easy_rules.get(tag) or world.beliefs.get(tag)
            or background.get(tag, DEFAULT_RULE))


def pretraining_samples(world: World, n: int, config: PolicyConfig, seed: int) -> list[tuple[str, str, str]]:
    """(question, instruction, rule) triples: the policy is taught to reason "Rule: <rule>." and apply it.

    A held-out question appears only with an answer that is not its gold one: under an instruction
    naming another rule, or a hard tag's without an instruction (the base policy answers it with
    its belief: part of the world, not a leak). Measured: with held-out questions excluded
    altogether, the answer step also keyed on the (tag, letter) pair and missed 8-18% of held-out
    easy letters whose tag it reasoned right (RESULTS.md §5).
    """
    rng = random.Random(f"pretrain-{seed}")
    gold = {e.question: e.answer for e in world.test}
    background = background_rules(world)
    out = []
    while len(out) < n:
        tag = rng.choice(TAGS)
        letter = rng.choice(SYMBOLS)
        question = f"{tag} {letter}"
        instruction = sample_instruction(rng, config)
        rule = target_rule(world, tag, instruction, background)
        if question in gold and apply_rule(rule, letter) == gold[question]:
            continue
        out.append((question, instruction, rule))
    return out


def execution_samples(world: World, n: int, config: PolicyConfig, seed: int) -> list[tuple[str, str, str]]:
    """(question, instruction, rule) triples whose reasoning names a random rule, any tag.

    Trained on the answer only (`encode_pairs(..., answer_only=True)`): the answer step learns
    to apply the rule its reasoning names, whatever the tag or instruction says. Measured
    without them: P^2O re-pointed the reasoning of held-out hard questions (38 of 39 right)
    but the answer kept following the tag (15 of 39 right).
    """
    rng = random.Random(f"execute-{seed}")
    gold = {e.question: e.answer for e in world.test}
    out = []
    while len(out) < n:
        question = f"{rng.choice(TAGS)} {rng.choice(SYMBOLS)}"
        rule = rng.choice(list(RULES))
        if gold.get(question) == apply_rule(rule, parse_question(question)[1]):
            continue  # held-out questions are never taught their gold answer
        out.append((question, sample_instruction(rng, config), rule))
    return out


def completion_text(adapter, signature, question: str, rule: str) -> str:
    """The completion the base policy is taught: the rule as reasoning, then its answer."""
    answer = apply_rule(rule, parse_question(question)[1])
    return adapter.format_assistant_message_content(signature, {"reasoning": reasoning_text(rule), "answer": answer})


def build_tokenizer(world: World, config: PolicyConfig):
    """BPE on rendered prompts + completions; tags become single added tokens."""
    import dspy

    from dspy_p2o.tiny import train_tokenizer

    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    signature = ToyProgram().predictor.signature
    texts = []
    for question, instruction, rule in pretraining_samples(world, config.corpus_size, config, seed=-1):
        messages = adapter.format(signature.with_instructions(instruction), [], {"question": question})
        completion = completion_text(adapter, signature, question, rule)
        texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
                     + f"<|im_start|>assistant\n{completion}<|im_end|>")
    tokenizer = train_tokenizer(texts, config.vocab_size)
    # Tags and rule names as whole tokens: the same token in the question, the instruction and the
    # reflection's proposals, so reading "Tag #K: reverse." is a lookup, not a spelling exercise.
    tokenizer.add_tokens(list(TAGS) + list(RULES))
    return tokenizer


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with n intra-op threads. A model this small gains nothing from more, and on a busy
    machine extra threads spin against other processes (benchmarks/toyworld/RESULTS.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_policy(path: str | Path):
    """(model, tokenizer) of a cached base policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def pretrain_policy(world: World, config: PolicyConfig | None = None, *, cache_dir: str | Path | None = None,
                    progress: bool = True, force: bool = False) -> Path:
    """The directory of the base policy for `world`: loaded from the cache or pretrained now (~3 min on one core)."""
    config = config or PolicyConfig()
    out = Path(cache_dir or default_cache_dir()) / policy_key(world, config)
    if (out / "toyworld_policy.json").exists() and not force:
        return out
    start = time.time()
    tokenizer = build_tokenizer(world, config)
    model = fresh_model(tokenizer, config, world.seed)
    renderer = renderer_for(tokenizer)
    pairs = encode_pairs(renderer, pretraining_samples(world, config.num_samples, config, world.seed))
    pairs += encode_pairs(renderer, execution_samples(world, config.execution_samples, config, world.seed),
                          answer_only=True)
    losses = curriculum(model, [pairs], config, world.seed, tokenizer.pad_token_id, progress)
    save_policy(out, model, tokenizer, {"seed": world.seed, "config": asdict(config), "easy_rules": world.easy_rules,
                                        "final_loss": losses[-1], "seconds": round(time.time() - start, 1)})
    return out


def fresh_model(tokenizer: Any, config: PolicyConfig, seed: int):
    """A randomly initialised tiny Qwen3 of `config`'s size for `tokenizer` (torch seeded with `seed`)."""
    from transformers import AutoModelForCausalLM

    from dspy_p2o.tiny import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(
        tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, max_positions=512))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def curriculum(model, groups: Sequence[list[tuple[list[int], list[int]]]], config: PolicyConfig, seed: int,
               pad_id: int, progress: bool) -> list[float]:
    """The pretraining curriculum on one torch thread; returns the losses. `groups` are lists of
    (prompt, completion) pairs that share a constant preamble (one per predictor).

    First without each group's constant preamble (the adapter's ~26 tokens every prompt of a
    predictor starts with), then on the full prompts. Measured (two-digit world): on full prompts
    the digits stayed at chance for 450 steps (attention diluted over the preamble); on the
    shortened prompts they are learned, and RoPE's relative positions carry over."""
    from dspy_p2o.tiny import supervised_finetune

    pairs, short = [], []
    for group in groups:
        preamble = len(os.path.commonprefix([p for p, _ in group[:200]]))
        pairs += group
        short += [(p[max(0, preamble - 1):], c) for p, c in group]
    with torch_threads(1):
        losses = supervised_finetune(model, short, steps=config.short_steps, lr=config.lr,
                                     batch_size=config.batch_size, seed=seed, pad_id=pad_id, progress=progress)
        losses += supervised_finetune(model, pairs, steps=config.steps, lr=config.lr / 2, batch_size=config.batch_size,
                                      seed=seed + 1, pad_id=pad_id, progress=progress)
    return losses


def save_policy(out: Path, model, tokenizer, meta: dict[str, Any]) -> None:
    """`save_pretrained` model and tokenizer plus toyworld_policy.json (`meta` and the parameter count)
    into `out`, written to a temporary dir and renamed: an interrupted run never leaves half a cache entry."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {**meta, "params": sum(p.numel() for p in model.parameters())}
    (tmp / "toyworld_policy.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def encode_pairs(renderer, samples: Sequence[tuple[str, str, str]], *,
                 answer_only: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per sample; `answer_only` moves the reasoning into the
    prompt side, so that only the answer is trained (the split is at a token boundary)."""
    tok = renderer.tokenizer
    pairs = []
    for question, instruction, rule in samples:
        prompt = renderer.render({"question": question}, instruction).token_ids
        text = completion_text(renderer.adapter, renderer.signature, question, rule)
        completion = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if answer_only:
            cut = _answer_start(tok, completion, text.index(reasoning_text(rule)) + len(reasoning_text(rule)))
            prompt, completion = prompt + completion[:cut], completion[cut:]
        pairs.append((prompt, completion))
    return pairs


def _answer_start(tok, ids: list[int], chars: int) -> int:
    """The first token index whose decoded prefix covers `chars` characters of the text."""
    for i in range(len(ids) + 1):
        if len(tok.decode(ids[:i])) >= chars:
            return i
    raise ValueError("the reasoning is longer than the completion")


__all__ = ["PolicyConfig", "pretrain_policy", "load_policy", "renderer_for", "policy_key",
           "default_cache_dir", "parse_question"]
