"""How the prompt phase evaluates candidates: GEPA's adapter, on the batched rollout path.

`PhaseAdapter` is DSPy's own `DspyAdapter` (its candidate programs, its reflective dataset from
traces, so the reflection prompts stay DSPy's) with evaluation replaced when the student is the
policy engine (`PolicyStudent`): every (candidate, example) pair GEPA asks for in one call -- a
minibatch, the W parents or children of a round, the dev set of the selected children -- is one
execution in ONE `rollouts.collect_rollouts` (k = 1, at the run's temperature), so each round of
predictor calls over all of them is one batched `engine.generate`, as phase 1's rollouts are. The
collector's rounds form at quiescent points and every evaluation's sampling seed comes from the
phase's seed and the evaluation's number (`seeds.derive_seed`), so results do not depend on thread
timing; the number is kept in gepa's saved state, so a resumed phase continues the same sequence.

Given a DSPy LM instead (`student=dspy.LM`), evaluation is DSPy's own (`dspy.Evaluate`, threaded,
one LM call at a time): the reference path, which the batched one reproduces at temperature 0.

A trajectory is what DSPy's `bootstrap_trace_data` records -- the example, the program's
prediction, its trace of (predictor, inputs, outputs) and the score -- built from the rollout's
calls; an output outside the adapter's format is DSPy's `FailedPrediction`, and an execution whose
program code raised is left out, as DSPy leaves it out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import dspy
from dspy.teleprompt.bootstrap_trace import FailedPrediction
from dspy.teleprompt.gepa.gepa_utils import DspyAdapter
from gepa import EvaluationBatch

from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.prompt_phase.bill import Bill
from dspy_p2o.renderer import Renderer, predictors_of, program_input_fields
from dspy_p2o.rollouts import collect_rollouts
from dspy_p2o.seeds import derive_seed
from dspy_p2o.template import Template

logger = logging.getLogger(__name__)


@dataclass
class PolicyStudent:
    """The policy as the prompt phase's student: evaluations go to `engine` as batched rounds through
    the run's `renderers`, sampled with `sampling` (its seed is set per evaluation)."""

    engine: Any
    renderers: Mapping[str, Renderer]
    sampling: SamplingParams
    max_live: int = 1024  # concurrent program executions of one collection


def template_of(program: dspy.Module) -> Template:
    """The template a (candidate) program carries: every predictor's instruction, in `named_predictors()` order."""
    named = predictors_of(program)
    if not named:
        raise ValueError(f"{type(program).__name__} has no predictors; the prompt phase evolves predictor instructions")
    return Template.from_candidate({name: pred.signature.instructions for name, pred in named})


def program_with(program: dspy.Module, template: Template) -> dspy.Module:
    """A deep copy of `program` with the template's instructions (and demos, where it sets them) on its
    predictors and every predictor's `lm` set to None: all of them run on the student LM of the
    surrounding `dspy.context` (an LM object does not deep-copy). The template must name exactly
    the program's predictors."""
    names = [name for name, _ in predictors_of(program)]
    if not names:
        raise ValueError(f"{type(program).__name__} has no predictors; the prompt phase evolves predictor instructions")
    if not isinstance(template, Template):
        raise ValueError(f"a template is a dspy_p2o.template.Template, got {type(template).__name__}")
    missing, unknown = [n for n in names if n not in template], [n for n in template if n not in names]
    if missing or unknown:
        raise ValueError(f"template does not match {type(program).__name__}'s predictors {names}: "
                         f"missing {missing}, unknown {unknown}")
    prog = program.deepcopy()
    for name, pred in predictors_of(prog):
        pred.signature = pred.signature.with_instructions(template[name].instruction)
        if template[name].demos is not None:
            pred.demos = [dspy.Example(**d) for d in template[name].demos]
        pred.lm = None
    return prog


def _feedback_fn(metric: Callable, pred_name: str, predictor: Any) -> Callable:
    """dspy.GEPA's per-predictor feedback function (as `GEPA.compile` builds it) for DspyAdapter."""

    def feedback_fn(predictor_output, predictor_inputs, module_inputs, module_outputs, captured_trace):
        out = metric(module_inputs, module_outputs, captured_trace, pred_name,
                     [(predictor, predictor_inputs, predictor_output)])
        if hasattr(out, "feedback"):
            if out["feedback"] is None:
                out["feedback"] = f"This trajectory got a score of {out['score']}."
            return out
        return {"score": out, "feedback": f"This trajectory got a score of {out}."}

    return feedback_fn


