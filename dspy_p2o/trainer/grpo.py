"""GRPO with context distillation on `accelerate`.

One call of `train_on(rollouts)` is one batch of the paper's Alg. 1 phase 1:
group advantages (one per rollout) -> every predictor call of a rollout is one trained
sequence with its rollout's advantage -> each call's gradient prompt (`gradient_prompt`:
x_p for a distilled call sampled from T(x_p, z_p)) -> the named steps before the update (`_prepare`: old
log-probs, templated log-probs, token weights, clip ceiling) -> one optimiser step per
mini-batch of questions (micro-batches with gradient accumulation; the loss is losses.py's
J), each step followed by the caller's `after_step` (the loop syncs the engine there).
Compound programs (several predictor calls per rollout): the K rollouts of a question are the GRPO
group and the advantage is computed once per rollout, from the program-level rewards; every call of
the rollout is one trained sequence with that advantage, whatever its predictor. Calls are not
truncated to a common count per predictor: mmGRPO (DSPy's GRPO, arXiv 2508.04660) groups the j-th
call of each predictor across the K rollouts and by default truncates to the fewest calls, which
drops an optional predictor's calls whenever one rollout skips it; here every call is kept (mmGRPO's
"ragged" mode) and its advantage compares its rollout with all K. In the loss each call counts as
one sequence (`loss_agg`: "dapo" weighs every completion token of every call alike, "grpo" every
call's token mean, "dr_grpo" a constant), so a rollout with more calls contributes more sequences.
A one-predictor program has one call per rollout: exactly GRPO.

Under N processes (torchrun / accelerate launch) each process trains on its own share of the
batch's rollouts (whole GRPO groups), with a full replica of the model (DDP, accelerate's
prepare) or, with `sharding: fsdp2`, 1/N of it (sharding.py); what every process must agree on --
advantages, which groups carry signal, the mini-batches, the loss normalisers, how many forward
passes each phase runs -- is computed from the gathered global batch, so N processes take the
same optimiser step as one process on the whole batch.
With `config.lora` the policy is wrapped in a peft LoRA adapter (dspy_p2o/lora.py): only the
adapter trains, pi_init for the KL term is the same module with its adapter disabled, and
checkpoints hold the adapter and its optimiser state.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dspy_p2o.config import DTYPES, TrainerConfig
from dspy_p2o import checkpoints as ckpt
from dspy_p2o import lora
from dspy_p2o.batch import Call, CallShape, GlobalBatch, Rollout
from dspy_p2o.trainer.advantages import group_advantages
from dspy_p2o.trainer.logprobs import (batch_logprobs, idle_forward, make_batch, plan_micro_batches, right_align,
                                       sequence_logprobs, supports_logits_to_keep)
from dspy_p2o.trainer.sharding import full_state_dict, shard_module
from dspy_p2o.trainer.losses import (TemplateRatio, aggregate, template_ratio_metrics, token_loss,
                                     truncated_is_weights)


def distilled(call: Call, distill: bool) -> bool:
    """Whether the call is context-distilled: sampled from x~ = T(x, z), trained on x."""
    return distill and call.templated


def gradient_prompt(call: Call, distill: bool) -> list[int]:
    """The prompt p the gradient is taken on -- the one place that decides it.

    Context distillation (paper Alg. 1, phase 1): a call sampled from the templated input,
    y ~ pi_old(. | T(x, z)), is trained on the original input, grad log pi_theta(y | x), so the
    policy learns to answer without the template. distill=False (the paper's ablation) trains on
    the sampled T(x, z). A plain call was sampled from x: both are x. In a compound program x is
    the call's render under its predictor's ORIGINAL instruction and z that predictor's part of
    the template (per call).
    """
    return call.prompt_ids if distilled(call, distill) else call.sampled_prompt_ids


@dataclass(frozen=True)
class _Sequences:
    """This process's trained rows of one batch as the loss takes them (losses.py's J): built once
    before the update by `GRPOTrainer._prepare`, never changed."""

    prompts: tuple[list[int], ...]  # p_i = gradient_prompt(call, distill)
    completions: tuple[list[int], ...]  # y_i
    advantages: torch.Tensor  # A_i
    old: tuple[torch.Tensor, ...] | None  # log pi_old(y_it | p_i); None: on-policy, the gradient pass's own
    weights: tuple[torch.Tensor, ...]  # w_it: template-ratio x truncated-IS weight
    kept: tuple[torch.Tensor, ...]  # m_it (bool): the token counts in the loss
    upper: tuple[torch.Tensor, ...] | None  # c_it where the template raised it; None: 1 + eps_high everywhere
    ref: tuple[torch.Tensor, ...] | None  # log pi_ref(y_it | p_i) when beta > 0


class GRPOTrainer:
    """Trains a causal LM on groups of rollouts (GRPO with context distillation).

    Args:
        model: a model dir / hub id, or a loaded `PreTrainedModel` (kept in its dtype).
            Loaded from a path, weights are fp32 (AdamW master weights); the compute dtype
            comes from `config.dtype` through accelerate's mixed precision. With a LoRA
            adapter the frozen base is loaded in the compute dtype (it needs no fp32 master
            copy; bf16 on GPU: half the memory) and the adapter is fp32.
        tokenizer: required with a module; loaded with a path otherwise.
        temperature: the sampling temperature; log-probs are taken at it (the run's
            `P2OConfig.temperature`; paper: 0.6).
        seed: python / numpy / torch seeds (the run's `P2OConfig.seed`).
        total_steps: optimiser steps of the whole run, for warm-up and decay.
        accelerator: an `accelerate.Accelerator`; one is made when None (plain CPU / one
            GPU need no accelerate config).

    `config.sharding` "none" replicates the model on every process (accelerate prepares it: DDP
    under several processes); "fsdp2" shards it over the processes (sharding.py; the optimizer is
    built on the shards, and accelerate only steps and clips it).
    """

    def __init__(self, model: Any, tokenizer: Any = None, config: TrainerConfig = TrainerConfig(), *,
                 temperature: float = 1.0, seed: int = 0, total_steps: int | None = None,
                 accelerator: Any = None) -> None:
        from accelerate.utils import set_seed

        if temperature <= 0:
            raise ValueError(f"GRPOTrainer temperature must be > 0 (log-probs of greedy sampling are degenerate), "
                             f"got {temperature}")
        self.config = replace(config)  # the default instance is shared; never mutate it
        self.temperature = temperature
        set_seed(seed)
        self.accelerator = accelerator or make_accelerator(config.dtype, config.process_timeout_s)
        _refuse_accelerate_fsdp(self.accelerator)
        self.sharded = config.sharding == "fsdp2"
        base_dtype = torch.float32
        if config.lora is not None:  # the frozen base needs no fp32 master copy
            base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision,
                                                                              torch.float32)
        module, self.tokenizer = _load(model, tokenizer, base_dtype)
        if self.tokenizer is None:
            raise ValueError("GRPOTrainer(model=<module>) needs the tokenizer too")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        if config.gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora is not None:  # only the adapter trains; pi_init is this module with it disabled
            module = lora.wrap(module, config.lora)
        module.train()
        self._logits_to_keep = supports_logits_to_keep(module.get_base_model() if config.lora else module)
        self.template_ratio = TemplateRatio(config.template_ratio, config.template_ratio_bounds, config.template_clip,
                                            config.epsilon_high)
        self.ref_model = None
        self.uses_reference = config.beta > 0  # the KL term's pi_ref = pi_init
        if config.beta > 0 and config.lora is None:  # pi_ref: a frozen copy of the initial weights (sharded like the policy)
            reference = copy.deepcopy(module).eval().requires_grad_(False)
            self.ref_model = (self._shard(reference) if self.sharded
                              else self.accelerator.prepare_model(reference, evaluation_mode=True))
        if self.sharded:  # before the optimizer: AdamW holds (and keeps state for) the shards
            module = self._shard(module)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=config.weight_decay)
        if self.sharded:
            self._model, self.optimizer = module, self.accelerator.prepare_optimizer(optimizer)
        else:
            self._model, self.optimizer = self.accelerator.prepare(module, optimizer)
        # Not prepared: a prepared scheduler steps once per process. Registered: a checkpoint written
        # by accelerate's save_state (before checkpoints stored the weights once) still loads.
        self.scheduler = make_scheduler(self.optimizer, config.lr_schedule, config.warmup_ratio, total_steps)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.global_step = 0
        self.optimizer_restarted = False  # the last load_checkpoint found no optimizer state (weights-only)

    def _shard(self, module: torch.nn.Module) -> torch.nn.Module:
        precision = self.accelerator.mixed_precision
        return shard_module(module, device=self.accelerator.device,
                            compute_dtype=torch.bfloat16 if precision == "bf16" else None)

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> torch.nn.Module:
        """The unwrapped module (what engines and save_pretrained see)."""
        return self.accelerator.unwrap_model(self._model)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def full_state_dict(self, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """The whole model's weights. Sharded: gathered from the shards -- a collective, every process
        calls it -- onto the CPU of the main process only (the others get {}) unless `everywhere`.
        Unsharded: the module's own state dict (no copy)."""
        return full_state_dict(self._model, everywhere=everywhere) if self.sharded else self.model.state_dict()

    def checkpoint_bytes(self) -> dict[str, int]:
        """What one checkpoint takes on disk (before the tokenizer and a few KB of state): the weights
        as `save_pretrained` writes them (a LoRA run's: the adapter alone) and, with `checkpoint_optimizer`,
        AdamW's two moments."""
        params = list(self.model.parameters())  # a tied head counts once; a DTensor by its global size
        saved = [p for p in params if p.requires_grad] if lora.is_adapted(self.model) else params
        weights = sum(p.numel() * p.element_size() for p in saved)
        moments = 2 * sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        return {"weights": weights, "optimizer": moments if self.config.checkpoint_optimizer else 0}

    # ------------------------------------------------------------------ training
    def train_on(self, rollouts: Sequence[Rollout], batch: GlobalBatch | None = None,
                 after_step: Callable[[], Any] | None = None) -> dict[str, float]:
        """Train on one batch of rollouts: one optimiser step per mini-batch of questions.

        `rollouts` is this process's share of the batch (under N processes: whole groups; the shares
        in rank order make the batch, and a share may be empty). `batch` is the token-free global
        batch (`batch.GlobalBatch`) when the caller has gathered it already (the loop does, once per
        batch, for hard mining too); else it is gathered here. `after_step()` runs after every
        optimiser step (the loop syncs the engine there); its time is not training time.

        The steps, each named: `_plan` (from the global batch: group advantages, the informative
        groups, the mini-batches, this process's rows; so N processes take the same optimiser step
        as one process on the whole batch) -> `_prepare` (this process's rows scored before the
        update) -> `_optimiser_step` per mini-batch (the dapo/grpo/dr_grpo denominators count the
        rows and tokens of all processes, each process backpropagates its rows' share, and DDP's
        gradient average (times N) sums the shares) -> `_step_metrics`.

        Compound programs: see the module docstring (every call of a rollout is one trained sequence with
        its rollout's advantage).

        Returns the batch's metrics (the log-prob mismatch and template-ratio ones from this
        process's rows only).
        """
        from accelerate.utils import gather_object

        start = time.perf_counter()
        acc = self.accelerator
        _validate(rollouts, allow_empty=acc.num_processes > 1)
        if batch is None:
            batch = GlobalBatch.gather(rollouts, acc.process_index, gather_object)
        if not batch.outcomes:
            raise ValueError("train_on() got no rollouts")
        plan = self._plan(batch, rollouts)
        metrics = _batch_metrics(batch, plan.rows, plan.adv)
        if not plan.steps:
            metrics.update(steps=0.0, time_train=time.perf_counter() - start)
            return metrics
        seqs, tilde = self._prepare(plan.chosen, plan.advantages, plan=plan)
        step_sums, step_stats, step_old, outside = self._steps(plan, seqs, after_step)
        metrics.update(_step_metrics(step_stats, _sum_over_processes(step_sums), self.config.beta))
        old = seqs.old if seqs.old is not None else [step_old[j] for j in range(len(plan.chosen))]
        metrics.update(_mismatch_metrics(_on_sampled_prompt(old, tilde), [_behaviour(r) for r in plan.chosen],
                                         [r.templated for r in plan.chosen]))
        metrics.update(template_ratio_metrics([old[j] for j in tilde], list(tilde.values()),
                                              [seqs.kept[j] for j in tilde], [seqs.weights[j] for j in tilde]))
        tokens = sum(plan.rows[i].prompt_len + plan.rows[i].completion_len for i in plan.trained)
        elapsed = time.perf_counter() - start - outside
        metrics.update(steps=float(len(step_stats)), time_train=elapsed,
                       tokens_per_s=tokens / max(1e-9, elapsed), global_step=float(self.global_step))
        return metrics

    def _steps(self, plan: "_Plan", seqs: _Sequences, after_step: Callable[[], Any] | None):
        """Every optimiser step of the batch, `after_step()` after each; returns the steps' loss sums and
        stats, the on-policy old log-probs the gradient passes took, and the seconds spent in after_step."""
        from accelerate.utils import gather_object

        kept = dict(zip(plan.trained, gather_object([int(k.sum()) for k in seqs.kept])))
        step_sums, step_stats, step_old, outside = [], [], {}, 0.0
        for step_rows in plan.steps:
            norm = dict(num_sequences=len(step_rows), num_tokens=sum(kept[g] for g in step_rows),
                        norm_length=plan.norm_length)
            n_micro = max(len(self._micro_plan(plan.rows, [g for g in step_rows if plan.rows[g].rank == rank]))
                          for rank in range(self.accelerator.num_processes))
            sums, stats, old = self._optimiser_step(
                seqs, [plan.position[g] for g in step_rows if g in plan.position], norm, n_micro)
            step_old.update(old)
            step_sums.append(sums)
            step_stats.append(stats)
            if after_step is not None:
                t0 = time.perf_counter()
                after_step()
                outside += time.perf_counter() - t0
        return step_sums, step_stats, step_old, outside

    def _plan(self, batch: GlobalBatch, rollouts: Sequence[Rollout]) -> "_Plan":
        """Who trains what in this batch, computed alike on every process from the global batch: one
        row per call (a trained sequence) of every rollout, group advantages from the rollouts'
        rewards, the rows of informative groups, the optimiser steps (`mini_batch_size` whole
        questions each, `updates_per_batch` passes), this process's trained rows, and how many
        forward passes each scoring phase runs.

        Collective safety: in every phase of a batch -- the old, templated and reference log-prob
        passes before the update, and each optimiser step's gradient passes -- EVERY process runs the
        same number of forward passes: the most any process needs for its rows (length-bucketed
        micro-batches of at most `micro_batch_tokens`), computed here from the global rows; a process
        with fewer rows pads with idle one-token passes. Whether a phase runs at all is decided from
        the global rows too. Under FSDP every forward is a collective (each layer's parameters are
        gathered from all processes); under DDP each backward's gradient all-reduce is.
        """
        cfg = self.config
        rows = [_Row.of(shape, g, o.example_id, o.rank, cfg.distill)
                for g, o in enumerate(batch.outcomes) for shape in o.calls]
        adv = group_advantages([o.reward for o in batch.outcomes], [o.example_id for o in batch.outcomes],
                               scale=cfg.scale_rewards)
        trained = [i for i, row in enumerate(rows) if adv.informative[row.rollout]]
        local = [c for r in rollouts for c in r.calls]  # this process's rows, in global row order
        offset = next((i for i, row in enumerate(rows) if row.rank == self.accelerator.process_index
                       and row.rollout >= batch.first), len(rows))
        mine = [i for i in trained if offset <= i < offset + len(local)]
        steps = [[trained[j] for j in mb] for mb in self._mini_batches([rows[i].example_id for i in trained])
                 ] if trained else []
        steps = steps * cfg.updates_per_batch
        scored = [rows[i] for i in trained]
        distilled_rows = [r for r in scored if cfg.distill and r.templated]
        # on-policy, pi_old = pi_theta: with one optimiser step and nothing that needs pi_old before it (no
        # truncated IS, no template ratio of a distilled row anywhere in the batch), the gradient pass's own
        # detached log-probs are the old ones -- a forward pass saved (as TRL does)
        old_is_current = len(steps) == 1 and cfg.tis_cap is None and not (
            self.template_ratio.needs_old_logprobs and distilled_rows)
        passes = {"old": 0 if old_is_current else self._busiest(scored, lambda r: r.prompt_len),
                  "templated": self._busiest(distilled_rows, lambda r: r.sampled_prompt_len),
                  "ref": self._busiest(scored, lambda r: r.prompt_len) if self.uses_reference else 0}
        return _Plan(rows=rows, adv=adv, trained=trained, steps=steps,
                     chosen=[local[i - offset] for i in mine],
                     advantages=adv.values[[rows[i].rollout for i in mine]],  # every call: its rollout's advantage
                     position={g: j for j, g in enumerate(mine)},
                     norm_length=cfg.dr_grpo_length or max((rows[i].completion_len for i in trained), default=1),
                     old_is_current=old_is_current, passes=passes)

    def _busiest(self, rows: list["_Row"], prompt_len: Callable[["_Row"], int]) -> int:
        """The most micro-batches any process needs to score its `rows` (prompt of `prompt_len` + completion)."""
        return max(len(plan_micro_batches([prompt_len(r) + r.completion_len for r in rows if r.rank == rank],
                                          self.config.micro_batch_tokens))
                   for rank in range(self.accelerator.num_processes))

    # ------------------------------------------------------------------ before the update (named steps)
    def _prepare(self, chosen: list[Call], advantages: torch.Tensor, *,
                 plan: "_Plan") -> tuple[_Sequences, dict[int, torch.Tensor]]:
        """This process's trained rows (`plan.chosen`) and their advantages, scored before the update,
        each phase in `plan.passes` forward passes; returns them and log pi(y | x~) of the distilled
        rows (by row)."""
        prompts = [gradient_prompt(r, self.config.distill) for r in chosen]
        completions = [r.completion_ids for r in chosen]
        old = None if plan.old_is_current else self._old_logprobs(prompts, completions, plan.passes["old"])
        tilde = self._templated_logprobs(chosen, plan.passes["templated"])
        weights, kept = self._token_weights(chosen, old, tilde)
        upper = self._clip_ceiling(chosen, old, tilde)
        ref = self._reference_logprobs(prompts, completions, plan.passes["ref"]) if self.uses_reference else None
        seqs = _Sequences(prompts=tuple(prompts), completions=tuple(completions), advantages=advantages,
                          old=_frozen(old), weights=tuple(weights), kept=tuple(kept), upper=_frozen(upper),
                          ref=_frozen(ref))
        return seqs, tilde

    def _old_logprobs(self, prompts: list[list[int]], completions: list[list[int]], passes: int) -> list[torch.Tensor]:
        """log pi_old(y_t | p, y_<t) on the gradient prompt p: the denominator of the PPO ratio
        rho_t = pi_theta / pi_old, held over all the batch's optimiser steps."""
        return self._logprobs(self._scoring_model, prompts, completions, passes)

    def _templated_logprobs(self, chosen: list[Call], passes: int) -> dict[int, torch.Tensor]:
        """log pi(y_t | x~, y_<t) of each distilled row (by row), x~ = T(x, z) the prompt it was
        sampled from: the denominator of the template ratio r_t = pi(y_t | x) / pi(y_t | x~), and
        the trainer's side of the comparison with the engine's log-probs."""
        rows = [j for j, r in enumerate(chosen) if distilled(r, self.config.distill)]
        logprobs = self._logprobs(self._scoring_model, [chosen[j].sampled_prompt_ids for j in rows],
                                  [chosen[j].completion_ids for j in rows], passes)
        return dict(zip(rows, logprobs))

    def _reference_logprobs(self, prompts: list[list[int]], completions: list[list[int]],
                            passes: int) -> list[torch.Tensor]:
        """log pi_ref(y_t | p, y_<t), pi_ref = pi_init for the KL term (beta > 0): the frozen copy of the
        initial weights or, with a LoRA adapter, this very module with its adapter disabled (no second copy)."""
        if self.ref_model is None:
            with self.model.disable_adapter():
                return self._logprobs(self._scoring_model, prompts, completions, passes)
        reference = self.ref_model if self.sharded else self.accelerator.unwrap_model(self.ref_model)
        return self._logprobs(reference, prompts, completions, passes)

    def _token_weights(self, chosen: list[Call], old: list[torch.Tensor] | None,
                       tilde: dict[int, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(w_t, m_t) per row: w_t = w(r_t) * min(C, pi_theta(y_t | s) / pi_engine(y_t | s)).

        w(r_t), m_t: the template ratio's weight and mask of a distilled token (`TemplateRatio`),
        1 and kept elsewhere; the second factor is truncated importance sampling (`tis_cap` = C,
        s the sampled prompt), 1 when off."""
        weights = [torch.ones(len(r.completion_ids)) for r in chosen]
        kept = [torch.ones(len(r.completion_ids), dtype=torch.bool) for r in chosen]
        if old is not None:
            for j, lp_tilde in tilde.items():
                weights[j], kept[j] = self.template_ratio.weights(old[j], lp_tilde)
        if self.config.tis_cap is not None:
            weights = [w * truncated_is_weights(t, _behaviour(r), self.config.tis_cap)
                       for w, t, r in zip(weights, _on_sampled_prompt(old, tilde), chosen)]
        return weights, kept

    def _clip_ceiling(self, chosen: list[Call], old: list[torch.Tensor] | None,
                      tilde: dict[int, torch.Tensor]) -> list[torch.Tensor] | None:
        """The upper clip c_t per row: max(1 + eps_high, pi(y_t | x~) / pi_old(y_t | x)) for a
        distilled token under `template_clip` (`TemplateRatio.ceiling`), 1 + eps_high elsewhere;
        None when no token's ceiling is raised."""
        if not (self.template_ratio.clip and tilde):
            return None
        upper = [torch.full((len(r.completion_ids),), 1 + self.config.epsilon_high) for r in chosen]
        for j, lp_tilde in tilde.items():
            upper[j] = self.template_ratio.ceiling(old[j], lp_tilde)
        return upper

    @property
    def _scoring_model(self) -> torch.nn.Module:
        """The module for no-grad log-prob passes: under DDP the module inside the wrapper (a DDP
        forward would broadcast buffers for nothing); a sharded module itself (its forward gathers the
        shards: every process runs the phase's planned number of passes, `_plan`)."""
        if isinstance(self._model, torch.nn.parallel.DistributedDataParallel):
            return self._model.module
        return self._model

    def _logprobs(self, model, prompts, completions, passes: int) -> list[torch.Tensor]:
        return sequence_logprobs(model, prompts, completions, pad_id=self.pad_id, max_tokens=self.config.micro_batch_tokens,
                                 temperature=self.temperature, device=self.device,
                                 logits_to_keep=self._logits_to_keep, passes=passes)

    def _mini_batches(self, groups: list[str]) -> list[list[int]]:
        """Row indices per optimiser step: `mini_batch_size` whole questions each."""
        order: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            order.setdefault(g, []).append(i)
        per_step = self.config.mini_batch_size or len(order)
        members = list(order.values())
        return [sum(members[s:s + per_step], []) for s in range(0, len(members), per_step)]

    def _micro_plan(self, rows: list["_Row"], members: list[int]) -> list[list[int]]:
        """Length-bucketed micro-batches (lists of `members`) of one process's rows of a step."""
        lengths = [rows[g].prompt_len + rows[g].completion_len for g in members]
        return [[members[j] for j in mb] for mb in plan_micro_batches(lengths, self.config.micro_batch_tokens)]

    def _optimiser_step(self, seqs: _Sequences, mine: list[int], norm: dict,
                        n_micro: int) -> tuple[dict[str, float], dict[str, float], dict[int, torch.Tensor]]:
        """One optimiser step on this process's rows `mine` of the step's mini-batch.

        Every process runs `n_micro` forward/backward passes (the most any process needs;
        the extra ones are idle passes with a zero loss), so DDP's one gradient all-reduce
        (on the last pass) and FSDP's per-pass gathers and gradient reduce-scatters line up
        across processes (FSDP2 reduce-scatters after every backward, keeping only shards of the
        gradients: accelerate's no_sync is DDP's alone).
        Returns this process's loss/clip/token sums, the step's lr and grad norm, and (on-policy)
        the old log-probs its gradient passes took, by row.
        """
        cfg, acc = self.config, self.accelerator
        micro = [[mine[j] for j in mb] for mb in plan_micro_batches(
            [len(seqs.prompts[i]) + len(seqs.completions[i]) for i in mine], cfg.micro_batch_tokens)] if mine else []
        sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "tokens": 0.0}
        old: dict[int, torch.Tensor] = {}
        self._model.train()
        for n in range(max(1, n_micro)):
            last = n == max(1, n_micro) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self._model):
                if n < len(micro):
                    loss, stats, micro_old = self._micro_batch_loss(seqs, micro[n], norm)
                    old.update(micro_old)
                    for k, v in stats.items():
                        sums[k] += v
                else:
                    loss = self._idle_loss()
                # DDP / FSDP average gradients over processes; the loss is already a share of the global mean
                acc.backward(loss * acc.num_processes)
        grad_norm = acc.clip_grad_norm_(self._model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):  # the norm over all shards (a DTensor)
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return sums, {"lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}, old

    def _idle_loss(self) -> torch.Tensor:
        """A zero loss through the whole model: a process without rows in a step still joins its collectives."""
        return idle_forward(self._model, self.pad_id, self.device).sum() * 0.0

    def _micro_batch_loss(self, seqs: _Sequences, rows: list[int],
                          norm: dict) -> tuple[torch.Tensor, dict, dict[int, torch.Tensor]]:
        """The micro-batch's share of J (losses.py) on `rows` of `seqs`; returns it, its stats and,
        on-policy, the old log-probs it took (by row)."""
        cfg = self.config
        batch = make_batch(rows, seqs.prompts, seqs.completions, self.pad_id, self.device)
        logp = batch_logprobs(self._model, batch, self.temperature, self._logits_to_keep)  # log pi_theta(y_t | p, y_<t)

        def per_token(values, fill=0.0):  # per-row 1-D tensors -> [rows, width], aligned with logp
            return right_align(values, rows, batch.width, fill).to(self.device)

        old = logp.detach() if seqs.old is None else per_token(seqs.old)  # on-policy: pi_old = pi_theta
        tl = token_loss(logp, old, seqs.advantages[rows].to(self.device), epsilon_low=cfg.epsilon_low,
                        epsilon_high=cfg.epsilon_high, weights=per_token(seqs.weights),
                        upper=per_token(seqs.upper, fill=1.0) if seqs.upper is not None else None,
                        ref_logp=per_token(seqs.ref) if seqs.ref is not None else None, beta=cfg.beta)
        mask = batch.completion_mask & per_token(seqs.kept).bool()
        loss = aggregate(tl.loss, mask, cfg.loss_agg, **norm)
        m = mask.float()
        stats = {"loss": loss.item(), "clip_low": (tl.clipped_low * m).sum().item(),
                 "clip_high": (tl.clipped_high * m).sum().item(), "tokens": m.sum().item(),
                 "kl": (tl.kl * m).sum().item() if tl.kl is not None else 0.0}
        taken = {} if seqs.old is not None else {
            i: old[r, batch.width - len(seqs.completions[i]):].float().cpu() for r, i in enumerate(rows)}
        return loss, stats, taken

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | os.PathLike, extra_state: dict | None = None, *,
                        prune: bool = True) -> Path:
        """Write `directory/checkpoint-<step>` (layout: checkpoints.py) and, with `prune`, delete all but
        the last `keep_last_checkpoints`. A caller that records the new checkpoint elsewhere (the loop's
        state.json) passes prune=False and calls `prune_checkpoints` only once that record is saved: a
        kill in between must leave the recorded checkpoint on disk.

        Every process writes its part under `.tmp-checkpoint-<step>`; the main process renames it only
        once EVERY process has finished (a slower rank must not find its directory gone). When a write
        fails on any process -- a full disk above all -- the temporary directory is removed and every
        process raises (`checkpoints.NoSpaceForCheckpoint` for a full disk): the checkpoints already
        on disk are untouched."""
        acc = self.accelerator
        root = Path(directory)
        final = root / ckpt.checkpoint_name(self.global_step)
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / ckpt.STATE_DIR).mkdir(parents=True)
        acc.wait_for_everyone()
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        failure: BaseException | None = None
        try:
            self._write_checkpoint(tmp, extra_state)
        except (Exception, CheckpointException) as exc:  # every process must hear of it
            failure = exc
        from accelerate.utils import gather_object

        failed = [f for f in gather_object([_failure_of(failure, acc.process_index)]) if f is not None]
        if acc.is_main_process:
            if failed:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                if prune:
                    ckpt.prune(root, self.config.keep_last_checkpoints)
        acc.wait_for_everyone()
        if failed:
            if any(f["no_space"] for f in failed):
                raise ckpt.NoSpaceForCheckpoint(self.global_step, root) from failure
            if failure is not None:
                raise failure
            raise RuntimeError(f"checkpoint {self.global_step} failed on process {failed[0]['rank']}: "
                               f"{failed[0]['error']}")
        return final

    def _write_checkpoint(self, tmp: Path, extra_state: dict | None) -> None:
        """This process's part of a checkpoint. Collectives first, in the same order everywhere (the full
        weights gathered, the optimizer's sharded save), then each process's own files."""
        acc = self.accelerator
        weights = self.full_state_dict()  # collective when sharded; the main process writes it
        if self.config.checkpoint_optimizer and self._torch_optimizer().state:  # nothing to save before a step
            self._save_optimizer(tmp / ckpt.STATE_DIR / ckpt.OPTIMIZER_DIR)
        from accelerate.checkpointing import save_accelerator_state

        # the scheduler (main process) and every process's RNG states: accelerate's own files
        save_accelerator_state(str(tmp / ckpt.STATE_DIR), model_states=[], optimizers=[], schedulers=[self.scheduler],
                               dataloaders=[], process_index=acc.process_index, step=acc.step, scaler=acc.scaler)
        if acc.is_main_process:
            with _quiet_tied_weight_warning():  # with LoRA: the adapter alone
                lora.save_pretrained(self.model, tmp / ckpt.MODEL_DIR, state_dict=weights)
            self.tokenizer.save_pretrained(tmp / ckpt.MODEL_DIR)
            ckpt.write_state(tmp, {"global_step": self.global_step, "extra_state": extra_state or {},
                                   "config": asdict(self.config), "processes": acc.num_processes,
                                   "optimizer": (tmp / ckpt.STATE_DIR / ckpt.OPTIMIZER_DIR).is_dir()})

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper

    def _save_optimizer(self, path: Path) -> None:
        """AdamW's state by parameter name in torch.distributed.checkpoint's format: each process writes
        its shards (replicated tensors once), and any number of processes can read it back."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self._torch_optimizer())
        with _dcp_alone():
            dcp.save({"optimizer": state}, checkpoint_id=str(path), no_dist=not _distributed())

    def _load_optimizer(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        optimizer = self._torch_optimizer()
        state = {"optimizer": get_optimizer_state_dict(self.model, optimizer)}  # the layout to read into
        with _dcp_alone():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
        set_optimizer_state_dict(self.model, optimizer, state["optimizer"])

    def _load_weights(self, model_dir: Path) -> None:
        """The full weights of `model/` into the (replicated or sharded) module (a LoRA run's: the
        adapter). Sharded: the main process reads the files and the others receive their shards from it."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if lora.is_adapted(self.model):  # model/ holds the adapter alone; the base came with the policy
            lora.load_adapter(self.model, model_dir)
            return
        read_here = not self.sharded or self.accelerator.is_main_process
        weights = {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()} \
            if read_here else {}
        if read_here and not weights:
            raise FileNotFoundError(f"checkpoint {model_dir.parent} holds no weights (no {model_dir}/*.safetensors)")
        result = set_model_state_dict(self.model, weights, options=StateDictOptions(
            full_state_dict=True, strict=False, broadcast_from_rank0=self.sharded))
        if read_here and (result.unexpected_keys or [k for k in result.missing_keys if "lm_head" not in k]):
            raise ValueError(f"checkpoint {model_dir.parent} does not fit the model: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")

    def prune_checkpoints(self, directory: str | os.PathLike) -> None:
        """Delete all but the last `keep_last_checkpoints` complete checkpoints (main process)."""
        if self.accelerator.is_main_process:
            ckpt.prune(directory, self.config.keep_last_checkpoints)

    def load_checkpoint(self, directory: str | os.PathLike) -> dict:
        """Restore weights, optimizer, scheduler, RNG and step from a checkpoint (written under any
        number of processes, sharded or not); returns its extra_state. A checkpoint without optimizer state
        (`checkpoint_optimizer: false`) restarts AdamW's moments: `optimizer_restarted` says so."""
        directory = Path(directory)
        state = ckpt.read_state(directory)
        acc = self.accelerator
        if ckpt.written_by_save_state(directory):  # the earlier layout: accelerate's save_state of everything
            if self.sharded:
                raise ValueError(f"checkpoint {directory} was written without sharding; resume it with sharding: none")
            acc.load_state(str(directory / ckpt.STATE_DIR))
            self.optimizer_restarted = False
        else:
            from accelerate.checkpointing import load_accelerator_state

            self._load_weights(directory / ckpt.MODEL_DIR)
            optimizer = directory / ckpt.STATE_DIR / ckpt.OPTIMIZER_DIR
            if optimizer.is_dir():
                self._load_optimizer(optimizer)
            self.optimizer_restarted = not optimizer.is_dir() and int(state["global_step"]) > 0
            load_accelerator_state(str(directory / ckpt.STATE_DIR), models=[], optimizers=[],
                                   schedulers=[self.scheduler], dataloaders=[], process_index=acc.process_index,
                                   scaler=acc.scaler)
        self.global_step = int(state["global_step"])
        return state.get("extra_state", {})


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet_tied_weight_warning():
    """accelerate warns on every save that tied embeddings (lm_head = embed_tokens) are stored
    once; that is expected for these models, and the warning buried the progress output."""
    logger = logging.getLogger("accelerate.utils.other")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_ratio: float,
                   total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule: transformers' `get_scheduler` with a linear warm-up over
    ceil(warmup_ratio * total_steps) optimiser steps, then "constant", "cosine" or "linear"
    decay to 0 at `total_steps` (without total_steps only "constant", and no warm-up).

    transformers' warm-up starts at lr 0, so a run's first step would not train: during the
    warm-up step s takes the schedule's factor of step s + 1 (lr / w, 2 lr / w, ..., lr; the
    schedule runs at least one step past the warm-up, so that last factor is 1 even when the
    warm-up is the whole run). Past total_steps the factor stays at that of total_steps.
    """
    from transformers import get_scheduler

    if total_steps is None:
        if schedule != "constant":
            raise ValueError(f"lr_schedule={schedule!r} needs GRPOTrainer(total_steps=...)")
        return get_scheduler("constant", optimizer)
    warmup = math.ceil(warmup_ratio * total_steps)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    factor = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                           num_training_steps=max(total_steps, warmup + 1)).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: factor(step + 1 if step < warmup else min(step, total_steps)))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _dcp_alone():
    """torch.distributed.checkpoint warns on every save / load without a process group (one process):
    that is intended here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _failure_of(exc: BaseException | None, rank: int) -> dict | None:
    """What the other processes learn of this process's failed checkpoint write (picklable)."""
    if exc is None:
        return None
    return {"rank": rank, "error": f"{type(exc).__name__}: {exc}"[:500], "no_space": _no_space(exc)}


