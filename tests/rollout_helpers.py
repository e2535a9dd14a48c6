"""Collecting rollouts in tests: `collect` is `rollouts.collect_rollouts` with the program's renderers
built, the metric made safe and templates given in short form (an instruction for a one-predictor
program, {predictor: instruction} for several)."""

from __future__ import annotations

import dspy

from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.renderer import program_renderers
from dspy_p2o.rewards import safe_metric
from dspy_p2o.rollouts import collect_rollouts
from dspy_p2o.template import Template

ADAPTER = dspy.ChatAdapter(use_json_adapter_fallback=False)


def template(program: dspy.Module, z) -> Template:
    """A Template from an instruction (one-predictor program) or a {predictor: instruction} dict."""
    if isinstance(z, Template):
        return z
    if isinstance(z, str):
        (name, _), = program.named_predictors()
        return Template({name: z})
    return Template(z)


def collect(engine, program, examples, metric, *, k, temperature=1.0, max_tokens=16, seed=None, assignments=None,
            plain_per_group=0, adapter=ADAPTER, renderers=None, **kwargs):
    renderers = renderers or program_renderers(program, engine.tokenizer, adapter)
    assignments = {q: [template(program, z) for z in zs] for q, zs in (assignments or {}).items()}
    return collect_rollouts(engine, program, renderers, examples, safe_metric(metric), k=k,
                            sampling=SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed),
                            assignments=assignments, plain_per_group=plain_per_group, **kwargs)


def instruction(z) -> str:
    """The instruction of a one-predictor program's template, from its JSON (templates/epoch-N.json) or a Template."""
    (part,) = (Template.from_json(z)).values()
    return part.instruction
