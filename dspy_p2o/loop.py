"""Paper Alg. 1: alternate GRPO with context distillation (phase 1) and GEPA on the hard set (phase 2).

Per epoch t:
  phase 1  every batch: K rollouts per question -- T(x, z) for questions that were hard in
           t-1 and got templates, x otherwise -- a GRPO update with the gradient on x,
           and hard mining from the rewards;
  sync     the engine serves the new weights: after every step (trainer sync="step", the
           default) or once at the end of phase 1 (sync="epoch"); a resume syncs once, after
           the trainer loads its checkpoint;
  phase 2  GEPA on the new hard set -> template pool -> K templates per hard question.

Everything needed to resume lives in the run directory: the loop state (state.json,
`LoopState`) points at the last trainer checkpoint, written after every
`checkpoint_every` batches and around the prompt phase, so a killed run continues where
it stopped.

Under N processes (torchrun / accelerate launch) the same loop runs on every rank:
each rank rolls out its contiguous share of every batch (whole GRPO groups) with its
own engine replica or the shared server, the trainer sums the ranks' gradients (DDP),
the batch's outcomes are gathered once so every rank mines the same hard set and plans
the same optimiser steps, GEPA runs on the main process only and its assignment is
broadcast, and only the main process writes the run directory (`collectives.py`). Batch
size, K and the number of optimiser steps do not depend on N.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dspy

from dspy_p2o import display
from dspy_p2o.batch import GlobalBatch
from dspy_p2o.checkpoints import human_bytes
from dspy_p2o.collectives import Collectives
from dspy_p2o.config import ConfigError, P2OConfig
from dspy_p2o.data import validate_examples
from dspy_p2o.engines import Engine
from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.engines.hf import check_model_path
from dspy_p2o.jsonio import write_json, write_jsonl
from dspy_p2o.loop_state import LoopState
from dspy_p2o.metrics import MetricsLogger, check_trackers, read_metrics
from dspy_p2o.models import ModelPackageMissing
from dspy_p2o.passk import mean_pass_at_k
from dspy_p2o.program_eval import ProgramScores
from dspy_p2o.prompt_phase.evaluation import PolicyStudent
from dspy_p2o.prompt_phase.fewshot import POOL_CAP, bootstrap_record
from dspy_p2o.prompt_phase.gepa_phase import run_prompt_phase
from dspy_p2o.prompt_phase.hard import mine_hard
from dspy_p2o.renderer import make_adapter, program_input_fields, program_renderers, servable_predictors
from dspy_p2o.resources import RunResources
from dspy_p2o.rewards import MetricError, check_metric, configure_verifier
from dspy_p2o.rollouts import RolloutBatch, collect_rollouts
from dspy_p2o.run_dir import RunDir, identity_of
from dspy_p2o.seeds import derive_seed
from dspy_p2o.serving import serve_with_adapter
from dspy_p2o.trainer import make_accelerator

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    """What `compile` returns. `program` answers with the trained weights, its ORIGINAL instructions
    and the run's adapter (no `dspy.context` needed). `checkpoint` is the last checkpoint's model
    directory; in a LoRA run (trainer.lora) the trained LoRA adapter, loadable with peft or vLLM's
    --lora-modules and merged into a model directory by `dspy-p2o merge` (`dspy_p2o.merge_adapter`)."""

    program: dspy.Module
    checkpoint: Path
    history: list[dict[str, Any]]
    templates: dict[str, list[Any]]  # per hard question: its templates (template.Template's JSON)
    run_dir: Path
    engine: Engine | None = field(default=None, repr=False)
    adapter: dspy.Adapter | None = None  # the run's DSPy adapter (the program already serves with it)

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
    #: say at start (and in summary.md) where the run writes and what each checkpoint costs on disk
    announces_disk = True

    def __init__(self, program: dspy.Module, trainset: list[dspy.Example], *, metric: Callable, policy: str,
                 config: P2OConfig, run_dir: str | Path, valset: list[dspy.Example] | None = None,
                 reflection_lm: dspy.BaseLM | None = None) -> None:
        if config.reflection == "custom" and reflection_lm is None:
            raise ValueError('reflection="custom" needs the reflection LM object itself (compile(..., reflection=lm))')
        self.program, self.config = program, config
        self.trainset, self.valset = self._checked_examples(program, trainset, valset)
        self.by_id = {ex.id: ex for ex in self.trainset}
        self.metric = check_metric(metric, self.trainset[0], timeout_s=config.rewards.metric_timeout_s)  # before any work
        configure_verifier(workers=config.rewards.verify_workers, memory_mb=config.rewards.verify_memory_mb)
        check_trackers(config.trackers)  # a missing tracker package: one line, before any work
        try:
            self.policy = check_model_path(str(policy))
        except (FileNotFoundError, ModelPackageMissing) as exc:
            raise ConfigError(str(exc)) from None
        self.run = RunDir(run_dir)
        self.accelerator = make_accelerator(config.trainer.dtype, config.trainer.process_timeout_s)
        self.comm = Collectives(self.accelerator)
        self.is_main = self.comm.is_main
        self.resources = RunResources(config, self.policy, self.accelerator, reflection_lm)
        self.resources.check_teacher(config.progress)
        # Held for the run's lifetime (main process only); nothing is written before the run starts.
        self._lock = self.run.lock() if self.is_main else None
        try:
            self.identity = identity_of(config, self.policy, list(self.by_id))
            self.resuming = self._open_run_dir(self.identity)
        except BaseException:
            self.release()
            raise
        self.batches_per_epoch = -(-len(self.trainset) // config.batch_size)
        reason = config.grpo_only_reason(len(self.trainset))
        if reason and self.is_main:
            log.warning("this P^2O run will train as GRPO, without templates: %s", reason)
        self.logger: MetricsLogger | None = None  # opened when the run starts (nothing is written before)

    @staticmethod
    def _checked_examples(program: dspy.Module, trainset: list, valset: list | None) -> tuple[list, list]:
        """The training and validation examples with ids, checked against the program's inputs."""
        try:
            servable_predictors(program)  # every predictor servable by the one policy, else one line why
            inputs = program_input_fields(program)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        trainset = with_ids(list(trainset), "train")
        if not trainset:
            raise ValueError("the trainset is empty")
        validate_examples(trainset, inputs)
        valset = with_ids(list(valset), "val") if valset else []
        if valset:
            validate_examples(valset, inputs)
        return trainset, valset

    def _open_run_dir(self, identity: dict[str, Any]) -> bool:
        """The main process creates or checks the run directory; the others take its verdict
        (True when resuming) rather than race it. Its error is raised on every process."""
        verdict: Any = None
        error: Exception | None = None
        if self.is_main:
            try:
                verdict = (self.run.check(self.config, identity), None)
            except Exception as exc:  # every rank must hear of it, or the others wait forever
                error, verdict = exc, (False, f"{type(exc).__name__}: {exc}")
        resuming, message = self.comm.from_main(verdict)
        if error is not None:
            raise error
        if message is not None:
            raise ConfigError(f"on the main process: {message}")
        return resuming

    def release(self) -> None:
        """Let go of the run directory (run_loop does this when it ends, however it ends). A run that
        failed before it started leaves nothing behind: no lock file, and no directory it created."""
        if self._lock is not None:
            unclaimed = not self.run.identity_file.exists()
            self._lock.release(discard=unclaimed)
            self._lock = None
            if unclaimed:
                try:
                    self.run.path.rmdir()  # only when empty: never what someone else put there
                except OSError:
                    pass

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        cfg = self.config
        self.adapter = make_adapter(cfg.adapter)
        self._fit_context()
        steps_per_batch = 1
        if cfg.trainer.mini_batch_size:
            steps_per_batch = -(-min(cfg.batch_size, len(self.trainset)) // cfg.trainer.mini_batch_size)
        total_steps = cfg.epochs * self.batches_per_epoch * steps_per_batch * cfg.trainer.updates_per_batch
        self.resources.build(total_steps)
        self.trainer, self.engine = self.resources.trainer, self.resources.engine
        self.renderers = program_renderers(self.program, self.engine.tokenizer, self.adapter)

    def _fit_context(self) -> None:
        """Training questions whose prompt + max_tokens exceeds the policy's context are refused before any
        work, or (long_prompts: skip) left out with a count; a prompt phase's templates and demos are
        checked as calls are made (`rollouts.PromptTooLong`: that rollout fails, counted)."""
        from transformers import AutoConfig

        from dspy_p2o.engines.hf import load_tokenizer
        from dspy_p2o.rollouts import over_long

        cfg = self.config
        model_config = AutoConfig.from_pretrained(self.policy)
        context = getattr(getattr(model_config, "text_config", None) or model_config, "max_position_embeddings", None)
        renderers = program_renderers(self.program, load_tokenizer(self.policy), self.adapter)
        long = over_long(renderers, self.trainset, program_inputs=program_input_fields(self.program),
                         context_length=context, max_tokens=cfg.max_tokens)
        if not long:
            return
        first, tokens = long[0]
        what = (f"{len(long)} of {len(self.trainset)} training questions do not fit the policy's context "
                f"({context} tokens): question {first!r} renders to {tokens} prompt tokens + max_tokens "
                f"{cfg.max_tokens}")
        if cfg.long_prompts == "refuse" or len(long) == len(self.trainset):
            raise ConfigError(f"{what}; shorten them, lower max_tokens, or set long_prompts: skip")
        skipped = {ident for ident, _ in long}
        self.trainset = [ex for ex in self.trainset if ex.id not in skipped]
        self.by_id = {ex.id: ex for ex in self.trainset}
        self.batches_per_epoch = -(-len(self.trainset) // cfg.batch_size)
        log.warning("%s; left out (long_prompts: skip)", what)
        display.line(f"left out {len(long)} training questions too long for the context (long_prompts: skip)",
                     cfg.progress and self.is_main)

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
                if self.announces_disk:
                    display.line(self._disk_line(), self.config.progress)
            self.comm.barrier()
            self.logger = MetricsLogger(self.run.metrics_file, accelerator=self.accelerator,
                                        trackers=tuple(self.config.trackers), config=self.config.to_dict())
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
            self.resources.close_engine()  # nothing returned will use it: stop its server now, not at exit
            raise
        finally:
            self.resources.close_reflection_lm()
            if self.logger is not None:
                self.logger.close()
            self.release()

    def _batches(self, epoch: int) -> list[list[dspy.Example]]:
        order = list(self.trainset)
        if self.config.shuffle:
            random.Random(derive_seed(self.config.seed, "order", epoch)).shuffle(order)
        size = self.config.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _phase1(self, state: LoopState) -> None:
        cfg, epoch = self.config, state.epoch
        batches = self._batches(epoch)
        self.comm.start_epoch()
        trains = state.batch < len(batches)  # False on a resume after the epoch's last batch
        bar = display.live(len(batches), initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                           enabled=cfg.progress and self.is_main)
        for b in range(state.batch, len(batches)):
            metrics = self._train_batch(state, batches[b], b)
            self.logger.log(metrics, step=self.trainer.global_step, prefix="train/")
            state.batch = b + 1
            if state.batch % cfg.checkpoint_every == 0 or state.batch == len(batches):
                self._checkpoint(state)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", step=self.trainer.global_step)
        bar.close()
        if trains and cfg.trainer.sync == "epoch":  # with sync="step" the last step has synced
            self.resources.sync()  # GEPA and the next epoch sample the new weights

    def _train_batch(self, state: LoopState, examples: list[dspy.Example], b: int) -> dict[str, Any]:
        """One batch of phase 1: rollouts of this process's share, the global batch gathered once (hard
        mining and the trainer read it), one GRPO update; returns the batch's metrics."""
        cfg, epoch = self.config, state.epoch
        assignments = state.assignments if cfg.method == "p2o" else {}
        t0 = time.perf_counter()
        collected = self._collect(self.comm.share(examples), k=cfg.k, temperature=cfg.temperature,
                                  seed=derive_seed(cfg.seed, "rollouts", epoch, b, self.comm.rank),
                                  assignments=assignments, plain_per_group=cfg.plain_per_group)
        t_rollout, waited = time.perf_counter() - t0, self.comm.wait_s
        failures = self._check_failures(collected, f"batch {b + 1} (epoch {epoch + 1})")
        state.metric_failures += failures
        batch = GlobalBatch.gather(collected.rollouts, self.comm.rank, self.comm.gather)
        self._record_rewards(state, batch)
        if cfg.method == "p2o" and cfg.prompt.optimizer != "gepa" and cfg.prompt.fewshot_source != "labeled":
            self._keep_demos(state, collected.rollouts)
        after_step = self.resources.sync if cfg.trainer.sync == "step" else None
        metrics = self.trainer.train_on(collected.rollouts, batch, after_step=after_step)
        metrics.update(self.resources.take_sync_stats())
        metrics.update(epoch=epoch + 1, batch=b, time_rollout=t_rollout, time_wait=self.comm.wait_s - waited,
                       metric_failures=failures)
        return metrics

    def _collect(self, examples: list[dspy.Example], *, k: int, temperature: float, seed: int | None,
                 assignments: dict[str, list[Any]] | None = None, plain_per_group: int = 0) -> RolloutBatch:
        """k scored executions of the program per example (rollouts.py)."""
        cfg = self.config
        sampling = SamplingParams(temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                                  seed=seed)
        return collect_rollouts(self.engine, self.program, self.renderers, examples, self.metric, k=k,
                                sampling=sampling, assignments=assignments, plain_per_group=plain_per_group,
                                progress=cfg.progress and self.is_main and display.verbose(),
                                max_live=cfg.max_concurrent_executions)

    def _check_failures(self, collected: RolloutBatch, where: str) -> int:
        """The failed metric calls and program executions (scored 0) of every process; a batch where
        every scored execution failed aborts the run (on every process alike). Outputs outside the
        adapter's format are the policy's failures, not the metric's: they never count here."""
        counts = self.comm.gather([(collected.scored, collected.failures, collected.last_failure)])
        scored, failures = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if scored and failures == scored:
            last = next((c[2] for c in reversed(counts) if c[2]), "")
            raise MetricError(f"the metric failed on all {scored} rollouts of {where}; the last error: {last}")
        return failures

    def _record_rewards(self, state: LoopState, batch: GlobalBatch) -> None:
        """Every question's rewards, and which rollouts were templated, in batch order (every process alike)."""
        repeated = sorted({o.example_id for o in batch.outcomes} & set(state.rewards))
        if repeated:
            raise RuntimeError(f"question {repeated[0]!r} was rolled out twice in epoch {state.epoch + 1}")
        for o in batch.outcomes:
            state.rewards.setdefault(o.example_id, []).append(o.reward)
            state.templated.setdefault(o.example_id, []).append(o.templated)

    def _keep_demos(self, state: LoopState, rollouts: list[Any]) -> None:
        """The batch's successful plain rollouts as few-shot demo records (every process's, one per
        question, at most fewshot.POOL_CAP per epoch): the bootstrapped pool of the prompt phase."""
        inputs, threshold = program_input_fields(self.program), self.config.prompt.solved_threshold
        mine: dict[str, dict[str, Any]] = {}
        for r in rollouts:
            if r.example_id not in mine and r.example_id not in state.demos:
                record = bootstrap_record(r, self.by_id[r.example_id], self.renderers, inputs, threshold)
                if record is not None:
                    mine[r.example_id] = record
        for record in self.comm.gather(list(mine.values())):
            if len(state.demos) < POOL_CAP:
                state.demos.setdefault(record["id"], record)

    def _phase2(self, state: LoopState) -> None:
        cfg, epoch = self.config, state.epoch
        number = epoch + 1  # as the console and the run directory's files name it
        hard = mine_hard(state.mining_rewards(cfg.hardness_on), tau=cfg.tau, near_hard=cfg.near_hard)
        if self.is_main:
            write_jsonl(self.run.rewards_file(number), ({"id": i, "rewards": r, "templated": state.templated[i]}
                                                       for i, r in state.rewards.items()))
            write_jsonl(self.run.hard_file(number), ({"id": i, "success_rate": sum(state.rewards[i]) / len(state.rewards[i]),
                                                     "rewards": state.rewards[i]} for i in hard))
        state.hard_count = len(hard)
        record: dict[str, Any] = {"epoch": number, "ran": False, "hard": len(hard)}
        if cfg.method == "grpo":
            record["reason"] = "prompt phase disabled (GRPO baseline)"
        elif epoch == cfg.epochs - 1:
            record["reason"] = LAST_EPOCH
        elif len(hard) < cfg.prompt.min_hard:
            record["reason"] = f"hard set {len(hard)} < min_hard {cfg.prompt.min_hard}"
        elif self.is_main:  # GEPA runs once, on the main process (with the local engine: its replica)
            record = self._run_gepa(state, hard)
        record = self.comm.from_main(record)
        if self.is_main:
            write_json(self.run.templates_file(number), record)
        state.assignments = record.get("assignments", {})
        state.prompt_phase_skipped_last = record.get("reason") == LAST_EPOCH

    def _run_gepa(self, state: LoopState, hard: list[str]) -> dict[str, Any]:
        """The prompt phase on the policy engine (every evaluation a batched collection, as phase 1's);
        few-shot demos come from the training set's gold answers and this epoch's successful rollouts
        on questions that are not hard."""
        cfg, epoch = self.config, state.epoch
        number = epoch + 1  # as the files and records name it
        student = PolicyStudent(self.engine, self.renderers,
                                SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                               max_tokens=cfg.max_tokens),
                                max_live=cfg.max_concurrent_executions)
        hard_set = set(hard)
        with dspy.context(adapter=self.adapter):  # GEPA sees the format that is trained
            result = run_prompt_phase(
                self.program.deepcopy(), [self.by_id[i] for i in hard], student=student,
                reflection_lm=self.resources.reflection_lm() if cfg.prompt.optimizer != "fewshot" else None,
                metric=self.metric, config=cfg.prompt, k=cfg.k - cfg.plain_per_group,
                seed=derive_seed(cfg.seed, "prompt phase", epoch), log_dir=self.run.gepa_dir(number), epoch=number,
                progress=cfg.progress, labeled_demos=self.trainset,
                bootstrapped_demos=[r for i, r in state.demos.items() if i not in hard_set])
        self.logger.log(_numbers(result.cost, "gepa/"), step=self.trainer.global_step)
        return {"epoch": number, "hard": len(hard), **result.to_json()}

    def _end_epoch(self, state: LoopState) -> None:
        cfg, epoch = self.config, state.epoch
        entry = {"epoch": epoch + 1, "step": self.trainer.global_step, "hard": state.hard_count,
                 "templated_questions": len(state.assignments),
                 "train_reward": _mean([r for rs in state.rewards.values() for r in rs]),
                 "metric_failures": state.metric_failures}
        entry.update(_template_success(state))
        if self.valset and cfg.eval_every_epoch:
            entry.update(self.evaluate(self.valset))
        entry.update(self.comm.wait_fractions())
        self.logger.log({f"epoch/{k}": v for k, v in entry.items()}, step=self.trainer.global_step)
        state.history.append(entry)
        display.line(f"epoch {epoch + 1}/{cfg.epochs}: step {entry['step']}, train reward {entry['train_reward']:.3f}, "
                     f"hard {entry['hard']}, templated next {entry['templated_questions']}"
                     + (f", val pass@1 (no template) {entry['val/pass@1']:.3f}" if "val/pass@1" in entry else ""),
                     cfg.progress and self.is_main)
        state.epoch, state.phase, state.batch, state.metric_failures = epoch + 1, "train", 0, 0
        state.done = state.epoch >= cfg.epochs
        if not state.done:  # a finished run keeps its last epoch's rewards: a resume with more epochs mines them
            state.rewards, state.templated, state.demos = {}, {}, {}
        self._checkpoint(state)
        if self.is_main:
            self._write_reports(state)

    def evaluate(self, examples: list[dspy.Example]) -> dict[str, float]:
        """pass@1 (the mean reward) and, when eval_k > 1, the unbiased pass@eval_k, WITHOUT templates:
        greedy for one sample, else sampled (`program_eval`). Each process evaluates its share; the
        rewards are gathered."""
        cfg = self.config
        collected = self._collect(self.comm.share(examples), k=cfg.eval_k,
                                  temperature=0.0 if cfg.eval_k == 1 else cfg.temperature,
                                  seed=derive_seed(cfg.seed, "validation"))
        scores = ProgramScores()
        scores.add(self.comm.gather([(r.example_id, r.reward) for r in collected.rollouts]))
        failures, unparsed = map(sum, zip(*self.comm.gather([(collected.failures, collected.format_failures)])))
        samples = sum(len(v) for v in scores.rewards.values())
        out = {"val/pass@1": scores.pass_at(1), "val/parse_rate": 1 - unparsed / max(1, samples),
               "val/metric_failures": failures}
        if cfg.eval_k > 1:
            out[f"val/pass@{cfg.eval_k}"] = scores.pass_at(cfg.eval_k)
        return out

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
        """The saved state, the trainer at its checkpoint and the engine serving it (one sync)."""
        state = LoopState.from_json(self.run.load_state())
        state.checkpoint = self.run.resumable_checkpoint(state.checkpoint)
        if state.metrics_offset is not None:  # steps after the saved state are replayed: drop their records
            self.logger.truncate(state.metrics_offset)
        if state.done and state.epoch < self.config.epochs:
            state.extend()  # more epochs now
        if state.checkpoint:
            extra = self.trainer.load_checkpoint(state.checkpoint)
            if (extra.get("loop_epoch"), state.phase) == (state.epoch, "train") and \
                    extra.get("loop_batch", 0) > state.batch:  # a newer checkpoint than state.json knew
                state.batch = extra["loop_batch"]  # never train its batches twice
            self.resources.sync()  # a separate engine must serve the restored weights
        point = {"epoch": state.epoch + 1, "phase": state.phase, "batch": state.batch, "step": self.trainer.global_step,
                 "checkpoint": Path(state.checkpoint).name if state.checkpoint else None,
                 "processes": self.comm.size, "optimizer_restarted": self.trainer.optimizer_restarted}
        if self.is_main:
            self.run.record_resume(point)
        display.line(f"resumed at epoch {point['epoch']}/{self.config.epochs}, {state.phase} phase, batch {state.batch} "
                     f"(optimizer step {point['step']}) from {point['checkpoint'] or 'the start'}",
                     self.config.progress and self.is_main)
        if self.trainer.optimizer_restarted:
            log.warning("checkpoint %s holds no optimizer state (trainer.checkpoint_optimizer: false): AdamW's "
                        "moments restart from zero", point["checkpoint"])
        return state

    def _disk_line(self) -> str:
        """Where the run writes and what each checkpoint costs on disk (the start line; summary.md too)."""
        size = self.trainer.checkpoint_bytes()
        keep = self.config.trainer.keep_last_checkpoints
        parts = f"weights {human_bytes(size['weights'])}" + (
            f" + optimizer {human_bytes(size['optimizer'])}" if size["optimizer"] else
            " only (trainer.checkpoint_optimizer: false)")
        return (f"run directory {self.run.path.resolve()}: checkpoints of ~{human_bytes(sum(size.values()))} each "
                f"({parts}), {'all' if keep == 0 else f'the last {keep}'} kept")

    def _write_reports(self, state: LoopState) -> None:
        from dspy_p2o.reports import write_plots, write_summary

        try:
            write_plots(self.run, read_metrics(self.run.metrics_file), state.history)
        except Exception as exc:  # a plotting problem must never cost a training run
            log.warning("could not write plots: %s", exc)
        write_summary(self.run, self.config, state.history, state.assignments, state.checkpoint,
                      disk=self._disk_line())

    def _result(self, state: LoopState) -> CompileResult:
        checkpoint = Path(state.checkpoint) / "model"  # save_pretrained model (LoRA: adapter) + tokenizer
        program = self.program.deepcopy()  # ORIGINAL instructions: no template at inference
        program.set_lm(self.engine.dspy_lm(temperature=0.0, max_tokens=self.config.max_tokens))
        return CompileResult(program=serve_with_adapter(program, self.adapter), checkpoint=checkpoint,
                             history=state.history, templates=state.assignments, run_dir=self.run.path,
                             engine=self.engine, adapter=self.adapter)


LAST_EPOCH = "last epoch: no later epoch would use new templates"


# ---------------------------------------------------------------------- helpers
def _numbers(record: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The numbers of a (nested) record under flat keys (`gepa/reflection_lm/cost_usd`); a None stays
    (an unpriced cost is null, not 0); text is left out."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif value is None or isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _template_success(state: LoopState) -> dict[str, float]:
    """pass@1 (mean reward) / pass@K (K = the group's size: any success) of the templated questions'
    rollouts with their templates vs without (paper Fig. 4)."""
    templated, plain = [], []
    for ident, flags in state.templated.items():
        if any(flags):
            rewards = state.rewards[ident]
            templated.append([r for r, t in zip(rewards, flags) if t])
            plain_rewards = [r for r, t in zip(rewards, flags) if not t]
            if plain_rewards:
                plain.append(plain_rewards)
    if not templated:
        return {}
    out = {"templated/pass@1": _mean([_mean(g) for g in templated]), "templated/pass@k": mean_pass_at_k(templated)}
    if plain:
        out["plain/pass@1"] = _mean([_mean(g) for g in plain])
        out["plain/pass@k"] = mean_pass_at_k(plain)
    return out


__all__ = ["CompileResult", "P2OLoop", "with_ids"]