def _no_space(exc: BaseException) -> bool:
    """Whether a full disk is behind `exc` (its cause chain, or a rank's failure inside DCP's
    CheckpointException)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        wrapped = getattr(e, "failures", None) or {}  # rank -> (exception, traceback)
        todo += [e.__cause__, e.__context__, *(f[0] if isinstance(f, tuple) else f for f in wrapped.values())]
    return False


def _refuse_accelerate_fsdp(accelerator: Any) -> None:
    """accelerate's FSDP plugin would shard the model with accelerate's own (GPU-only, here untested)
    code; the trainer shards it itself (`trainer.sharding: fsdp2`) under a plain multi-process launch."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from dspy_p2o.config import ConfigError

        raise ConfigError("accelerate's FSDP plugin is not how dspy_p2o shards: launch with a multi-GPU accelerate "
                          "config (distributed_type: MULTI_GPU, e.g. benchmarks/gpu/accelerate/multi_gpu.yaml) and set "
                          "trainer.sharding: fsdp2")


def make_accelerator(dtype: str, timeout_s: float = TrainerConfig.process_timeout_s):
    """The trainer's Accelerator: mixed precision from `dtype`; under torchrun / accelerate launch
    the process group's collectives wait up to `timeout_s` (the other ranks wait for rank 0's GEPA)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if dtype in ("auto",):
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    else:
        precision = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[DTYPES[dtype]]  # accelerate's names
    return Accelerator(mixed_precision=precision, cpu=not cuda,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))])


def _load(model: Any, tokenizer: Any, dtype: torch.dtype = torch.float32):
    if isinstance(model, torch.nn.Module):
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspy_p2o.engines.hf import check_model_path

    source = check_model_path(model)
    module = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return module, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source)


def _validate(rollouts: Sequence[Rollout], allow_empty: bool = False) -> None:
    if not rollouts and not allow_empty:
        raise ValueError("train_on() got no rollouts")
    for n, r in enumerate(rollouts):
        if not math.isfinite(r.reward):
            raise ValueError(f"rollout {n} (example {r.example_id!r}) has a non-finite reward {r.reward}")
        for m, c in enumerate(r.calls):
            where = f"rollout {n} (example {r.example_id!r})" + (f", call {m} ({c.predictor})" if len(r.calls) > 1 else "")
            if not c.completion_ids:
                raise ValueError(f"{where} has an empty completion")
            if len(c.behaviour_logprobs) != len(c.completion_ids):
                raise ValueError(f"{where} has {len(c.behaviour_logprobs)} behaviour log-probs for "
                                 f"{len(c.completion_ids)} completion tokens")
            if not c.prompt_ids or not c.sampled_prompt_ids:
                raise ValueError(f"{where} has an empty prompt")
            if not c.templated and list(c.prompt_ids) != list(c.sampled_prompt_ids):
                raise ValueError(f"{where} is plain (template=None) but its sampled prompt differs from its prompt")


@dataclass
class _Row:
    """What every process knows of every call (trained sequence) of the global batch (no token ids)."""

    rollout: int  # its rollout's index in the global batch: the call takes that rollout's advantage
    example_id: str
    prompt_len: int  # the gradient prompt: x, or T(x, z) when distill=False
    sampled_prompt_len: int  # the prompt it was sampled from: x, or T(x, z)
    completion_len: int
    templated: bool
    truncated: bool
    rank: int  # the process that holds the call

    @classmethod
    def of(cls, shape: CallShape, rollout: int, example_id: str, rank: int, distill: bool) -> "_Row":
        prompt_len = shape.prompt_len if distill or not shape.templated else shape.sampled_prompt_len
        return cls(rollout, example_id, prompt_len, shape.sampled_prompt_len, shape.completion_len, shape.templated,
                   shape.truncated, rank)


@dataclass
class _Plan:
    """One batch's plan (`GRPOTrainer._plan`): global rows and steps, this process's trained rows."""

    rows: list[_Row]  # every call of the global batch
    adv: Any  # advantages.GroupAdvantages of the global batch's rollouts
    trained: list[int]  # rows of informative groups
    steps: list[list[int]]  # rows per optimiser step
    chosen: list[Call]  # this process's trained calls, in row order
    advantages: torch.Tensor  # their advantages
    position: dict[int, int]  # global row -> index into `chosen`
    norm_length: int  # dr_grpo's constant length
    old_is_current: bool  # pi_old is the gradient pass's own (no "old" scoring phase)
    passes: dict[str, int]  # forward passes of each scoring phase ("old", "templated", "ref"), alike on every process


def _sum_over_processes(step_sums: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per-step sums of every process, added up (one gather per batch)."""
    from accelerate.utils import gather_object

    per_process = gather_object([step_sums])
    return [{k: sum(p[s][k] for p in per_process) for k in step_sums[s]} for s in range(len(step_sums))]


