"""Paper Alg. 1: alternate GRPO with context distillation (phase 1) and GEPA on the hard set (phase 2).

Per epoch t:
  phase 1  every batch: K rollouts per question -- T(x, z) for questions that were hard in
           t-1 and got templates, x otherwise -- a GRPO update with the gradient on x,
           and hard mining from the rewards;
  sync     the engine serves the new weights: after every step (trainer sync="step", the
           default) or once at the end of phase 1 (sync="epoch"); a resume syncs once, when
           the trainer loads its checkpoint;
  phase 2  GEPA on the new hard set -> template pool -> K templates per hard question.

Everything needed to resume lives in the run directory: the loop state (state.json,
`LoopState`) points at the last trainer checkpoint, written after every
`checkpoint_every` batches and around the prompt phase, so a killed run continues where
it stopped.

Under N processes (torchrun / accelerate launch) the same loop runs on every rank:
each rank rolls out its contiguous share of every batch (whole GRPO groups) with its
own engine replica or the shared server, the trainer sums the ranks' gradients (DDP),
the rewards are gathered so every rank mines the same hard set, GEPA runs on the main
process only and its assignment is broadcast, and only the main process writes the run
directory. Batch size, K and the number of optimiser steps do not depend on N.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dspy

from dspy_p2o import display
from dspy_p2o.config import ConfigError, P2OConfig
from dspy_p2o.data import validate_examples
from dspy_p2o.engines import Engine, make_engine, make_reference_engine
from dspy_p2o.engines.hf import check_model_path
from dspy_p2o.models import ModelPackageMissing
from dspy_p2o.jsonio import write_json, write_jsonl
from dspy_p2o.loop_state import LoopState
from dspy_p2o.metrics import MetricsLogger, check_trackers, read_metrics
from dspy_p2o.passk import mean_pass_at_k
from dspy_p2o.program_rollouts import collect_program_rollouts
from dspy_p2o.prompt_phase.gepa_phase import run_prompt_phase
from dspy_p2o.prompt_phase.hard import mine_hard
from dspy_p2o.prompt_phase.reflection import close_reflection_lm, make_reflection_lm, preflight
from dspy_p2o.renderer import Renderer, make_adapter, program_input_fields, servable_predictors
from dspy_p2o.rewards import MetricError, check_metric, configure_verifier
from dspy_p2o.rollouts import Rollout, collect_rollouts, make_reward_fn
from dspy_p2o.run_dir import RunDir, identity_of
from dspy_p2o.trainer import GRPOTrainer, make_accelerator

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    """What `compile` returns. `program` answers with the trained weights and its ORIGINAL instructions."""

    program: dspy.Module
    checkpoint: Path
    history: list[dict[str, Any]]
    templates: dict[str, list[Any]]  # per hard question: instructions (str), or {predictor: instruction}
    run_dir: Path
    engine: Engine | None = field(default=None, repr=False)
    adapter: dspy.Adapter | None = None  # the run's DSPy adapter: serve with dspy.context(adapter=result.adapter)

    def close(self) -> None:
        """Release the engine serving `program` (a managed vLLM server, its weights in /dev/shm)."""
        if self.engine is not None:
            self.engine.close()

    def __enter__(self) -> "CompileResult":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def with_ids(examples: list[dspy.Example], prefix: str) -> list[dspy.Example]:
    """Every example gets a stable, unique `id` (its own when present)."""
    out, seen = [], set()
    for i, ex in enumerate(examples):
        if not isinstance(ex, dspy.Example):
            raise TypeError(f"{prefix}[{i}] is a {type(ex).__name__}, not a dspy.Example")
        ident = str(ex.get("id", None) or f"{prefix}/{i}")
        if ident in seen:
            raise ValueError(f"{prefix}[{i}] repeats the id {ident!r}; example ids must be unique")
        seen.add(ident)
        out.append(ex if ex.get("id", None) == ident else ex.copy(id=ident))
    return out


class P2OLoop:
    def __init__(self, program: dspy.Module, trainset: list[dspy.Example], *, metric: Callable, policy: str,
                 config: P2OConfig, run_dir: str | Path, valset: list[dspy.Example] | None = None,
                 reflection_lm: dspy.BaseLM | None = None) -> None:
        if config.reflection == "custom" and reflection_lm is None:
            raise ValueError('reflection="custom" needs the reflection LM object itself (compile(..., reflection=lm))')
        self.program, self.metric, self.policy, self.config = program, metric, str(policy), config
        self._given_reflection_lm = self._reflection_lm = reflection_lm
        try:
            self.predictors = servable_predictors(program)  # (name, predictor); several: a compound program
            inputs = (list(self.predictors[0][1].signature.input_fields) if len(self.predictors) == 1
                      else program_input_fields(program))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.trainset = with_ids(list(trainset), "train")
        validate_examples(self.trainset, inputs)
        self.valset = with_ids(list(valset), "val") if valset else []
        if self.valset:
            validate_examples(self.valset, inputs)
        if not self.trainset:
            raise ValueError("the trainset is empty")
        self.by_id = {ex.id: ex for ex in self.trainset}
        self.metric = check_metric(metric, self.trainset[0], timeout_s=config.rewards.metric_timeout_s)  # before any work
        configure_verifier(workers=config.rewards.verify_workers, memory_mb=config.rewards.verify_memory_mb)
        check_trackers(config.trackers)  # a missing tracker package: one line, before any work
        try:
            self.policy = check_model_path(self.policy)
        except (FileNotFoundError, ModelPackageMissing) as exc:
            raise ConfigError(str(exc)) from None
        self.run = RunDir(run_dir)
        self.accelerator = make_accelerator(config.trainer.dtype, config.trainer.process_timeout_s)
        self.is_main = self.accelerator.is_main_process
        self._check_teacher()
        # Held for the run's lifetime (main process only); nothing is written before the run starts.
        self._lock = self.run.lock() if self.is_main else None
        try:
            self.identity = identity_of(config, self.policy, list(self.by_id))
            self.resuming = self._open_run_dir(self.identity)
        except BaseException:
            self.release()
            raise
        self.batches_per_epoch = -(-len(self.trainset) // config.batch_size)
        self.wait_s = 0.0  # this process's seconds blocked waiting for the others (gathers, broadcasts)
        self._epoch_start = time.perf_counter()  # reset when phase 1 starts; the wait fraction's denominator

    def _open_run_dir(self, identity: dict[str, Any]) -> bool:
        """The main process creates or checks the run directory; the others take its verdict
        (True when resuming) rather than race it. Its error is raised on every process."""
        from accelerate.utils import broadcast_object_list

        verdict: list[Any] = [None]
        error: Exception | None = None
        if self.is_main:
            try:
                verdict = [(self.run.check(self.config, identity), None)]
            except Exception as exc:  # every rank must hear of it, or the others wait forever
                error, verdict = exc, [(False, f"{type(exc).__name__}: {exc}")]
        resuming, message = broadcast_object_list(verdict)[0]
        if error is not None:
            raise error
        if message is not None:
            raise ConfigError(f"on the main process: {message}")
        return resuming

    def release(self) -> None:
        """Let go of the run directory (run_loop does this when it ends, however it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        cfg = self.config
        steps_per_batch = 1
        if cfg.trainer.mini_batch_size:
            steps_per_batch = -(-min(cfg.batch_size, len(self.trainset)) // cfg.trainer.mini_batch_size)
        steps_per_batch *= cfg.trainer.updates_per_batch
        total_steps = cfg.epochs * self.batches_per_epoch * steps_per_batch
        acc = self.accelerator
        self.logger = MetricsLogger(self.run.metrics_file, accelerator=acc, trackers=tuple(cfg.trackers),
                                    config=cfg.to_dict())
        if cfg.engine == "local":
            # The engine samples from the trainer's own module (this rank's replica): weight sync costs nothing.
            self.trainer = GRPOTrainer(self.policy, config=cfg.trainer, temperature=cfg.temperature, seed=cfg.seed,
                                       total_steps=total_steps, accelerator=acc)
            self.engine = make_engine(cfg, self.trainer.model, tokenizer=self.trainer.tokenizer)
            self.trainer.engine = self.engine
        else:
            self.engine = make_engine(cfg, self.policy, processes=acc.num_processes)
            self.trainer = GRPOTrainer(self.policy, config=cfg.trainer, temperature=cfg.temperature, seed=cfg.seed,
                                       engine=self.engine, total_steps=total_steps, accelerator=acc)
        self.adapter = make_adapter(cfg.adapter)
        self.renderers = {name: Renderer(pred, self.engine.tokenizer, adapter=self.adapter, name=name)
                          for name, pred in self.predictors}
        # one predictor: its render is the program's prompt (no execution needed: rollouts.py)
        self.renderer = next(iter(self.renderers.values())) if len(self.renderers) == 1 else None
        self.reward_fn = make_reward_fn(self.renderer, self.metric)

    def reflection_lm(self) -> dspy.LM:
        """Built on first use: self-reflection loads a second, frozen copy of the initial policy."""
        if self._reflection_lm is None:
            cfg = self.config
            limits = {"num_retries": cfg.reflection_retries, "timeout": cfg.reflection_timeout_s}
            if cfg.reflection == "self":
                limits = {}
            self._reflection_lm = make_reflection_lm(
                cfg.reflection, self_engine_factory=self._initial_policy_engine,
                max_tokens=cfg.reflection_max_tokens, **{**limits, **cfg.reflection_kwargs})
        return self._reflection_lm

    def _check_teacher(self) -> None:
        """A teacher's config (model, api_key_env) and, with reflection_preflight, its endpoint
        and key are checked at start -- not after a whole epoch -- and its limits reported."""
        cfg = self.config
        if not (cfg.method == "p2o" and cfg.reflection.startswith("teacher:")):
            return
        try:
            lm = self.reflection_lm()
            seconds = preflight(lm) if cfg.reflection_preflight and self.is_main else None  # GEPA runs on main
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(str(exc)) from None
        limits = f"retries {lm.num_retries}, timeout {lm.kwargs.get('timeout', 'litellm default')} s per attempt"
        display.line(f"reflection teacher {lm.model}: " + (f"preflight ok in {seconds:.1f} s; " if seconds is not None
                                                           else "preflight off; ") + limits,
                     cfg.progress and self.is_main)

    def _initial_policy_engine(self) -> Engine:
        """pi_init for self-reflection: a second, frozen engine on the initial weights, never the policy."""
        return make_reference_engine(self.config, self.policy)

    # ------------------------------------------------------------------ state
    def _checkpoint(self, state: LoopState) -> None:
        """Save the trainer (every rank, through accelerate's save_state; only when it stepped
        since the last save), then the loop state (main process), and only then prune old checkpoints."""
        if state.checkpoint_step != self.trainer.global_step or not state.checkpoint:
            path = self.trainer.save_checkpoint(self.run.checkpoints, prune=False,
                                                extra_state={"loop_epoch": state.epoch, "loop_batch": state.batch})
            state.checkpoint, state.checkpoint_step = str(path), self.trainer.global_step
        state.metrics_offset = self.logger.offset()  # what a resume keeps of metrics.jsonl
        if self.is_main:
            self.run.save_state(state.to_json())
        self.trainer.prune_checkpoints(self.run.checkpoints)  # only now: state.json never points at a deleted one

    def _restore(self) -> LoopState:
        state = LoopState.from_json(self.run.load_state())
        state.checkpoint = self.run.resumable_checkpoint(state.checkpoint)
        state.done = state.epoch >= self.config.epochs  # more epochs on resume continue a finished run
        if state.metrics_offset is not None:  # steps after the saved state are replayed: drop their records
            self.logger.truncate(state.metrics_offset)
        if state.checkpoint:
            extra = self.trainer.load_checkpoint(state.checkpoint)
            if (extra.get("loop_epoch"), state.phase) == (state.epoch, "train") and \
                    extra.get("loop_batch", 0) > state.batch:  # a newer checkpoint than state.json knew
                state.batch = extra["loop_batch"]  # never train its batches twice
            # (load_checkpoint has synced the engine: one owner of the resume sync)
            log.info("resumed %s at epoch %d, %s phase, batch %d (optimizer step %d)", self.run.path,
                     state.epoch, state.phase, state.batch, self.trainer.global_step)
        return state

    def _gather(self, items: list[Any]) -> list[Any]:
        """Every process's `items`, concatenated in rank order (the time blocked is counted as waiting)."""
        from accelerate.utils import gather_object

        start = time.perf_counter()
        out = gather_object(items)
        self.wait_s += time.perf_counter() - start
        return out

    def _from_main(self, value: Any) -> Any:
        """The main process's `value` on every process."""
        from accelerate.utils import broadcast_object_list

        start = time.perf_counter()
        out = broadcast_object_list([value])[0]
        self.wait_s += time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ Alg. 1
    def run_loop(self) -> CompileResult:
        with display.quiet_libraries():  # the phases' live lines only, unless verbose
            return self._run_loop()

    def _run_loop(self) -> CompileResult:
        try:
            self._build()  # the model loads and the engine starts BEFORE the run dir is claimed
        except BaseException:
            self.release()
            raise
        try:
            if self.is_main:
                self.run.start(self.config, self.identity, self.resuming)
            self.accelerator.wait_for_everyone()
            state = self._restore() if self.resuming else LoopState()
            while not state.done:
                if state.phase == "train":
                    self._phase1(state)
                    state.phase = "prompt"
                    self._checkpoint(state)
                if state.phase == "prompt":
                    self._phase2(state)
                    self._end_epoch(state)
            return self._result(state)
        except BaseException:
            self.engine.close()  # nothing returned will use it: stop its server now, not at exit
            raise
        finally:
            self._close_reflection_lm()
            self.logger.close()
            self.release()

    def _close_reflection_lm(self) -> None:
        """The pi_init engine (a second model or vLLM server) is needed only inside the loop."""
        if self._reflection_lm is not None and self._given_reflection_lm is None:
            close_reflection_lm(self._reflection_lm)
            self._reflection_lm = None

    def _batches(self, epoch: int) -> list[list[dspy.Example]]:
        order = list(self.trainset)
        if self.config.shuffle:
            random.Random(self.config.seed * 1000 + epoch).shuffle(order)
        size = self.config.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _phase1(self, state: LoopState) -> None:
        cfg, epoch, acc = self.config, state.epoch, self.accelerator
        batches = self._batches(epoch)
        self._epoch_start, self.wait_s = time.perf_counter(), 0.0
        trains = state.batch < len(batches)  # False on a resume after the epoch's last batch
        shown = cfg.progress and self.is_main
        bar = display.live(len(batches), initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                           enabled=shown)
        for b in range(state.batch, len(batches)):
            assignments = {i: z for i, z in state.assignments.items()} if cfg.method == "p2o" else {}
            share = shard(batches[b], acc.process_index, acc.num_processes)
            t0 = time.perf_counter()
            rollouts = self._collect(
                share, k=cfg.k, temperature=cfg.temperature,
                seed=cfg.seed * 100_003 + epoch * 1_009 + b + acc.process_index * 7_919,
                assignments=assignments, plain_per_group=cfg.plain_per_group,
                progress=shown and display.verbose())  # the phase's live line: the epoch bar below
            t_rollout = time.perf_counter() - t0
            waited = self.wait_s
            failures = self._metric_failures(epoch, b)
            state.metric_failures += failures
            self._record_rewards(state, rollouts)
            metrics = self.trainer.train_on(rollouts)
            metrics.update(epoch=epoch, batch=b, time_rollout=t_rollout, time_wait=self.wait_s - waited,
                           metric_failures=failures)
            self.logger.log(metrics, step=self.trainer.global_step, prefix="train/")
            state.batch = b + 1
            if state.batch % cfg.checkpoint_every == 0 or state.batch == len(batches):
                self._checkpoint(state)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", step=self.trainer.global_step)
        bar.close()
        if trains and cfg.trainer.sync == "epoch":  # with sync="step" the last step has synced
            self.trainer.sync_engine()  # GEPA and the next epoch sample the new weights

    def _collect(self, examples: list[dspy.Example], *, k: int, temperature: float, seed: int,
                 assignments: dict[str, list[Any]] | None = None, plain_per_group: int = 0,
                 progress: bool = False) -> list[Rollout]:
        """k scored rollouts per example: the one predictor's prompts sampled directly (rollouts.py), or
        the whole compound program executed (program_rollouts.py)."""
        cfg = self.config
        sampling = dict(k=k, temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                        seed=seed, assignments=assignments, plain_per_group=plain_per_group, progress=progress)
        if self.renderer is not None:
            return collect_rollouts(self.engine, self.renderer, examples, self.reward_fn, **sampling)
        return collect_program_rollouts(self.engine, self.program, self.renderers, examples, self.reward_fn,
                                        **sampling)

    def _metric_failures(self, epoch: int, b: int) -> int:
        """The batch's failed metric calls (scored 0) on every process; a batch where every call
        failed aborts the run (on every process alike)."""
        counts = self._gather([self.reward_fn.take_counts()])
        calls, failures = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if calls and failures == calls:
            last = next((c[2] for c in reversed(counts) if c[2]), "")
            raise MetricError(f"the metric failed on all {calls} rollouts of batch {b + 1} (epoch {epoch + 1}); "
                              f"the last error: {last}")
        return failures

    def _record_rewards(self, state: LoopState, rollouts: list[Rollout]) -> None:
        """Rewards for hard mining, and with-vs-without-template success for the Fig. 4 plot,
        gathered from every process (each holds whole groups) in batch order."""
        use_plain = self.config.hardness_on == "plain"
        groups: dict[str, list[Rollout]] = {}
        for r in rollouts:
            groups.setdefault(r.example_id, []).append(r)
        local = [(ident, [r.reward for r in g], [r.reward for r in g if not r.templated],
                  [r.reward for r in g if r.templated]) for ident, g in groups.items()]
        stats = state.templated_stats.setdefault(str(state.epoch), {"templated": [], "plain": []})
        for ident, every, plain, templated in self._gather(local):
            if ident in state.rewards:
                raise RuntimeError(f"question {ident!r} was rolled out twice in epoch {state.epoch + 1}")
            state.rewards[ident] = plain if use_plain and plain else every
            if templated:
                stats["templated"].append(templated)
                if plain:
                    stats["plain"].append(plain)

    def _phase2(self, state: LoopState) -> None:
        cfg, epoch = self.config, state.epoch
        rewards = state.rewards
        hard = mine_hard(rewards, tau=cfg.tau, near_hard=cfg.near_hard)
        if self.is_main:
            write_jsonl(self.run.rewards_file(epoch), ({"id": i, "rewards": r} for i, r in rewards.items()))
            write_jsonl(self.run.hard_file(epoch), (
                {"id": i, "success_rate": sum(rewards[i]) / len(rewards[i]), "rewards": rewards[i]} for i in hard))
        state.hard_count = len(hard)
        record: dict[str, Any] = {"epoch": epoch, "ran": False, "hard": len(hard)}
        if cfg.method == "grpo":
            record["reason"] = "prompt phase disabled (GRPO baseline)"
        elif epoch == cfg.epochs - 1:
            record["reason"] = "last epoch: no later epoch would use new templates"
        elif len(hard) < cfg.prompt.min_hard:
            record["reason"] = f"hard set {len(hard)} < min_hard {cfg.prompt.min_hard}"
        elif self.is_main:  # GEPA runs once, on the main process (with the local engine: its replica)
            record = self._run_gepa(epoch, hard)
        record = self._from_main(record)
        if self.is_main:
            write_json(self.run.templates_file(epoch), record)
        state.assignments = record.get("assignments", {})

    def _run_gepa(self, epoch: int, hard: list[str]) -> dict[str, Any]:
        cfg = self.config
        student = self.engine.dspy_lm(temperature=cfg.temperature, max_tokens=cfg.max_tokens)
        program = self.program.deepcopy()  # the student LM comes from the context (an LM does not deep-copy)
        with dspy.context(adapter=self.adapter):  # GEPA sees the format that is trained
            result = run_prompt_phase(
                program, [self.by_id[i] for i in hard], student_lm=student, reflection_lm=self.reflection_lm(),
                metric=self.metric, config=cfg.prompt, k=cfg.k - cfg.plain_per_group, seed=cfg.seed + epoch,
                log_dir=self.run.gepa_dir(epoch), epoch=epoch, progress=cfg.progress)
        self.logger.log({f"gepa/{k}": v for k, v in result.cost.items() if isinstance(v, (int, float))},
                        step=self.trainer.global_step)
        return {"epoch": epoch, "hard": len(hard), **result.to_json()}

    def _end_epoch(self, state: LoopState) -> None:
        cfg, epoch = self.config, state.epoch
        entry = {"epoch": epoch + 1, "step": self.trainer.global_step, "hard": state.hard_count,
                 "templated_questions": len(state.assignments),
                 "train_reward": _mean([r for rs in state.rewards.values() for r in rs]),
                 "metric_failures": state.metric_failures}
        entry.update(_template_success(state.templated_stats.get(str(epoch))))
        if self.valset and cfg.eval_every_epoch:
            entry.update(self.evaluate(self.valset))
        entry.update(self._wait_fractions())
        self.logger.log({f"epoch/{k}": v for k, v in entry.items()}, step=self.trainer.global_step)
        state.history.append(entry)
        display.line(f"epoch {epoch + 1}/{cfg.epochs}: step {entry['step']}, train reward {entry['train_reward']:.3f}, "
                     f"hard {entry['hard']}, templated next {entry['templated_questions']}"
                     + (f", val acc {entry['val/pass@1']:.3f}" if "val/pass@1" in entry else ""),
                     cfg.progress and self.is_main)
        state.epoch, state.phase, state.batch, state.rewards, state.metric_failures = epoch + 1, "train", 0, {}, 0
        state.done = state.epoch >= cfg.epochs
        self._checkpoint(state)
        if self.is_main:
            self._write_reports(state)

    def _wait_fractions(self) -> dict[str, float]:
        """Per process: the fraction of this epoch (since the loop entered it) spent blocked
        waiting for the other processes at the loop's gathers and broadcasts (multi-process only)."""
        if self.accelerator.num_processes == 1:
            return {}
        elapsed = time.perf_counter() - self._epoch_start
        fractions = self._gather([self.wait_s / max(1e-9, elapsed)])
        return {f"wait_frac/rank{r}": f for r, f in enumerate(fractions)}

    def evaluate(self, examples: list[dspy.Example]) -> dict[str, float]:
        """pass@1 (the mean reward) and, when eval_k > 1, the unbiased pass@eval_k, WITHOUT templates:
        greedy for one sample, else sampled.
        Each process evaluates its share; the rewards are gathered."""
        cfg, acc = self.config, self.accelerator
        rollouts = self._collect(shard(examples, acc.process_index, acc.num_processes), k=cfg.eval_k,
                                 temperature=0.0 if cfg.eval_k == 1 else cfg.temperature, seed=cfg.seed, progress=False)
        by_id: dict[str, list[float]] = {}
        for ident, reward in self._gather([(r.example_id, r.reward) for r in rollouts]):
            by_id.setdefault(ident, []).append(reward)
        failures = sum(c[1] for c in self._gather([self.reward_fn.take_counts()]))
        out = {"val/pass@1": _mean([_mean(v) for v in by_id.values()]), "val/metric_failures": failures}
        if cfg.eval_k > 1:
            out[f"val/pass@{cfg.eval_k}"] = mean_pass_at_k(by_id.values(), cfg.eval_k)
        return out

    def _write_reports(self, state: LoopState) -> None:
        from dspy_p2o.reports import write_plots, write_summary

        try:
            write_plots(self.run, read_metrics(self.run.metrics_file), state.history)
        except Exception as exc:  # a plotting problem must never cost a training run
            log.warning("could not write plots: %s", exc)
        write_summary(self.run, self.config, state.history, state.assignments, state.checkpoint)

    def _result(self, state: LoopState) -> CompileResult:
        checkpoint = Path(state.checkpoint) / "model"  # save_pretrained model + tokenizer
        program = self.program.deepcopy()  # ORIGINAL instructions: no template at inference
        program.set_lm(self.engine.dspy_lm(temperature=0.0, max_tokens=self.config.max_tokens))
        return CompileResult(program=program, checkpoint=checkpoint, history=state.history,
                             templates=state.assignments, run_dir=self.run.path, engine=self.engine,
                             adapter=self.adapter)


# ---------------------------------------------------------------------- helpers
def shard(items: list[Any], index: int, count: int) -> list[Any]:
    """Process `index`'s contiguous share of `items` among `count` processes (sizes differ by at
    most one; the shares in rank order are `items`)."""
    return items[len(items) * index // count:len(items) * (index + 1) // count]


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _template_success(stats: dict[str, list[list[float]]] | None) -> dict[str, float]:
    """pass@1 (mean reward) / pass@K (K = the group's size: any success) of hard questions with
    their templates vs without (paper Fig. 4)."""
    if not stats or not stats["templated"]:
        return {}
    out = {"templated/pass@1": _mean([_mean(g) for g in stats["templated"]]),
           "templated/pass@k": mean_pass_at_k(stats["templated"])}
    if stats["plain"]:
        out["plain/pass@1"] = _mean([_mean(g) for g in stats["plain"]])
        out["plain/pass@k"] = mean_pass_at_k(stats["plain"])
    return out
