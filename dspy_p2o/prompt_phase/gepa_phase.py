"""Phase 2 of P^2O: evolve templates for the hard set with GEPA (and/or DSPy's few-shot machinery).

A *template* is a candidate program (`template.Template`: per predictor, an instruction and, for a
few-shot candidate, demos; one entry for every predictor, for one predictor or many alike), read by
`template_of` and applied by `program_with`. For a compound program the pool, Pareto front and
assignment (Alg. 2/4) work on whole candidate programs, so a hard question is rolled out with a
consistent set of instructions (and demos) for all its predictors.

Who proposes candidates (`PromptPhaseConfig.optimizer`):
- `gepa`: GEPA (`gepa.optimize` with DSPy's own GEPA adapter, `evaluation.PhaseAdapter`):
  reflective mutation of the predictors' instructions (one predictor per proposal, round-robin
  over the predictors), its per-dev-example score bookkeeping, persistence and resume (`log_dir`).
  (Not its merge: see `PromptPhaseConfig.use_merge`.)
- `fewshot`: demo sets from `dspy.LabeledFewShot` over gold answers and the run's own successful
  rollouts (`fewshot.py`), scored on hard_dev under the same metric-call budget;
- `gepa+fewshot`: both pools; the few-shot candidates take at most half of the budget, GEPA the rest.

What P^2O adds around them:
- a hard_train / hard_dev split of the hard set (GEPA reflects on hard_train minibatches
  and keeps per-example scores on hard_dev);
- evaluation on the batched rollout path: every evaluation GEPA asks for (a minibatch, the W
  parents or children of a round, the dev set) is one collection of the policy engine
  (`evaluation.PhaseAdapter`), as phase 1's rollouts are;
- beam exploration: every GEPA iteration proposes from W parents taken from the Pareto
  front of paper Alg. 4 (gepa 0.1.4's multi-proposal `sampling_strategy`); the W reflection
  calls of a round run concurrently (`proposer.ConcurrentReflection`), results in task order;
- stoppers: a template perfect on dev (`stop_at_score`), a reflection LM that keeps failing
  (the teacher is unreachable), or the teacher's bill reaching `max_cost_usd`: the phase ends
  with the templates it has;
- the bill: the student's and the reflection LM's calls and tokens, the teacher's cost in USD (`bill.py`);
- the whole pool, its dev score matrix, the Pareto front, the greedy cover and the K
  templates assigned to every hard question (paper Alg. 2), saved as readable JSON; a question
  is never scored with, nor assigned, a demo of its own gold answer (fewshot.py's hygiene).

Every random choice of the phase is seeded from the phase's one `seed` (`seeds.derive_seed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy
from dspy.teleprompt.gepa.gepa_utils import LoggerAdapter
from gepa.strategies.eval_policy import FullEvaluationPolicy
from gepa.strategies.proposal_sampling import ProposalTask
from gepa.utils.stop_condition import ScoreThresholdStopper

from dspy_p2o import display
from dspy_p2o.config import BUDGET_PRESETS, PromptPhaseConfig
from dspy_p2o.jsonio import write_json
from dspy_p2o.prompt_phase.bill import Bill, priced_model
from dspy_p2o.prompt_phase.evaluation import PhaseAdapter, PolicyStudent, program_with, template_of  # noqa: F401
from dspy_p2o.prompt_phase.fewshot import demo_ids, for_question, has_demos, propose_demo_sets, too_long
from dspy_p2o.prompt_phase.pool import assign_templates, greedy_cover, mean_scores, pareto_front, solved_by
from dspy_p2o.prompt_phase.proposer import ConcurrentReflection, ReflectionFailureStopper, reflection_proposer
from dspy_p2o.renderer import program_input_fields
from dspy_p2o.rewards import safe_metric
from dspy_p2o.seeds import derive_seed
from dspy_p2o.template import Template

logger = logging.getLogger(__name__)

RESULT_FILE = "prompt_phase.json"
SPLIT_FILE = "split.json"


@dataclass
class PromptPhaseResult:
    ran: bool
    reason: str
    assignments: dict[str, list[Template]] = field(default_factory=dict)  # JSON: Template.to_json()
    pool: list[dict] = field(default_factory=list)
    dev_ids: list[str] = field(default_factory=list)
    train_ids: list[str] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)  # pool x dev
    cost: dict = field(default_factory=dict)
    epoch: int = 1  # the epoch (numbered from 1) after which the phase ran

    def to_json(self) -> dict:
        """Readable: the pool first (people read the evolved templates), then the data."""
        return {"epoch": self.epoch, "ran": self.ran, "reason": self.reason, "cost": self.cost,
                "pool": self.pool, "dev_ids": self.dev_ids, "train_ids": self.train_ids,
                "scores": self.scores,
                "assignments": {q: [Template.from_json(z).to_json() for z in zs] for q, zs in self.assignments.items()}}

    @classmethod
    def from_json(cls, data: dict) -> PromptPhaseResult:
        assignments = {q: [Template.from_json(z) for z in zs] for q, zs in data["assignments"].items()}
        return cls(ran=data["ran"], reason=data["reason"], assignments=assignments, pool=data["pool"],
                   dev_ids=data["dev_ids"], train_ids=data.get("train_ids", []), scores=data["scores"],
                   cost=data["cost"], epoch=data.get("epoch", 1))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())  # atomic: a crash never leaves half a result behind


# --------------------------------------------------------------------------- budget


def metric_call_budget(budget: str | int, dev_size: int, num_components: int = 1) -> int:
    """Metric calls for a preset (GEPA's own auto budget for dev_size; heavy_4 = 4 x heavy) or a number."""
    if not isinstance(budget, str):
        return int(budget)
    auto, factor = BUDGET_PRESETS[budget]
    from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS, GEPA

    calls = GEPA.auto_budget(None, num_preds=num_components, num_candidates=AUTO_RUN_SETTINGS[auto]["n"],
                             valset_size=dev_size)
    return factor * calls


# --------------------------------------------------------------------------- gepa strategies


def state_score_matrix(state) -> list[list[float]]:
    """Candidates x dev examples from a GEPAState (an unevaluated pair counts as 0)."""
    val_ids = sorted({vid for scores in state.prog_candidate_val_subscores for vid in scores})
    return [[float(scores.get(v, 0.0)) for v in val_ids] for scores in state.prog_candidate_val_subscores]


class ParetoBeamSampling:
    """gepa SamplingStrategy: W (parent, minibatch) tasks per iteration, parents drawn from
    the Pareto front of the dev score matrix (Alg. 4: non-dominated, sampled to W weighted by
    mean dev score). A front smaller than W is cycled, so every round still asks for W
    proposals (on different minibatches)."""

    def __init__(self, width: int, rng: random.Random) -> None:
        self.width, self.rng = width, rng

    def sample_tasks(self, state, candidate_selector, batch_sampler, trainset) -> list[ProposalTask]:
        front = pareto_front(state_score_matrix(state), self.width, self.rng)
        self.rng.shuffle(front)
        tasks = []
        for i in range(self.width):
            parent = front[i % len(front)]
            ids = batch_sampler.next_minibatch_ids(trainset, state)
            tasks.append(ProposalTask(parent, state.program_candidates[parent], ids, trainset.fetch(ids)))
        return tasks


class ResumingEvaluationPolicy(FullEvaluationPolicy):
    """Full dev evaluation, except that a resumed run (saved state in the run dir) skips
    GEPA's seed re-evaluation on the whole dev set: gepa 0.1.4 evaluates the seed before it
    loads the state and throws the result away. One example remains (DSPy's Evaluate
    refuses an empty set): one wasted metric call instead of |dev|."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def get_seed_eval_batch(self, loader) -> list:
        ids = list(loader.all_ids())
        return ids[:1] if os.path.exists(os.path.join(self.run_dir, "gepa_state.bin")) else ids


# --------------------------------------------------------------------------- the phase


def split_hard_set(ids: Sequence[str], dev_size: int, seed: int) -> tuple[list[str], list[str]]:
    """(hard_train, hard_dev): dev_size for dev, or half when the set has fewer than 2 * dev_size."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_dev = min(dev_size, len(order) // 2)
    return order[n_dev:], order[:n_dev]


def _example_ids(examples: Sequence[dspy.Example]) -> list[str]:
    ids = []
    for i, ex in enumerate(examples):
        eid = ex.get("id") if hasattr(ex, "get") else None
        if eid is None:
            raise ValueError(f"hard example #{i} has no `id` field; the prompt phase keys templates by example id")
        ids.append(str(eid))
    dupes = sorted({e for e in ids if ids.count(e) > 1})
    if dupes:
        raise ValueError(f"hard examples have duplicate ids: {dupes[:5]}")
    return ids


def _load_split(log_dir: Path, ids: list[str], dev_size: int, seed: int) -> tuple[list[str], list[str]]:
    """The saved split when resuming (it must match this hard set), else a fresh one, saved."""
    path = log_dir / SPLIT_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if sorted(saved["train"] + saved["dev"]) != sorted(ids):
            raise ValueError(f"{log_dir} holds a prompt phase for a different hard set ({len(saved['train']) + len(saved['dev'])} "
                             f"saved ids vs {len(ids)} given); use a fresh log_dir per epoch")
        return saved["train"], saved["dev"]
    train, dev = split_hard_set(ids, dev_size, seed)
    log_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": train, "dev": dev}, indent=1))
    return train, dev


def _history_ids(lm: dspy.BaseLM) -> set[int]:
    return {id(e) for e in getattr(lm, "history", [])}


def _record_student_lm(bill: Bill, lm: dspy.BaseLM, before: set[int]) -> None:
    """The student DSPy LM's calls and tokens since `before` (its DSPy history; dspy.track_usage cannot
    be used: DSPy's ParallelExecutor gives each worker thread a private copy of the tracker)."""
    from dspy_p2o.prompt_phase.bill import entry_tokens

    tokens = [entry_tokens(e) for e in getattr(lm, "history", []) if id(e) not in before]
    bill.record_student(len(tokens), sum(t[0] for t in tokens), sum(t[1] for t in tokens))
    if len(getattr(lm, "history", [])) >= dspy.settings.max_history_size:
        logger.warning("the student LM's history is capped at %d entries: its usage is a lower bound",
                       dspy.settings.max_history_size)


# --------------------------------------------------------------------------- few-shot candidates

FEWSHOT_FILE = "fewshot.json"


@dataclass
class FewshotPool:
    """The few-shot candidates of a phase and their dev scores (saved in the phase's log_dir)."""

    templates: list[Template] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)  # candidate x dev
    metric_calls: int = 0
    refused: list[str] = field(default_factory=list)  # why candidates were refused (too long for the context)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"templates": [t.to_json() for t in self.templates], "scores": self.scores,
                "metric_calls": self.metric_calls, "refused": self.refused, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> FewshotPool:
        return cls([Template.from_json(t) for t in data["templates"]], data["scores"], data["metric_calls"],
                   data.get("refused", []), data.get("seconds", 0.0))