class PhaseAdapter(DspyAdapter):
    """DSPy's GEPA adapter with the phase's evaluation (see the module docstring). Reflection is the
    phase's gepa reflection strategy (`proposer.ConcurrentReflection`), not the adapter's
    `propose_new_texts`, so the W reflection calls of a round run side by side."""

    def __init__(self, program: dspy.Module, metric: Callable, *, student: PolicyStudent | dspy.BaseLM, seed: int,
                 rng: Any, num_threads: int, bill: Bill, reflection_minibatch_size: int,
                 reflection: Any = None) -> None:
        seed_program = program_with(program, template_of(program))
        super().__init__(student_module=seed_program, metric_fn=metric,
                         feedback_map={n: _feedback_fn(metric, n, p) for n, p in seed_program.named_predictors()},
                         failure_score=0.0, num_threads=num_threads, rng=rng, warn_on_score_mismatch=False,
                         reflection_minibatch_size=reflection_minibatch_size)
        self.propose_new_texts = None  # gepa asks the reflection strategy instead
        # (DSPy's adapter calls the program `student`: the policy is `policy` here)
        self.program, self.metric, self.policy, self.seed, self.bill = program, metric, student, seed, bill
        self.reflection = reflection  # its round counter is saved with gepa's state (get_adapter_state)
        self.evaluations = 0  # batched evaluations so far: each one's sampling seed
        self.batched = isinstance(student, PolicyStudent)

    # ------------------------------------------------------------------ gepa's adapter protocol
    def evaluate(self, batch, candidate, capture_traces=False, num_threads=None):
        if not self.batched:
            return super().evaluate(batch, candidate, capture_traces=capture_traces, num_threads=num_threads)
        return self._evaluate_batched([(candidate, batch)], capture_traces)[0]

    def batch_evaluate(self, items, *, capture_traces=True):
        if not self.batched:
            return super().batch_evaluate(items, capture_traces=capture_traces)
        return self._evaluate_batched(items, capture_traces)

    def get_adapter_state(self) -> dict[str, Any]:
        state = {**super().get_adapter_state(), "evaluations": self.evaluations}
        if self.reflection is not None:
            state["reflection_rounds"] = self.reflection.rounds
        return state

    def set_adapter_state(self, state: dict[str, Any]) -> None:
        super().set_adapter_state(state)
        self.evaluations = int(state.get("evaluations", self.evaluations))
        if self.reflection is not None and "reflection_rounds" in state:
            self.reflection.rounds = int(state["reflection_rounds"])

    # ------------------------------------------------------------------ templates, pairs
    def score(self, pairs: Sequence[tuple[Template, Any]]) -> list[float]:
        """The metric's score of the program under each (template, example) pair: batched on the policy,
        or DSPy's Evaluate per distinct template on a student DSPy LM (metric failures score 0)."""
        if self.batched:
            return [r.reward for r in self.rollouts(pairs)]
        by_template: dict[Template, list[int]] = {}
        for i, (template, _) in enumerate(pairs):
            by_template.setdefault(template, []).append(i)
        out = [0.0] * len(pairs)
        for template, indices in by_template.items():
            evaluate = dspy.Evaluate(devset=[pairs[i][1] for i in indices], metric=self.metric,
                                     num_threads=self.num_threads, failure_score=0.0, display_progress=False,
                                     max_errors=10 ** 9)
            result = evaluate(program_with(self.program, template))
            for i, (_, _, score) in zip(indices, result.results):
                out[i] = float(getattr(score, "score", score) or 0.0)
        return out

    def rollouts(self, pairs: Sequence[tuple[Template, Any]]) -> list[Any]:
        """One execution of the program per (template, example) pair, all in one collection on the policy
        engine; the rollouts in pair order. The student's calls and tokens go to the phase's bill."""
        student: PolicyStudent = self.policy
        examples, assignments, originals = [], {}, {}
        for n, (template, example) in enumerate(pairs):
            ident = str(n)  # the collector groups by id: the same question may come under several templates
            examples.append(example.copy(id=ident))
            assignments[ident] = [template]
            originals[ident] = example

        def metric(proxy, prediction):
            return self.metric(originals[proxy.id], prediction)

        sampling = dataclasses.replace(student.sampling, seed=derive_seed(self.seed, "evaluation", self.evaluations))
        self.evaluations += 1
        start = time.perf_counter()
        batch = collect_rollouts(student.engine, self.program, student.renderers, examples, metric, k=1,
                                 sampling=sampling, assignments=assignments, max_live=student.max_live)
        calls = [c for r in batch.rollouts for c in r.calls]
        self.bill.record_student(len(calls), sum(len(c.sampled_prompt_ids) for c in calls),
                                 sum(len(c.completion_ids) for c in calls), time.perf_counter() - start)
        return list(batch.rollouts)

    # ------------------------------------------------------------------ batched evaluation
    def _evaluate_batched(self, items, capture_traces: bool) -> list[EvaluationBatch]:
        pairs = [(Template.from_candidate(candidate), example) for candidate, batch in items for example in batch]
        rollouts = iter(self.rollouts(pairs))
        out = []
        for candidate, batch in items:
            done = [next(rollouts) for _ in batch]
            trajectories = None
            if capture_traces:
                built = dict(self.build_program(candidate).named_predictors())
                trajectories = [t for i, (example, r) in enumerate(zip(batch, done))
                                if (t := self._trajectory(built, i, example, r)) is not None]
            outputs = [r.prediction for r in done]
            if trajectories is not None:  # as DSPy's: a format failure's output is its FailedPrediction
                for t in trajectories:
                    outputs[t["example_ind"]] = t["prediction"]
            out.append(EvaluationBatch(outputs=outputs, scores=[float(r.reward) for r in done],
                                       trajectories=trajectories))
        return out

    def _trajectory(self, built: Mapping[str, Any], index: int, example: Any, rollout: Any) -> dict | None:
        """DSPy's TraceData of one execution, or None when its program code raised (DSPy drops those)."""
        trace = []
        for call in rollout.calls:
            fields = self.policy.renderers[call.predictor].parse(call.completion_text)
            if fields is None:  # the call that ended the execution: DSPy's FailedPrediction, with the program's inputs
                failed = FailedPrediction(completion_text=call.completion_text, format_reward=0.0)
                inputs = {f: example[f] for f in program_input_fields(self.program)}
                trace.append((built[call.predictor], inputs, failed))
                return {"example": example, "prediction": failed, "trace": trace, "example_ind": index,
                        "score": float(rollout.reward)}
            trace.append((built[call.predictor], dict(call.inputs or {}), dspy.Prediction(**fields)))
        if rollout.prediction is None:
            return None
        return {"example": example, "prediction": rollout.prediction, "trace": trace, "example_ind": index,
                "score": float(rollout.reward)}
