"""Phase 2 of P^2O: evolve templates for the hard set with DSPy's own `dspy.GEPA`.

A *template* is one GEPA candidate program (`template.Template`: {predictor name: instruction},
one entry for every predictor, for one predictor or many alike), read by `template_of` and
applied by `program_with`. For a compound program the pool, Pareto front and assignment (Alg. 2/4)
work on whole candidate programs, so a hard question is rolled out with a consistent set of
instructions for all its predictors.

What GEPA does unchanged: reflective mutation of the predictors' instructions (one predictor
per proposal, round-robin over the predictors), its per-dev-example score bookkeeping,
persistence and resume (`log_dir`). (Not its merge: see `PromptPhaseConfig.use_merge`.)
What P^2O adds:

- a hard_train / hard_dev split of the hard set (GEPA reflects on hard_train minibatches
  and keeps per-example scores on hard_dev);
- beam exploration: every GEPA iteration proposes from W parents taken from the Pareto
  front of paper Alg. 4 (gepa 0.1.4's multi-proposal `sampling_strategy`); proposals of a
  round are evaluated concurrently (DSPy's `batch_evaluate` shares `num_threads`), the
  W reflection calls of a round run one after another (DspyAdapter proposes per task);
- stoppers: a template perfect on dev (`stop_at_score`) or a reflection LM that keeps
  failing (the teacher is unreachable: the phase ends with the templates it has);
- the whole pool, its dev score matrix, the Pareto front, the greedy cover and the K
  templates assigned to every hard question (paper Alg. 2), saved as readable JSON.

Every random choice of the phase is seeded from the phase's one `seed` (`seeds.derive_seed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
from dspy.utils.exceptions import AdapterParseError
from gepa.strategies.eval_policy import FullEvaluationPolicy
from gepa.strategies.proposal_sampling import ProposalTask
from gepa.utils.stop_condition import ScoreThresholdStopper

from dspy_p2o import display
from dspy_p2o.config import BUDGET_PRESETS, PromptPhaseConfig
from dspy_p2o.jsonio import write_json
from dspy_p2o.prompt_phase.pool import assign_templates, greedy_cover, mean_scores, pareto_front, solved_by
from dspy_p2o.renderer import predictors_of
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
    def from_json(cls, data: dict) -> "PromptPhaseResult":
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


class GuardedInstructionProposer(InstructionProposer):
    """DSPy's built-in proposer that (a) counts consecutive reflection failures, so a stopper can
    end the phase when the reflection LM (a remote teacher) stays unreachable, and (b) takes a
    reply that misses DSPy's output format as the instruction itself (`instruction_from_text`),
    as GEPA's own proposer reads its reply leniently: a small self-reflecting model rarely writes
    the format, and GEPA scores every proposal on hard_dev before anything keeps it.

    One reflection call per component (predictor), each read on its own: GEPA's default
    round-robin selector asks for one component per proposal, and a selector asking for several
    gets each reply that missed the format read as that component's instruction."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.consecutive_failures = 0
        self.total_failures = 0
        self.unformatted = 0  # proposals read from a reply that missed the format
        self.last_error: str | None = None

    def __call__(self, candidate, reflective_dataset, components_to_update):
        out = {}
        for name in components_to_update:
            try:
                out.update(super().__call__(candidate=candidate, reflective_dataset=reflective_dataset,
                                            components_to_update=[name]))
            except AdapterParseError as exc:
                text = instruction_from_text(exc.lm_response or "")
                if not text:
                    self._failed(exc)
                    raise
                self.unformatted += 1
                out[name] = text
            except Exception as exc:
                self._failed(exc)
                raise
        self.consecutive_failures = 0
        return out

    def _failed(self, exc: Exception) -> None:
        self.consecutive_failures += 1
        self.total_failures += 1
        self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        logger.warning("reflection LM call failed (%d in a row): %s", self.consecutive_failures, self.last_error)


_FIELD_HEADER = re.compile(r"^\s*\[\[\s*##\s*(\w+)\s*##\s*\]\]\s*$", re.MULTILINE)