def _fewshot_pool(program: dspy.Module, adapter: PhaseAdapter, cfg: PromptPhaseConfig, *, devset, hard_examples,
                  calls: int, labeled: Sequence[Any], bootstrapped: Sequence[Any], seed: int, path: Path,
                  live: display.GEPAProgress) -> FewshotPool:
    """Propose demo sets (`fewshot.propose_demo_sets`), refuse those that do not fit the context on some hard
    question, and score at most `calls // |dev|` of them on hard_dev (each dev question without its own demos)."""
    if path.exists():
        return FewshotPool.from_json(json.loads(path.read_text()))
    start = time.perf_counter()
    pools = {"labeled": [labeled], "bootstrapped": [bootstrapped], "both": [labeled, bootstrapped]}[cfg.fewshot_source]
    proposed = propose_demo_sets(program, pools, k=cfg.fewshot_k, n=cfg.fewshot_candidates, seed=seed)
    out = FewshotPool()
    student = adapter.policy
    for template in proposed:
        long = None
        if isinstance(student, PolicyStudent):
            long = too_long(template, hard_examples, student.renderers, program_inputs=program_input_fields(program),
                            context_length=getattr(student.engine, "context_length", None),
                            max_tokens=student.sampling.max_tokens)
        if long is not None:
            out.refused.append(f"question {long[0]!r} renders to {long[1]} prompt tokens with {cfg.fewshot_k} "
                               f"demo(s) per predictor + max_tokens {student.sampling.max_tokens} > the policy's "
                               f"context ({student.engine.context_length} tokens)")
            continue
        out.templates.append(template)
    if out.refused:
        logger.warning("prompt phase: %d of %d fewshot candidates refused (demos count against the context): %s",
                       len(out.refused), len(proposed), out.refused[0])
    out.templates = out.templates[:max(0, calls // max(1, len(devset)))]
    if out.templates:
        pairs = [(for_question(t, ex.id), ex) for t in out.templates for ex in devset]
        flat = adapter.score(pairs)
        out.scores = [flat[i * len(devset):(i + 1) * len(devset)] for i in range(len(out.templates))]
        out.metric_calls = len(pairs)
    out.seconds = round(time.perf_counter() - start, 3)
    live.advance(out.metric_calls, max(mean_scores(out.scores), default=0.0))
    write_json(path, out.to_json())
    return out


# --------------------------------------------------------------------------- the phase


class CostCap:
    """The phase's cost cap, read from the bill (stopping is gepa's `max_reflection_cost` stopper)."""

    def __init__(self, bill: Bill, cap: float | None) -> None:
        self.bill, self.cap = bill, cap

    @property
    def reached(self) -> bool:
        return self.cap is not None and self.bill.cost_usd is not None and self.bill.cost_usd >= self.cap


def _spend_line(bill: Bill) -> Callable[[], dict[str, str]]:
    """The live line's spend: the student's tokens, the reflection LM's calls and tokens, the teacher's USD."""
    def spend() -> dict[str, str]:
        out = {"student_tok": f"{(bill.student.input_tokens + bill.student.output_tokens) / 1000:.1f}k"}
        if bill.reflection.calls:
            out["reflection"] = (f"{bill.reflection.calls} calls "
                                 f"{(bill.reflection.input_tokens + bill.reflection.output_tokens) / 1000:.1f}k tok")
        if bill.cost_usd is not None:
            out["usd"] = f"{bill.cost_usd:.4f}"
        return out
    return spend


def run_prompt_phase(program: dspy.Module, hard_examples: Sequence[dspy.Example], *,
                     student: PolicyStudent | dspy.BaseLM, reflection_lm: dspy.BaseLM | None, metric: Callable,
                     config: PromptPhaseConfig | None = None, k: int = 6, seed: int = 0, log_dir: str | os.PathLike,
                     epoch: int = 1, progress: bool = False, labeled_demos: Sequence[dspy.Example] | None = None,
                     bootstrapped_demos: Sequence[dict] = ()) -> PromptPhaseResult:
    """Propose templates for the hard set with the current policy as student and assign `k` templates per hard question.

    `student` is the policy: a `PolicyStudent` (its engine, renderers and sampling: every evaluation a
    batched engine call, the loop's way) or a DSPy LM (DSPy's own evaluation, one call at a time).
    `program` may have one predictor or several; all of them run on the student. A template (in
    `assignments` and in the pool) names every predictor (`template_of`); a compound pool entry also
    lists the predictors GEPA `changed` from the seed program. The GEPA budget preset scales with the
    number of predictors (GEPA's auto budget).

    `k` is the number of templated rollouts per group (the run's k - plain_per_group) and
    `seed` the phase's seed (the loop derives it from the run's seed and the epoch); `epoch` the number (from
    1) of the epoch the phase follows, as logs and records name it. `progress` shows the
    phase's live line (metric calls of the budget, tokens, cost; dspy_p2o.display). The few-shot
    optimizer draws demos from `labeled_demos` (training questions with gold answers; default: the
    hard questions themselves) and `bootstrapped_demos` (records of the run's successful rollouts,
    `fewshot.bootstrap_record`).

    Resumable: a finished phase in `log_dir` is loaded, not rerun; an interrupted GEPA run
    continues from its saved state (`log_dir/gepa`), scored few-shot candidates are read back.
    """
    cfg = config or PromptPhaseConfig()
    if k < 1:
        raise ValueError(f"run_prompt_phase needs k >= 1 templates per hard question, got {k}")
    log_dir = Path(log_dir)
    ids = _example_ids(hard_examples)
    if len(ids) < cfg.min_hard:
        return PromptPhaseResult(ran=False, reason=f"hard set {len(ids)} < min_hard {cfg.min_hard}", epoch=epoch)
    done = _finished(log_dir / RESULT_FILE, ids, epoch)
    if done is not None:
        return done
    names = list(template_of(program))  # a clear error before any work
    use_gepa = cfg.optimizer in ("gepa", "gepa+fewshot")
    if use_gepa and reflection_lm is None:
        raise ValueError(f"prompt.optimizer {cfg.optimizer!r} needs a reflection LM")
    metric = safe_metric(metric)
    train_ids, dev_ids = _load_split(log_dir, ids, cfg.dev_size, derive_seed(seed, "split"))
    max_calls = metric_call_budget(cfg.budget, len(dev_ids), num_components=len(names))
    return _run_phase(program, hard_examples, ids, student=student, reflection_lm=reflection_lm, metric=metric,
                      cfg=cfg, k=k, seed=seed, log_dir=log_dir, epoch=epoch, progress=progress,
                      labeled=list(hard_examples) if labeled_demos is None else labeled_demos,
                      bootstrapped=bootstrapped_demos, split=(train_ids, dev_ids), max_calls=max_calls)


def _run_phase(program: dspy.Module, hard_examples: Sequence[dspy.Example], ids: list[str], *, student,
               reflection_lm, metric: Callable, cfg: PromptPhaseConfig, k: int, seed: int, log_dir: Path, epoch: int,
               progress: bool, labeled, bootstrapped, split: tuple[list[str], list[str]],
               max_calls: int) -> PromptPhaseResult:
    """`run_prompt_phase` once its inputs are checked: propose, score, select, assign, record."""
    train_ids, dev_ids = split
    by_id = dict(zip(ids, hard_examples))
    trainset, devset = [by_id[i] for i in train_ids], [by_id[i] for i in dev_ids]
    use_gepa = cfg.optimizer in ("gepa", "gepa+fewshot")
    bill = Bill(reflection_model=priced_model(reflection_lm) if use_gepa else None)
    proposer = reflection_proposer()
    failure_stopper = ReflectionFailureStopper(proposer, cfg.max_reflection_failures)
    reflection = (ConcurrentReflection(proposer, reflection_lm, bill=bill, seed=derive_seed(seed, "reflection"),
                                       max_workers=cfg.beam_width) if use_gepa else None)
    adapter = PhaseAdapter(program, metric, student=student, seed=derive_seed(seed, "evaluation"),
                           rng=random.Random(derive_seed(seed, "gepa")), num_threads=cfg.num_threads, bill=bill,
                           reflection_minibatch_size=cfg.reflection_minibatch_size, reflection=reflection)
    what = {"gepa": "GEPA", "fewshot": "few-shot", "gepa+fewshot": "GEPA + few-shot"}[cfg.optimizer]
    live = display.GEPAProgress(max_calls, desc=f"prompt phase {epoch}: {what} on {len(ids)} hard",
                                enabled=progress, spend=_spend_line(bill))
    student_lm = None if isinstance(student, PolicyStudent) else student
    logger.info("prompt phase epoch %d: %s on %d hard_train / %d hard_dev questions, %d predictor(s), budget %d "
                "metric calls, beam %d, merge %s, %s evaluation", epoch, what, len(trainset), len(devset),
                len(template_of(program)),
                max_calls, cfg.beam_width, "on" if cfg.use_merge else "off",
                "batched" if student_lm is None else "DSPy LM")
    start = time.time()
    student_before = _history_ids(student_lm) if student_lm is not None else set()
    in_student = dspy.context(lm=student_lm) if student_lm is not None else contextlib.nullcontext()
    with in_student, display.quiet_libraries(), contextlib.closing(live):
        found = _candidates(program, adapter, reflection, cfg, trainset=trainset, devset=devset,
                            hard_examples=list(hard_examples), max_calls=max_calls, labeled=labeled,
                            bootstrapped=bootstrapped, stoppers=[ScoreThresholdStopper(cfg.stop_at_score),
                                                                       failure_stopper],
                            seed=seed, log_dir=log_dir, live=live)
        chosen = _select(found, adapter, cfg, trainset=trainset, train_ids=train_ids, dev_ids=dev_ids, seed=seed)
    if student_lm is not None:
        _record_student_lm(bill, student_lm, student_before)
    wall = time.time() - start

    rng = random.Random(derive_seed(seed, "assignment"))
    own_demos = [demo_ids(t) for t in found.templates]  # hygiene: a question is never assigned its own gold answer
    excluded = {q: [c for c, ids_ in enumerate(own_demos) if q in ids_] for q in ids}
    assignments = assign_templates(dev_ids + train_ids, chosen.solved, found.templates, chosen.means, chosen.cover,
                                   k=k, rng=rng, same_template_in_group=cfg.same_template_in_group, excluded=excluded)
    pool = _pool_entries(found, chosen, cfg.solved_threshold)
    reason = _stop_reason(cfg, failure_stopper, proposer, CostCap(bill, cfg.max_cost_usd), bill, chosen.means,
                          len(found.templates), epoch, progress)
    cost = _cost(cfg, found, chosen, bill, proposer, pool, assignments, max_calls=max_calls,
                 hard_train=len(trainset), wall=wall)
    result = PromptPhaseResult(ran=True, reason=reason, assignments=assignments, pool=pool, dev_ids=dev_ids,
                               train_ids=train_ids, scores=found.scores, cost=cost, epoch=epoch)
    result.save(log_dir / RESULT_FILE)
    logger.info("prompt phase epoch %d: %d templates (%d on the front, cover %d), best mean dev score %.3f, "
                "%d questions assigned, %.1fs", epoch, len(found.templates), len(chosen.front), len(chosen.cover),
                max(chosen.means, default=0.0), len(assignments), wall)
    return result


def _cost(cfg: PromptPhaseConfig, found: _Candidates, chosen: _Selection, bill: Bill, proposer, pool: list[dict],
          assignments: dict, *, max_calls: int, hard_train: int, wall: float) -> dict[str, Any]:
    """The phase's record of what it spent (metric calls, tokens, USD, seconds) and what it produced."""
    assigned = {t for ts in assignments.values() for t in ts}
    cost = {
        "optimizer": cfg.optimizer,
        "metric_calls_gepa": found.gepa_calls,
        "metric_calls_fewshot": found.fewshot.metric_calls,
        "metric_calls_budget": max_calls,
        "metric_calls_hard_train": len(chosen.train_scored) * hard_train,
        **bill.to_json(),
        "max_cost_usd": cfg.max_cost_usd,
        "reflection_failures": proposer.total_failures,
        "reflection_unformatted": proposer.unformatted,
        "templates_accepted": len(found.templates) - 1,
        "fewshot_candidates": len(found.fewshot.templates),
        "fewshot_refused": len(found.fewshot.refused),
        "templates_assigned": sum(1 for e in pool if e["duplicate_of"] is None
                                  and found.templates[e["index"]] in assigned),
        "questions_assigned": len(assignments),
        "gepa_time_s": round(found.gepa_seconds, 3),
        "fewshot_time_s": found.fewshot.seconds,
        "hard_train_time_s": round(chosen.train_seconds, 3),
        "wall_time_s": round(wall, 3),
    }
    if found.fewshot.refused:
        cost["fewshot_refused_first"] = found.fewshot.refused[0]
    return cost


def _finished(result_path: Path, ids: list[str], epoch: int) -> PromptPhaseResult | None:
    """The phase already finished in its log_dir (a resume), or None; another hard set's result is refused."""
    if not result_path.exists():
        return None
    done = PromptPhaseResult.from_json(json.loads(result_path.read_text()))
    if sorted(done.train_ids + done.dev_ids) != sorted(ids):
        raise ValueError(f"{result_path} is a finished prompt phase for a different hard set; "
                         "use a fresh log_dir per epoch")
    logger.info("prompt phase of epoch %d already finished in %s; loaded it", epoch, result_path.parent)
    done.cost = {**done.cost, "loaded_from": str(result_path)}
    return done


@dataclass
class _Candidates:
    """What the phase's optimizers proposed: every template with its hard_dev scores (candidate x
    question), its parent (GEPA) and its source ("gepa", "seed" or "fewshot")."""

    templates: list[Template]
    scores: list[list[float]]
    parents: list[int | None]
    sources: list[str]
    gepa_calls: int
    gepa_seconds: float
    fewshot: FewshotPool


def _candidates(program: dspy.Module, adapter: PhaseAdapter, reflection: ConcurrentReflection | None,
                cfg: PromptPhaseConfig, *, trainset, devset, hard_examples, max_calls: int, labeled, bootstrapped,
                stoppers: list, seed: int, log_dir: Path, live: display.GEPAProgress) -> _Candidates:
    """Few-shot demo sets first (when the optimizer uses them: half the budget beside GEPA), then GEPA
    with the rest, or the seed program scored alone; the seed program is candidate 0, as in GEPA's pool."""
    use_gepa, use_fewshot = cfg.optimizer in ("gepa", "gepa+fewshot"), cfg.optimizer in ("fewshot", "gepa+fewshot")
    seed_template = template_of(program)
    fewshot = FewshotPool()
    if use_fewshot:
        share = max_calls // 2 if use_gepa else max_calls - len(devset)  # fewshot alone: the seed is scored too
        fewshot = _fewshot_pool(program, adapter, cfg, devset=devset, hard_examples=hard_examples, calls=share,
                                labeled=labeled, bootstrapped=bootstrapped, seed=derive_seed(seed, "fewshot"),
                                path=log_dir / FEWSHOT_FILE, live=live)
    gepa_start = time.perf_counter()
    if use_gepa:
        details = _run_gepa(adapter, reflection, cfg, seed_template=seed_template, trainset=trainset, devset=devset,
                            max_calls=max_calls - fewshot.metric_calls, stoppers=stoppers,
                            gepa_dir=str(log_dir / "gepa"), seed=seed, live=live)
        templates = [Template.from_candidate(c) for c in details.candidates]
        scores = [[float(sub.get(j, 0.0)) for j in range(len(devset))] for sub in details.val_subscores]
        parents = [next((p for p in (ps or []) if p is not None), None) for ps in details.parents]
        gepa_calls = details.total_metric_calls
    else:
        templates, parents = [seed_template], [None]
        scores = [adapter.score([(seed_template, ex) for ex in devset])]
        gepa_calls = 0
        live.advance(len(devset), mean_scores(scores)[0])
    sources = ["gepa" if use_gepa else "seed"] * len(templates) + ["fewshot"] * len(fewshot.templates)
    return _Candidates(templates + fewshot.templates, scores + fewshot.scores, parents + [None] * len(fewshot.templates),
                       sources, gepa_calls, time.perf_counter() - gepa_start, fewshot)


@dataclass
class _Selection:
    """The Pareto front and greedy cover over the candidates, their mean dev scores, and which
    questions each candidate solved (hard_dev, and hard_train for the front and cover when scored)."""

    front: list[int]
    cover: list[int]
    means: list[float]
    solved: dict
    train_scored: list[int]
    train_seconds: float


def _select(found: _Candidates, adapter: PhaseAdapter, cfg: PromptPhaseConfig, *, trainset, train_ids, dev_ids,
            seed: int) -> _Selection:
    scores = found.scores
    front = pareto_front(scores, None, random.Random(derive_seed(seed, "front")))
    cover = greedy_cover(scores, front, cfg.solved_threshold)
    solved = solved_by(scores, dev_ids, threshold=cfg.solved_threshold)
    start = time.perf_counter()
    train_scored = sorted(set(front) | set(cover)) if cfg.score_hard_train and trainset else []
    if train_scored:
        flat = adapter.score([(for_question(found.templates[c], ex.id), ex) for c in train_scored for ex in trainset])
        # train score rows are templates (candidates), columns are hard_train questions
        train_scores = [flat[i * len(trainset):(i + 1) * len(trainset)] for i in range(len(train_scored))]
        solved.update(solved_by(train_scores, train_ids, candidates=train_scored, threshold=cfg.solved_threshold))
    return _Selection(front, cover, mean_scores(scores), solved, train_scored, time.perf_counter() - start)


def _pool_entries(found: _Candidates, chosen: _Selection, threshold: float) -> list[dict[str, Any]]:
    """templates/epoch-N.json's pool: every candidate with its source, scores and place in the selection."""
    templates, pool = found.templates, []
    for c, template in enumerate(templates):
        entry = {"index": c, "template": template.to_json(), "source": found.sources[c],
                 "mean_dev_score": chosen.means[c], "parent": found.parents[c], "on_front": c in chosen.front,
                 "in_cover": c in chosen.cover, "solved_dev": sum(1 for s in found.scores[c] if s >= threshold),
                 # GEPA dedupes proposals within a round only: the same text may come back later
                 "duplicate_of": templates.index(template) if templates.index(template) != c else None}
        if len(template) > 1 and not has_demos(template):  # a compound program: the predictors GEPA evolved
            entry["changed"] = [name for name in template if template[name] != templates[0][name]]
        pool.append(entry)
    return pool


def _stop_reason(cfg: PromptPhaseConfig, failure_stopper: ReflectionFailureStopper, proposer, cap: CostCap, bill: Bill,
                 means: list[float], n_templates: int, epoch: int, progress: bool) -> str:
    """Why the phase ended: "ok" (its budget), the reflection LM's failures, the cost cap, or a good enough template."""
    if failure_stopper.fired:
        reason = (f"reflection LM failed {cfg.max_reflection_failures} times in a row ({proposer.last_error}); "
                  f"stopped early with {n_templates} templates")
        logger.warning("prompt phase epoch %d: %s", epoch, reason)
        return reason
    if cap.reached:
        reason = (f"the reflection LM's cost ${bill.cost_usd:.4f} reached prompt.max_cost_usd ${cfg.max_cost_usd:g}; "
                  f"stopped early with {n_templates} templates (kept)")
        logger.warning("prompt phase epoch %d: %s", epoch, reason)
        display.line(f"prompt phase {epoch}: {reason}", progress)
        return reason
    if max(means, default=0.0) >= cfg.stop_at_score:
        return f"a template reached mean dev score {max(means):.3f} >= stop_at_score {cfg.stop_at_score}"
    return "ok"


def _run_gepa(adapter: PhaseAdapter, reflection: ConcurrentReflection, cfg: PromptPhaseConfig, *,
              seed_template: Template, trainset, devset, max_calls: int, stoppers: list, gepa_dir: str, seed: int,
              live: display.GEPAProgress):
    """gepa.optimize with the phase's adapter and reflection strategy: what `dspy.GEPA.compile` calls, with
    P^2O's beam sampling, stoppers, resume policy, cost cap and live line."""
    from gepa import optimize

    gepa_kwargs = {"sampling_strategy": ParetoBeamSampling(cfg.beam_width, random.Random(derive_seed(seed, "beam"))),
                   "stop_callbacks": stoppers, "use_cloudpickle": True,
                   "val_evaluation_policy": ResumingEvaluationPolicy(gepa_dir),
                   **cfg.gepa_kwargs, "callbacks": [live, *cfg.gepa_kwargs.get("callbacks", [])]}
    return optimize(seed_candidate=seed_template.instructions(), trainset=list(trainset), valset=list(devset),
                    adapter=adapter, reflection_strategy=reflection, candidate_selection_strategy="pareto",
                    skip_perfect_score=True, reflection_minibatch_size=cfg.reflection_minibatch_size,
                    module_selector="round_robin", perfect_score=1.0, use_merge=cfg.use_merge,
                    max_merge_invocations=5, max_metric_calls=max_calls, max_reflection_cost=cfg.max_cost_usd,
                    logger=LoggerAdapter(logger), run_dir=gepa_dir, track_best_outputs=False,
                    display_progress_bar=False, raise_on_exception=True, seed=derive_seed(seed, "gepa"),
                    **gepa_kwargs)