def _batch_metrics(batch: GlobalBatch, rows: Sequence[_Row], adv) -> dict[str, float]:
    """Rewards per rollout; lengths and truncation per call (a trained sequence)."""
    outcomes = batch.outcomes
    rewards = torch.tensor([o.reward for o in outcomes], dtype=torch.float64)
    lengths = torch.tensor([r.completion_len for r in rows] or [0], dtype=torch.float64)
    templated = [o.reward for o in outcomes if o.templated]
    out = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
           "zero_std_group_frac": adv.zero_std_fraction, "groups": float(adv.num_groups),
           "rollouts": float(len(outcomes)), "completion_len_mean": lengths.mean().item(),
           "completion_len_max": lengths.max().item(),
           "truncated_frac": sum(r.truncated for r in rows) / max(1, len(rows)),
           "templated_frac": len(templated) / len(outcomes)}
    if len(rows) != len(outcomes):  # a compound program: calls per rollout vary
        out["calls_per_rollout"] = len(rows) / len(outcomes)
    if templated:
        out["reward_mean_templated"] = statistics.fmean(templated)
    plain = [o.reward for o in outcomes if not o.templated]
    if plain and templated:
        out["reward_mean_plain"] = statistics.fmean(plain)
    return out


def _step_metrics(step_stats: list[dict[str, float]], summed: list[dict[str, float]], beta: float) -> dict[str, float]:
    """Per-step stats (lr, grad norm) and the processes' summed loss / clip / KL sums, averaged over the steps."""
    for stats, sums in zip(step_stats, summed):
        tokens = max(1.0, sums["tokens"])
        stats.update(loss=sums["loss"], clip_frac_low=sums["clip_low"] / tokens,
                     clip_frac_high=sums["clip_high"] / tokens)
        if beta:
            stats["kl"] = sums["kl"] / tokens
    return {key: statistics.fmean(s[key] for s in step_stats) for key in step_stats[0]}