def instruction_from_text(reply: str) -> str:
    """The new instruction in a reflection reply that missed DSPy's format: the `new_instruction`
    field when the reply has one (chat headers or a JSON key), else the text inside its code
    fence (GEPA's own proposer), else the whole reply without field headers. "" when nothing is left."""
    text = reply.strip()
    sections = _FIELD_HEADER.split(text)  # [before, name1, body1, name2, body2, ...]
    named = dict(zip(sections[1::2], sections[2::2]))
    if named.get("new_instruction", "").strip():
        text = named["new_instruction"]
    elif (match := re.search(r'"new_instruction"\s*:\s*"((?:[^"\\]|\\.)*)', text)) is not None:
        text = match.group(1).replace('\\n', '\n').replace('\\"', '"')
    elif text.count("```") >= 2:
        text = text.split("```", 1)[1].rsplit("```", 1)[0]
        text = text.split("\n", 1)[1] if re.match(r"[\w-]*\n", text) else text  # a language tag line
    text = _FIELD_HEADER.sub("", text)
    return text.strip()


def reflection_proposer() -> GuardedInstructionProposer:
    """The phase's proposer. The reflection LM is asked in DSPy's chat format, not in the run's
    adapter, which is the STUDENT's trained format and is set in the context around the phase
    (a small self-reflecting model cannot write the JSON object). No second call in JSON on a
    parse failure: the proposer reads a reply that missed the format itself."""
    return GuardedInstructionProposer(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False))


class ReflectionFailureStopper:
    def __init__(self, proposer: GuardedInstructionProposer, max_failures: int) -> None:
        self.proposer, self.max_failures = proposer, max_failures
        self.fired = False

    def __call__(self, state) -> bool:
        if self.proposer.consecutive_failures >= self.max_failures:
            self.fired = True
        return self.fired


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


def _usage_since(lm: dspy.BaseLM, before: set[int]) -> dict:
    """Calls and tokens an LM recorded in its DSPy history since `before`. (dspy.track_usage
    cannot be used: DSPy's ParallelExecutor gives each worker thread a private copy of the
    tracker, so GEPA's threaded evaluations would not be counted.)"""
    new = [e for e in getattr(lm, "history", []) if id(e) not in before]
    tok = lambda *names: sum(int((e.get("usage") or {}).get(n) or 0) for e in new for n in names)  # noqa: E731
    out = {"calls": len(new), "input_tokens": tok("input_tokens", "prompt_tokens"),
           "output_tokens": tok("output_tokens", "completion_tokens")}
    if len(getattr(lm, "history", [])) >= dspy.settings.max_history_size:
        out["note"] = f"lower bound: the LM history is capped at {dspy.settings.max_history_size} entries"
    return out


# --------------------------------------------------------------------------- templates


def _named_predictors(program: dspy.Module) -> list[tuple[str, dspy.Predict]]:
    named = predictors_of(program)
    if not named:
        raise ValueError(f"{type(program).__name__} has no predictors; the prompt phase evolves predictor instructions")
    return named


def template_of(program: dspy.Module) -> Template:
    """The template a (candidate) program carries: every predictor's instruction, in `named_predictors()` order."""
    return Template.from_candidate({name: pred.signature.instructions for name, pred in _named_predictors(program)})


def program_with(program: dspy.Module, template: Template) -> dspy.Module:
    """A deep copy of `program` with the template's instructions (and demos, where it sets them) on its
    predictors and every predictor's `lm` set to None: all of them run on the student LM of the
    surrounding `dspy.context` (an LM object does not deep-copy). The template must name exactly
    the program's predictors."""
    names = [name for name, _ in _named_predictors(program)]
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


def score_templates(program: dspy.Module, templates: Sequence[Template], examples: Sequence[dspy.Example], *,
                    lm: dspy.BaseLM, metric: Callable, num_threads: int) -> list[list[float]]:
    """templates x examples scores of the program with each template (`program_with`; metric failures score 0)."""
    rows = []
    for template in templates:
        evaluate = dspy.Evaluate(devset=list(examples), metric=metric, num_threads=num_threads,
                                 failure_score=0.0, display_progress=False, max_errors=10 ** 9)
        with dspy.context(lm=lm):
            result = evaluate(program_with(program, template))
        rows.append([float(getattr(score, "score", score) or 0.0) for _, _, score in result.results])
    return rows


