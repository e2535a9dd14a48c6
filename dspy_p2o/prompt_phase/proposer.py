"""GEPA's reflection step: DSPy's instruction proposer, guarded, and the W reflection calls of a
round run side by side.

`GuardedInstructionProposer` is DSPy's built-in proposer (its reflection prompt, the reflective
dataset DSPy's adapter builds), reading a reply that misses DSPy's format leniently and counting
failures. `ConcurrentReflection` is gepa's reflection strategy (`gepa.optimize(reflection_strategy=)`):
the W tasks of a round (W parents from the Pareto beam) are proposed in W threads, each under its own
copy of the reflection LM -- seeded per task when the LM samples in process (self-reflection's pi_init,
a custom engine), so a round's proposals do not depend on which thread ran first -- and their results,
usage and failures are taken in task order. A provider's model gets no seed (not every provider
accepts one): its samples are the provider's.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import dspy
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
from dspy.utils.exceptions import AdapterParseError
from gepa.proposer.reflective_mutation.reflection_lm import ReflectionProposal

from dspy_p2o.prompt_phase.bill import Bill, priced_model
from dspy_p2o.seeds import derive_seed

logger = logging.getLogger(__name__)


@dataclass
class Proposed:
    """What one reflection task gave: new texts, or the error that ended it."""

    texts: dict[str, str]
    unformatted: int = 0  # texts read from a reply that missed DSPy's format
    error: Exception | None = None


class GuardedInstructionProposer(InstructionProposer):
    """DSPy's built-in proposer that (a) counts consecutive reflection failures, so a stopper can
    end the phase when the reflection LM (a remote teacher) stays unreachable, and (b) takes a
    reply that misses DSPy's output format as the instruction itself (`instruction_from_text`),
    as GEPA's own proposer reads its reply leniently: a small self-reflecting model rarely writes
    the format, and GEPA scores every proposal on hard_dev before anything keeps it.

    One reflection call per component (predictor), each read on its own: GEPA's default
    round-robin selector asks for one component per proposal, and a selector asking for several
    gets each reply that missed the format read as that component's instruction.

    `attempt` never raises and counts nothing (it runs in a worker thread); `count` books its
    result (in task order); calling the proposer does both (gepa's ProposalFn protocol). (Not
    `propose`: DSPy's proposer keeps its reflection Predict under that name.)"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.consecutive_failures = 0
        self.total_failures = 0
        self.unformatted = 0  # proposals read from a reply that missed the format
        self.last_error: str | None = None

    def attempt(self, candidate, reflective_dataset, components_to_update) -> Proposed:
        out, unformatted = {}, 0
        for name in components_to_update:
            try:
                out.update(super().__call__(candidate=candidate, reflective_dataset=reflective_dataset,
                                            components_to_update=[name]))
            except AdapterParseError as exc:
                text = instruction_from_text(exc.lm_response or "")
                if not text:
                    return Proposed({}, unformatted, exc)
                unformatted += 1
                out[name] = text
            except Exception as exc:
                return Proposed({}, unformatted, exc)
        return Proposed(out, unformatted)

    def count(self, result: Proposed) -> None:
        self.unformatted += result.unformatted
        if result.error is None:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        self.total_failures += 1
        self.last_error = f"{type(result.error).__name__}: {str(result.error)[:300]}"
        logger.warning("reflection LM call failed (%d in a row): %s", self.consecutive_failures, self.last_error)

    def __call__(self, candidate, reflective_dataset, components_to_update):
        result = self.attempt(candidate, reflective_dataset, components_to_update)
        self.count(result)
        if result.error is not None:
            raise result.error
        return result.texts


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


class ConcurrentReflection:
    """gepa's ReflectionLM strategy: a round's W reflection tasks in W threads, results in task order.

    Task j of round r runs under `lm.copy(seed=derive_seed(seed, "reflection", r, j))` for an
    in-process LM (unseeded for a provider's model) in a copy of the caller's context (DSPy's
    settings), so its outcome depends on its task alone. Every task's calls and tokens (and, for a
    provider's model, their price) go to the phase's `Bill`; `total_cost` is what gepa's
    `max_reflection_cost` stopper reads."""

    def __init__(self, proposer: GuardedInstructionProposer, lm: dspy.BaseLM, *, bill: Bill, seed: int,
                 max_workers: int) -> None:
        self.proposer, self.lm, self.bill, self.seed = proposer, lm, bill, seed
        self.max_workers = max(1, int(max_workers))
        self.seeded = priced_model(lm) is None
        self.rounds = 0  # reflect_many calls so far (kept in gepa's saved state through the adapter)

    @property
    def total_cost(self) -> float:
        return self.bill.cost_usd or 0.0

    def _task_lm(self, round_: int, task: int) -> dspy.BaseLM:
        return self.lm.copy(seed=derive_seed(self.seed, "reflection", round_, task)) if self.seeded else self.lm.copy()

    def reflect(self, candidate, reflective_dataset, components_to_update):
        return self.reflect_many([(candidate, reflective_dataset, components_to_update)])[0]

    def reflect_many(self, jobs: Sequence[tuple[dict[str, str], Mapping[str, Any], list[str]]]):
        start = time.perf_counter()
        round_, self.rounds = self.rounds, self.rounds + 1
        lms = [self._task_lm(round_, j) for j in range(len(jobs))]
        contexts = [contextvars.copy_context() for _ in jobs]  # one per thread: a Context runs in one thread

        def run(j: int) -> Proposed:
            def task() -> Proposed:
                with dspy.context(lm=lms[j]):
                    return self.proposer.attempt(*jobs[j])
            return contexts[j].run(task)

        if len(jobs) <= 1:
            results = [run(j) for j in range(len(jobs))]
        else:
            with ThreadPoolExecutor(max_workers=min(len(jobs), self.max_workers),
                                    thread_name_prefix="dspy-p2o-reflection") as pool:
                results = list(pool.map(run, range(len(jobs))))
        # task order: counts and usage do not depend on timing; the round's wall time once
        self.bill.record_reflection([e for lm in lms for e in getattr(lm, "history", [])], time.perf_counter() - start)
        out = []
        for result in results:
            self.proposer.count(result)
            out.append((ReflectionProposal(new_texts=dict(result.texts) if result.error is None else {}), self))
        return out