def _frozen(values: list[torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
    return tuple(values) if values is not None else None


def _behaviour(call: Call) -> torch.Tensor:
    """log pi_engine(y_t | s): the engine's log-probs of the completion on the prompt s it sampled from."""
    return torch.tensor(call.behaviour_logprobs, dtype=torch.float32)


def _on_sampled_prompt(old: Sequence[torch.Tensor], tilde: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """The trainer's log pi(y_t | s) on the prompt s each row was sampled from: x~ for a distilled
    row (`tilde`), its gradient prompt (`old`) otherwise."""
    return [tilde.get(j, lp) for j, lp in enumerate(old)]


def _mismatch_metrics(trainer, behaviour, templated) -> dict[str, float]:
    """Trainer minus engine log-probs on the sampled prompt, per token (plain and templated apart)."""
    out = {}
    for name, pick in (("plain", False), ("templated", True)):
        # (under DDP with on-policy old log-probs, a process only knows its own rows)
        diffs = [t - b for t, b, tm in zip(trainer, behaviour, templated) if tm == pick and len(t) == len(b)]
        if diffs:
            d = torch.cat(diffs)
            out[f"logprob_diff_{name}_mean"] = d.mean().item()
            out[f"logprob_diff_{name}_abs_mean"] = d.abs().mean().item()
            out[f"logprob_diff_{name}_abs_max"] = d.abs().max().item()
    return out