def run_prompt_phase(program: dspy.Module, hard_examples: Sequence[dspy.Example], *, student_lm: dspy.BaseLM,
                     reflection_lm: dspy.BaseLM, metric: Callable, config: PromptPhaseConfig | None = None,
                     k: int = 6, seed: int = 0, log_dir: str | os.PathLike, epoch: int = 1,
                     progress: bool = False) -> PromptPhaseResult:
    """Run GEPA on the hard set with the current policy as student and assign `k` templates per hard question.

    `program` may have one predictor or several; all of them run on `student_lm`. A template
    (in `assignments` and in the pool) is then the instruction string, or for several predictors
    a dict {predictor name: instruction} naming every predictor (`template_of`); a compound
    pool entry also lists the predictors GEPA `changed` from the seed program. The GEPA budget
    preset scales with the number of predictors (GEPA's auto budget).

    `k` is the number of templated rollouts per group (the run's k - plain_per_group) and
    `seed` the phase's seed (the loop derives it from the run's seed and the epoch); `epoch` the number (from
    1) of the epoch the phase follows, as logs and records name it. `progress` shows the
    phase's live line (metric calls of the budget; dspy_p2o.display).

    Resumable: a finished phase in `log_dir` is loaded, not rerun; an interrupted GEPA run
    continues from its saved state (`log_dir/gepa`).
    """
    cfg = config or PromptPhaseConfig()
    if k < 1:
        raise ValueError(f"run_prompt_phase needs k >= 1 templates per hard question, got {k}")
    log_dir = Path(log_dir)
    ids = _example_ids(hard_examples)
    if len(ids) < cfg.min_hard:
        return PromptPhaseResult(ran=False, reason=f"hard set {len(ids)} < min_hard {cfg.min_hard}", epoch=epoch)
    result_path = log_dir / RESULT_FILE
    if result_path.exists():
        done = PromptPhaseResult.from_json(json.loads(result_path.read_text()))
        if sorted(done.train_ids + done.dev_ids) == sorted(ids):
            logger.info("prompt phase of epoch %d already finished in %s; loaded it", epoch, log_dir)
            done.cost = {**done.cost, "loaded_from": str(result_path)}
            return done
        raise ValueError(f"{result_path} is a finished prompt phase for a different hard set; "
                         "use a fresh log_dir per epoch")
    names = [name for name, _ in _named_predictors(program)]  # a clear error before any work
    metric = safe_metric(metric)
    by_id = dict(zip(ids, hard_examples))
    train_ids, dev_ids = _load_split(log_dir, ids, cfg.dev_size, derive_seed(seed, "split"))
    trainset, devset = [by_id[i] for i in train_ids], [by_id[i] for i in dev_ids]
    max_calls = metric_call_budget(cfg.budget, len(devset), num_components=len(names))

    # GEPA deep-copies the program per candidate; every predictor's LM comes from the context
    student = program_with(program, template_of(program))
    proposer = reflection_proposer()
    failure_stopper = ReflectionFailureStopper(proposer, cfg.max_reflection_failures)
    gepa_dir = str(log_dir / "gepa")
    live = display.GEPAProgress(max_calls, desc=f"prompt phase {epoch}: GEPA on {len(ids)} hard", enabled=progress)
    gepa_kwargs = {"sampling_strategy": ParetoBeamSampling(cfg.beam_width, random.Random(derive_seed(seed, "beam"))),
                   "stop_callbacks": [ScoreThresholdStopper(cfg.stop_at_score), failure_stopper],
                   "use_cloudpickle": True, "val_evaluation_policy": ResumingEvaluationPolicy(gepa_dir),
                   **cfg.gepa_kwargs, "callbacks": [live, *cfg.gepa_kwargs.get("callbacks", [])]}
    optimizer = dspy.GEPA(metric=metric, max_metric_calls=max_calls, reflection_lm=reflection_lm,
                          instruction_proposer=proposer, reflection_minibatch_size=cfg.reflection_minibatch_size,
                          use_merge=cfg.use_merge, num_threads=cfg.num_threads, log_dir=gepa_dir,
                          track_stats=True, seed=derive_seed(seed, "gepa"), warn_on_score_mismatch=False,
                          gepa_kwargs=gepa_kwargs)
    start = time.time()
    logger.info("prompt phase epoch %d: GEPA on %d hard_train / %d hard_dev questions, %d predictor(s), budget %d "
                "metric calls, beam %d, merge %s", epoch, len(trainset), len(devset), len(names), max_calls,
                cfg.beam_width, "on" if cfg.use_merge else "off")
    student_before, reflection_before = _history_ids(student_lm), _history_ids(reflection_lm)
    with dspy.context(lm=student_lm), display.quiet_libraries(), contextlib.closing(live):
        optimized = optimizer.compile(student, trainset=trainset, valset=devset)
        details = optimized.detailed_results
        templates = [template_of(c) for c in details.candidates]
        scores = [[float(sub.get(j, 0.0)) for j in range(len(devset))] for sub in details.val_subscores]
        front = pareto_front(scores, None, random.Random(derive_seed(seed, "front")))
        cover = greedy_cover(scores, front, cfg.solved_threshold)
        means = mean_scores(scores)
        solved = solved_by(scores, dev_ids, threshold=cfg.solved_threshold)
        train_scored = sorted(set(front) | set(cover)) if cfg.score_hard_train and trainset else []
        if train_scored:
            train_scores = score_templates(program, [templates[c] for c in train_scored], trainset, lm=student_lm,
                                           metric=metric, num_threads=cfg.num_threads)
            # train score rows are templates (candidates), columns are hard_train questions
            solved.update(solved_by(train_scores, train_ids, candidates=train_scored,
                                    threshold=cfg.solved_threshold))
    wall = time.time() - start

    rng = random.Random(derive_seed(seed, "assignment"))
    assignments = assign_templates(dev_ids + train_ids, solved, templates, means, cover, k=k, rng=rng,
                                   same_template_in_group=cfg.same_template_in_group)
    pool = []
    for c, template in enumerate(templates):
        entry = {"index": c, "template": template.to_json(), "mean_dev_score": means[c],
                 "parent": next((p for p in (details.parents[c] or []) if p is not None), None),
                 "on_front": c in front, "in_cover": c in cover,
                 "solved_dev": sum(1 for s in scores[c] if s >= cfg.solved_threshold),
                 # GEPA dedupes proposals within a round only: the same text may come back later
                 "duplicate_of": templates.index(template) if templates.index(template) != c else None}
        if len(template) > 1:  # a compound program: the predictors GEPA evolved from the seed (index 0)
            entry["changed"] = [name for name in template if template[name] != templates[0][name]]
        pool.append(entry)
    assigned = {t for ts in assignments.values() for t in ts}
    reason = "ok"
    if failure_stopper.fired:
        reason = (f"reflection LM failed {cfg.max_reflection_failures} times in a row ({proposer.last_error}); "
                  f"stopped early with {len(templates)} templates")
        logger.warning("prompt phase epoch %d: %s", epoch, reason)
    elif max(means, default=0.0) >= cfg.stop_at_score:
        reason = f"a template reached mean dev score {max(means):.3f} >= stop_at_score {cfg.stop_at_score}"
    cost = {
        "metric_calls_gepa": details.total_metric_calls,
        "metric_calls_budget": max_calls,
        "metric_calls_hard_train": len(train_scored) * len(trainset),
        "student_lm": _usage_since(student_lm, student_before),
        "reflection_lm": _usage_since(reflection_lm, reflection_before),
        "reflection_failures": proposer.total_failures,
        "reflection_unformatted": proposer.unformatted,
        "templates_accepted": len(templates) - 1,
        "templates_assigned": sum(1 for e in pool if e["duplicate_of"] is None and templates[e["index"]] in assigned),
        "questions_assigned": len(assignments),
        "wall_time_s": round(wall, 3),
    }
    result = PromptPhaseResult(ran=True, reason=reason, assignments=assignments, pool=pool, dev_ids=dev_ids,
                               train_ids=train_ids, scores=scores, cost=cost, epoch=epoch)
    result.save(result_path)
    logger.info("prompt phase epoch %d: %d templates (%d on the front, cover %d), best mean dev score %.3f, "
                "%d questions assigned, %.1fs", epoch, len(templates), len(front), len(cover),
                max(means, default=0.0), len(assignments), wall)
    return result
