"""Demonstrations as templates: the `fewshot` optimizer's candidates and the rules every demo obeys.

A fewshot candidate is a candidate program like GEPA's: per predictor, the program's own instruction
and a set of demos (`template.Prompt(instruction, demos)`). The demo sets come from DSPy's own
few-shot machinery: `dspy.LabeledFewShot(k)` samples k records of a pool for each predictor, and
DSPy's adapter formats them (a record missing some of a predictor's fields -- a gold answer has no
`reasoning` -- is shown as DSPy shows an incomplete demo). Two pools:

- labeled: training questions with their gold answers;
- bootstrapped: the run's own successful plain rollouts on questions that are not hard (what
  `dspy.BootstrapFewShot` keeps from a successful trace: each call's inputs and parsed outputs),
  one record per question (`bootstrap_record`).

Each candidate is a different seeded sample (the pool shuffled with `seeds.derive_seed` before
LabeledFewShot draws). Candidates are scored on hard_dev like GEPA's, through the same batched
evaluation and under the same metric-call budget; there is no search of their own.

Hygiene, for every template with demos:
- a question is never shown its own gold answer: a demo keeps its question's `id`; a question is
  scored under a template without the demos of itself (`for_question`), and is never assigned a
  template with its own demo (`demo_ids`: the assignment's excluded templates);
- demos count against the context: a candidate whose render (instruction + demos + the question)
  plus max_tokens exceeds the policy's context on some hard question is refused before any
  scoring (`too_long`), with a message naming the question and the token counts.
"""

from __future__ import annotations

import json
import random
from typing import Any, Mapping, Sequence

import dspy

from dspy_p2o.rollouts import over_long
from dspy_p2o.seeds import derive_seed
from dspy_p2o.template import Prompt, Template

DEMO_ID = "id"  # the key under which a demo keeps its question's id (DSPy's adapters format signature fields only)
POOL_CAP = 256  # bootstrapped records kept per epoch (one per question, the first successes)


def demo_record(record: Mapping[str, Any], signature: type[dspy.Signature]) -> dict[str, Any]:
    """A demo for a predictor: the record's values of the signature's fields (those it has) and its question's id."""
    out = {name: record[name] for name in signature.fields if record.get(name) is not None}
    if record.get(DEMO_ID) is not None:
        out[DEMO_ID] = str(record[DEMO_ID])
    return out


def bootstrap_record(rollout: Any, example: Any, renderers: Mapping[str, Any], program_inputs: Sequence[str],
                     threshold: float = 1.0) -> dict[str, Any] | None:
    """A successful plain rollout as a demo record: the program's inputs, every call's inputs and parsed
    outputs (the values a later call reads from an earlier one), and the question's id; None when the
    rollout was templated, did not reach `threshold`, or a call's output does not parse."""
    if rollout.templated or rollout.reward < threshold or not rollout.calls:
        return None
    record: dict[str, Any] = {f: example[f] for f in program_inputs}
    for call in rollout.calls:
        fields = renderers[call.predictor].parse(call.completion_text)
        if fields is None:
            return None
        record.update(call.inputs or {})
        record.update(fields)
    record[DEMO_ID] = str(rollout.example_id)
    return {key: _jsonable(value) for key, value in record.items()}  # kept in state.json


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def propose_demo_sets(program: dspy.Module, pools: Sequence[Sequence[Any]], *, k: int, n: int,
                      seed: int) -> list[Template]:
    """Up to `n` distinct templates, each the program's own instructions with k demos per predictor drawn
    by `dspy.LabeledFewShot(k)` from a pool (the pools taken in turn), the pool shuffled per candidate."""
    pools = [list(p) for p in pools if p]
    out: list[Template] = []
    for i in range(n * 3):  # a small pool repeats samples: try a few more draws than asked
        if len(out) >= n or not pools:
            break
        pool = [r if isinstance(r, dspy.Example) else dspy.Example(**r) for r in pools[i % len(pools)]]
        random.Random(derive_seed(seed, "fewshot", i)).shuffle(pool)
        compiled = dspy.LabeledFewShot(k=k).compile(program, trainset=pool)
        template = Template({name: Prompt(pred.signature.instructions,
                                          tuple(demo_record(d, pred.signature) for d in pred.demos))
                             for name, pred in compiled.named_predictors()})
        if template not in out:
            out.append(template)
    return out


def has_demos(template: Template) -> bool:
    return any(part.demos for part in template.values())


def demo_ids(template: Template) -> set[str]:
    """The questions a template's demos were drawn from."""
    return {str(d[DEMO_ID]) for part in template.values() for d in part.demos or () if d.get(DEMO_ID) is not None}


def for_question(template: Template, question_id: str) -> Template:
    """The template as question `question_id` gets it: without the demos drawn from that question."""
    if not any(str(d.get(DEMO_ID)) == str(question_id) for part in template.values() for d in part.demos or ()):
        return template
    return Template({name: Prompt(part.instruction, None if part.demos is None else
                                  tuple(d for d in part.demos if str(d.get(DEMO_ID)) != str(question_id)))
                     for name, part in template.items()})


def too_long(template: Template, examples: Sequence[Any], renderers: Mapping[str, Any], *,
             program_inputs: Sequence[str], context_length: int | None, max_tokens: int) -> tuple[str, int] | None:
    """(question id, prompt tokens) of the first example whose first call under the template (as that
    question gets it, `for_question`) plus max_tokens exceeds the context, else None (`rollouts.over_long`)."""
    long = over_long(renderers, examples, program_inputs=program_inputs, context_length=context_length,
                     max_tokens=max_tokens, template_for=lambda example: for_question(template, example.id))
    return long[0] if long else None
