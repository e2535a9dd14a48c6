"""Paper Alg. 1: alternate GRPO with context distillation (phase 1) and GEPA on the hard set (phase 2).

Per epoch t:
  phase 1  every batch: K rollouts per question -- T(x, z) for questions that were hard in
           t-1 and got templates, x otherwise -- a GRPO update with the gradient on x,
           and hard mining from the rewards;
  sync     the engine serves the new weights (also after every step by default);
  phase 2  GEPA on the new hard set -> template pool -> K templates per hard question.

Everything needed to resume lives in the run directory: the loop state (state.json)
points at the last trainer checkpoint, written after every `checkpoint_every` batches
and around the prompt phase, so a killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dspy

from dspy_p2o.config import P2OConfig
from dspy_p2o.data import validate_examples
from dspy_p2o.engines import Engine, LocalEngine, make_engine
from dspy_p2o.jsonio import write_json, write_jsonl
from dspy_p2o.metrics import MetricsLogger, read_metrics
from dspy_p2o.prompt_phase.gepa_phase import run_prompt_phase
from dspy_p2o.prompt_phase.hard import mine_hard
from dspy_p2o.prompt_phase.reflection import make_reflection_lm
from dspy_p2o.renderer import Renderer, make_adapter, single_predictor
from dspy_p2o.rollouts import Rollout, collect_rollouts, make_reward_fn
from dspy_p2o.run_dir import RunDir, identity_of
from dspy_p2o.trainer import GRPOTrainer

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    """What `compile` returns. `program` answers with the trained weights and its ORIGINAL instructions."""

    program: dspy.Module
    checkpoint: Path
    history: list[dict[str, Any]]
    templates: dict[str, list[str]]
    run_dir: Path
    engine: Engine | None = field(default=None, repr=False)
    adapter: dspy.Adapter | None = None  # the run's DSPy adapter: serve with dspy.context(adapter=result.adapter)


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
        self._given_reflection_lm = reflection_lm
        self.predictor = single_predictor(program)
        inputs = list(self.predictor.signature.input_fields)
        self.trainset = with_ids(list(trainset), "train")
        validate_examples(self.trainset, inputs)
        self.valset = with_ids(list(valset), "val") if valset else []
        if self.valset:
            validate_examples(self.valset, inputs)
        if not self.trainset:
            raise ValueError("the trainset is empty")
        self.by_id = {ex.id: ex for ex in self.trainset}
        self.run = RunDir(run_dir)
        self.resuming = self.run.create_or_check(config, identity_of(config, self.policy, list(self.by_id)))
        self.batches_per_epoch = -(-len(self.trainset) // config.batch_size)

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        cfg = self.config
        # The top-level knobs are the single source of truth for their nested copies.
        cfg.trainer = dataclasses.replace(cfg.trainer, temperature=cfg.temperature, seed=cfg.seed)
        steps_per_batch = 1
        if cfg.trainer.mini_batch_size:
            steps_per_batch = -(-min(cfg.batch_size, len(self.trainset)) // cfg.trainer.mini_batch_size)
        steps_per_batch *= cfg.trainer.updates_per_batch
        total_steps = cfg.epochs * self.batches_per_epoch * steps_per_batch
        self.logger = MetricsLogger(self.run.metrics_file, trackers=tuple(cfg.trackers), config=cfg.to_dict())
        if cfg.engine == "local":
            # The engine samples from the trainer's own module: weight sync costs nothing.
            self.trainer = GRPOTrainer(self.policy, config=cfg.trainer, total_steps=total_steps)
            self.engine = LocalEngine(self.trainer.model, self.trainer.tokenizer, **cfg.engine_kwargs)
            self.trainer.engine = self.engine
        else:
            self.engine = make_engine(cfg.engine, self.policy, **cfg.engine_kwargs)
            self.trainer = GRPOTrainer(self.policy, config=cfg.trainer, engine=self.engine, total_steps=total_steps)
        self.renderer = Renderer(self.predictor, self.engine.tokenizer, adapter=make_adapter(cfg.adapter))
        self.reward_fn = make_reward_fn(self.renderer, self.metric)
        self._reflection_lm = self._given_reflection_lm

    def reflection_lm(self) -> dspy.LM:
        """Built on first use: self-reflection loads a second, frozen copy of the initial policy."""
        if self._reflection_lm is None:
            cfg = self.config
            self._reflection_lm = make_reflection_lm(
                cfg.reflection, self_engine_factory=self._initial_policy_engine,
                max_tokens=cfg.reflection_max_tokens, **cfg.reflection_kwargs)
        return self._reflection_lm

    def _initial_policy_engine(self) -> Engine:
        """pi_init for self-reflection: a second, frozen engine on the initial weights, never the policy."""
        cfg = self.config
        if cfg.engine == "vllm":
            from dspy_p2o.engines.vllm import reference_engine_kwargs

            return make_engine("vllm", self.policy, **reference_engine_kwargs(cfg.engine_kwargs))
        return make_engine(cfg.engine, self.policy, **cfg.engine_kwargs)

    # ------------------------------------------------------------------ state
    def _initial_state(self) -> dict[str, Any]:
        return {"epoch": 0, "phase": "train", "batch": 0, "rewards": {}, "assignments": {},
                "templated_stats": {}, "history": [], "checkpoint": None, "done": False}

    def _checkpoint(self, state: dict[str, Any]) -> None:
        """Save the trainer (only when it stepped since the last save) and then the loop state."""
        if state.get("checkpoint_step") != self.trainer.global_step or not state.get("checkpoint"):
            path = self.trainer.save_checkpoint(self.run.checkpoints, extra_state={"loop_epoch": state["epoch"],
                                                                                   "loop_batch": state["batch"]})
            state.update(checkpoint=str(path), checkpoint_step=self.trainer.global_step)
        self.run.save_state(state)

    def _restore(self) -> dict[str, Any]:
        state = self.run.load_state()
        if state.get("checkpoint"):
            self.trainer.load_checkpoint(state["checkpoint"])
            self.trainer.sync_engine()
            log.info("resumed %s at epoch %d, %s phase, batch %d (optimizer step %d)", self.run.path,
                     state["epoch"], state["phase"], state["batch"], self.trainer.global_step)
        return state

    # ------------------------------------------------------------------ Alg. 1
    def run_loop(self) -> CompileResult:
        self._build()
        state = self._restore() if self.resuming else self._initial_state()
        try:
            while not state["done"]:
                if state["phase"] == "train":
                    self._phase1(state)
                    state["phase"] = "prompt"
                    self._checkpoint(state)
                if state["phase"] == "prompt":
                    self._phase2(state)
                    self._end_epoch(state)
            return self._result(state)
        finally:
            self.logger.close()

    def _batches(self, epoch: int) -> list[list[dspy.Example]]:
        order = list(self.trainset)
        if self.config.shuffle:
            random.Random(self.config.seed * 1000 + epoch).shuffle(order)
        size = self.config.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _phase1(self, state: dict[str, Any]) -> None:
        cfg, epoch = self.config, state["epoch"]
        batches = self._batches(epoch)
        bar = _bar(len(batches), initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress)
        for b in range(state["batch"], len(batches)):
            assignments = {i: z for i, z in state["assignments"].items()} if cfg.prompt_phase else {}
            t0 = time.perf_counter()
            rollouts = collect_rollouts(
                self.engine, self.renderer, batches[b], self.reward_fn, k=cfg.k, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens, seed=cfg.seed * 100_003 + epoch * 1_009 + b,
                assignments=assignments, plain_per_group=cfg.plain_per_group, progress=cfg.progress)
            t_rollout = time.perf_counter() - t0
            self._record_rewards(state, rollouts)
            metrics = self.trainer.train_on(rollouts)
            metrics.update(epoch=epoch, batch=b, time_rollout=t_rollout)
            self.logger.log(metrics, step=self.trainer.global_step, prefix="train/")
            state["batch"] = b + 1
            if state["batch"] % cfg.checkpoint_every == 0 or state["batch"] == len(batches):
                self._checkpoint(state)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", step=self.trainer.global_step)
        bar.close()

    def _record_rewards(self, state: dict[str, Any], rollouts: list[Rollout]) -> None:
        """Rewards for hard mining, and with-vs-without-template success for the Fig. 4 plot."""
        use_plain = self.config.hardness_on == "plain"
        groups: dict[str, list[Rollout]] = {}
        for r in rollouts:
            groups.setdefault(r.example_id, []).append(r)
        stats = state["templated_stats"].setdefault(str(state["epoch"]), {"templated": [], "plain": []})
        for ident, group in groups.items():
            plain = [r.reward for r in group if not r.templated]
            chosen = plain if use_plain and plain else [r.reward for r in group]
            state["rewards"][ident] = chosen
            templated = [r.reward for r in group if r.templated]
            if templated:
                stats["templated"].append(templated)
                if plain:
                    stats["plain"].append(plain)

    def _phase2(self, state: dict[str, Any]) -> None:
        cfg, epoch = self.config, state["epoch"]
        rewards = state["rewards"]
        hard = mine_hard(rewards, tau=cfg.tau, near_hard=cfg.near_hard)
        write_jsonl(self.run.hard_file(epoch), (
            {"id": i, "success_rate": sum(rewards[i]) / len(rewards[i]), "rewards": rewards[i]} for i in hard))
        sync_s = self.trainer.sync_engine()
        state["hard_count"] = len(hard)
        assignments: dict[str, list[str]] = {}
        record: dict[str, Any] = {"epoch": epoch, "ran": False, "hard": len(hard)}
        if not cfg.prompt_phase:
            record["reason"] = "prompt phase disabled (GRPO baseline)"
        elif epoch == cfg.epochs - 1:
            record["reason"] = "last epoch: no later epoch would use new templates"
        elif len(hard) < cfg.prompt.min_hard:
            record["reason"] = f"hard set {len(hard)} < min_hard {cfg.prompt.min_hard}"
        else:
            prompt_cfg = dataclasses.replace(cfg.prompt, k=cfg.k - cfg.plain_per_group, seed=cfg.seed + epoch)
            student = self.engine.dspy_lm(temperature=cfg.temperature, max_tokens=cfg.max_tokens)
            program = self.program.deepcopy()
            program.set_lm(student)
            with dspy.context(adapter=self.renderer.adapter):  # GEPA sees the format that is trained
                result = run_prompt_phase(
                    program, [self.by_id[i] for i in hard], student_lm=student, reflection_lm=self.reflection_lm(),
                    metric=self.metric, config=prompt_cfg, log_dir=self.run.gepa_dir(epoch), epoch=epoch)
            assignments = result.assignments
            record = {"epoch": epoch, "hard": len(hard), **result.to_json()}
            self.logger.log({f"gepa/{k}": v for k, v in result.cost.items() if isinstance(v, (int, float))},
                            step=self.trainer.global_step)
        write_json(self.run.templates_file(epoch), record)
        state["assignments"] = assignments
        state["sync_s"] = sync_s

    def _end_epoch(self, state: dict[str, Any]) -> None:
        cfg, epoch = self.config, state["epoch"]
        entry = {"epoch": epoch + 1, "step": self.trainer.global_step, "hard": state.get("hard_count", 0),
                 "templated_questions": len(state["assignments"]),
                 "train_reward": _mean([r for rs in state["rewards"].values() for r in rs])}
        entry.update(_template_success(state["templated_stats"].get(str(epoch))))
        if self.valset and cfg.eval_every_epoch:
            entry.update(self.evaluate(self.valset))
        self.logger.log({f"epoch/{k}": v for k, v in entry.items()}, step=self.trainer.global_step)
        state["history"].append(entry)
        _print(f"epoch {epoch + 1}/{cfg.epochs}: step {entry['step']}, train reward {entry['train_reward']:.3f}, "
               f"hard {entry['hard']}, templated next {entry['templated_questions']}"
               + (f", val acc {entry['val/pass@1']:.3f}" if "val/pass@1" in entry else ""), cfg.progress)
        state.update(epoch=epoch + 1, phase="train", batch=0, rewards={})
        state["done"] = state["epoch"] >= cfg.epochs
        self._checkpoint(state)
        self._write_reports(state)

    def evaluate(self, examples: list[dspy.Example]) -> dict[str, float]:
        """pass@1 (and pass@k when eval_k > 1) WITHOUT templates: greedy for one sample, else sampled."""
        cfg = self.config
        rollouts = collect_rollouts(
            self.engine, self.renderer, examples, self.reward_fn, k=cfg.eval_k,
            temperature=0.0 if cfg.eval_k == 1 else cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            max_tokens=cfg.max_tokens, seed=cfg.seed, progress=cfg.progress)
        by_id: dict[str, list[float]] = {}
        for r in rollouts:
            by_id.setdefault(r.example_id, []).append(r.reward)
        out = {"val/pass@1": _mean([_mean(v) for v in by_id.values()])}
        if cfg.eval_k > 1:
            out[f"val/pass@{cfg.eval_k}"] = _mean([float(max(v) > 0) for v in by_id.values()])
        return out

    def _write_reports(self, state: dict[str, Any]) -> None:
        from dspy_p2o.reports import write_plots, write_summary

        try:
            write_plots(self.run, read_metrics(self.run.metrics_file), state["history"])
        except Exception as exc:  # a plotting problem must never cost a training run
            log.warning("could not write plots: %s", exc)
        write_summary(self.run, self.config, state["history"], state["assignments"], state.get("checkpoint"))

    def _result(self, state: dict[str, Any]) -> CompileResult:
        checkpoint = Path(state["checkpoint"]) / "model"  # save_pretrained model + tokenizer
        program = self.program.deepcopy()  # ORIGINAL instructions: no template at inference
        program.set_lm(self.engine.dspy_lm(temperature=0.0, max_tokens=self.config.max_tokens))
        return CompileResult(program=program, checkpoint=checkpoint, history=state["history"],
                             templates=state["assignments"], run_dir=self.run.path, engine=self.engine,
                             adapter=self.renderer.adapter)


# ---------------------------------------------------------------------- helpers
def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _template_success(stats: dict[str, list[list[float]]] | None) -> dict[str, float]:
    """pass@1 / pass@K of hard questions with their templates vs without (paper Fig. 4)."""
    if not stats or not stats["templated"]:
        return {}
    out = {"templated/pass@1": _mean([_mean(g) for g in stats["templated"]]),
           "templated/pass@k": _mean([float(max(g) > 0) for g in stats["templated"]])}
    if stats["plain"]:
        out["plain/pass@1"] = _mean([_mean(g) for g in stats["plain"]])
        out["plain/pass@k"] = _mean([float(max(g) > 0) for g in stats["plain"]])
    return out


def _bar(total: int, *, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", disable=not enabled)


def _print(line: str, enabled: bool) -> None:
    from tqdm.auto import tqdm

    if enabled:
        tqdm.write(line)
    log.info(line)
