"""What a run holds while it runs, and who releases it: the trainer, the policy engine, the
reflection LM, and the weight syncs between trainer and engine.

- The trainer (`trainer.GRPOTrainer`) owns the weights and the optimiser.
- The policy engine samples rollouts: the local engine shares the trainer's module (a sync costs
  nothing), a vLLM engine serves a copy that `sync()` replaces. Every weight sync of a run starts
  here, from the loop: after optimiser steps, after an epoch, after a resume. With a sharded
  trainer (`trainer.sharding: fsdp2`) no process holds the whole module: each sync gathers the full
  weights (a collective) -- onto every process for its own local-engine replica, onto the main
  process for the vLLM server it reloads (that sync is not verified by served log-probs: the
  trainer's forward is a collective no single process can run).
- The reflection LM (GEPA's proposer) is built on first use; self-reflection loads a second, frozen
  engine on the INITIAL weights (pi_init), closed when the loop ends -- except in a LoRA run, where
  pi_init is the policy engine's base model with the adapter disabled (`Engine.without_adapter`:
  the trainer's own module, or the base name on the policy's vLLM server). A teacher is checked at start.
"""

from __future__ import annotations

import time
from typing import Any

import dspy

from dspy_p2o import display, lora
from dspy_p2o.config import ConfigError, P2OConfig
from dspy_p2o.engines import Engine, make_engine, make_reference_engine
from dspy_p2o.prompt_phase.reflection import close_reflection_lm, make_reflection_lm, preflight
from dspy_p2o.trainer import GRPOTrainer


class RunResources:
    def __init__(self, config: P2OConfig, policy: str, accelerator: Any,
                 reflection_lm: dspy.BaseLM | None = None) -> None:
        self.config, self.policy, self.accelerator = config, policy, accelerator
        self._given_reflection_lm = self._reflection_lm = reflection_lm
        self.trainer: GRPOTrainer | None = None
        self.engine: Engine | None = None
        self.sync_seconds, self.sync_diffs = 0.0, []  # since the last `take_sync_stats`

    # ------------------------------------------------------------------ trainer and engine
    def build(self, total_steps: int) -> None:
        """Load the policy into the trainer and start the engine that samples from it."""
        cfg, acc = self.config, self.accelerator
        if cfg.engine != "local":  # the server starts before the trainer takes the memory
            self.engine = make_engine(cfg, self.policy, processes=acc.num_processes)
        self.trainer = GRPOTrainer(self.policy, config=cfg.trainer, temperature=cfg.temperature, seed=cfg.seed,
                                   total_steps=total_steps, accelerator=acc)
        if self.engine is None and self.trainer.sharded:  # a replica of its own, synced from the gathered weights
            self.engine = make_engine(cfg, self.policy)
        elif self.engine is None:  # samples from the trainer's own module (this rank's replica): syncs are free
            self.engine = make_engine(cfg, self.trainer.model, tokenizer=self.trainer.tokenizer)

    def sync(self) -> None:
        """Make the engine serve the trainer's current weights (verified by a vLLM engine)."""
        start = time.perf_counter()
        source = (self.trainer.full_state_dict(everywhere=self.config.engine == "local") if self.trainer.sharded
                  else self.trainer.model)
        report = self.engine.sync_weights(source)
        self.sync_seconds += time.perf_counter() - start  # waiting for rank 0's sync included
        if report.logprob_diff is not None:
            self.sync_diffs.append(report.logprob_diff)

    def take_sync_stats(self) -> dict[str, float]:
        """`time_sync` and, after verified syncs, `sync_logprob_diff` since the last take."""
        out = {"time_sync": self.sync_seconds}
        if self.sync_diffs:
            out["sync_logprob_diff"] = max(self.sync_diffs)
        self.sync_seconds, self.sync_diffs = 0.0, []
        return out

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ reflection
    def reflection_lm(self) -> dspy.BaseLM:
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

    def check_teacher(self, show: bool) -> None:
        """A teacher's config (model, api_key_env) and, with reflection_preflight, its endpoint and key
        are checked at start -- not after a whole epoch -- and its limits reported."""
        cfg = self.config
        if not (cfg.method == "p2o" and cfg.reflection.startswith("teacher:")):
            return
        is_main = self.accelerator.is_main_process
        try:
            lm = self.reflection_lm()
            seconds = preflight(lm) if cfg.reflection_preflight and is_main else None  # GEPA runs on main
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(str(exc)) from None
        limits = f"retries {lm.num_retries}, timeout {lm.kwargs.get('timeout', 'litellm default')} s per attempt"
        display.line(f"reflection teacher {lm.model}: " + (f"preflight ok in {seconds:.1f} s; " if seconds is not None
                                                           else "preflight off; ") + limits, show and is_main)

    def _initial_policy_engine(self) -> Engine:
        """pi_init for self-reflection, never the policy: with a LoRA adapter the policy engine's base
        model (adapter disabled; no second copy), else a second, frozen engine on the initial weights.
        A vLLM server that is sent merged weights (an adapter it cannot serve) no longer serves the base."""
        cfg = self.config
        if cfg.trainer.lora is not None and (cfg.engine == "local" or lora.vllm_unservable(self.trainer.model) is None):
            return self.engine.without_adapter()
        return make_reference_engine(cfg, self.policy)

    def close_reflection_lm(self) -> None:
        """The pi_init engine (a second model or vLLM server) is needed only inside the loop."""
        if self._reflection_lm is not None and self._given_reflection_lm is None:
            close_reflection_lm(self._reflection_lm)
            self._reflection_lm = None
