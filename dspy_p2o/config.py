"""P^2O run configuration: one dataclass tree, loadable from YAML, overridable by key=value.

A leaf module: it imports only the standard library, yaml and pydantic, so reading a
config (and `dspy-p2o train --help`) loads no torch, DSPy or GEPA. The trainer and the
prompt phase take their configs from here, as TRL keeps grpo_config.py apart from its trainer.

`P2OConfig` nests `TrainerConfig` (`trainer`), `PromptPhaseConfig` (`prompt`),
`DataConfig` (`data`) and the engines' options: `LocalOptions` (`local`) and `VLLMOptions`
(`vllm`, whose `VLLMServerOptions` part is how `VLLMServer` launches or attaches). The engines
take these same types as arguments, so the YAML schema and the engines' defaults are one.

Every knob has one home: the sampling temperature, the group size `k` and the seed are the
run's (top level); the loop hands them to the trainer and the prompt phase as arguments.
Overrides may use a dotted path (`trainer.lr=1e-5`) or a bare field name (`lr=1e-5`,
`distill=false`, `min_hard=8`): the field is found wherever it lives in the tree. pydantic
checks every value against its field's type, strictly (`1` is not `true`, `"5"` is not 5; an
integer is a number); a field's rules sit next to it (`knob`: its numeric range, what its
change means on resume); each error is one ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

ADAPTERS = ("chat", "json", "xml")  # DSPy adapters that render, parse and serve the program (renderer.py)
METHODS = ("p2o", "grpo")  # P^2O, or the GRPO baseline: the same trainer and rollout budget, no prompt phase
# the prompt phase's candidate proposers: GEPA's reflective instructions, DSPy few-shot demo sets, or both pools
PROMPT_OPTIMIZERS = ("gepa", "fewshot", "gepa+fewshot")
FEWSHOT_SOURCES = ("labeled", "bootstrapped", "both")  # gold answers of training questions / the run's own successes
LR_SCHEDULES = ("constant", "cosine", "linear")
LOSS_AGGREGATIONS = ("grpo", "dapo", "dr_grpo")  # trainer/losses.py
TEMPLATE_RATIO_MODES = ("mask", "soft", "off")  # trainer/losses.py
SCALES = ("group", "batch", "none")  # advantage std scaling (trainer/advantages.py)
# how the trainer's weights, gradients and AdamW state live across processes (trainer/sharding.py):
# "none" = a full replica per process (DDP), "fsdp2" = sharded with PyTorch's fully_shard
SHARDINGS = ("none", "fsdp2")
# dtype names a user may write -> torch's name (the engines' and the trainer's one table)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
BUDGET_PRESETS = {"light": ("light", 1), "medium": ("medium", 1), "heavy": ("heavy", 1), "heavy_4": ("heavy", 4)}

# Keys that left the schema, and where each lives now.
MOVED = {
    "prompt_phase": "method=grpo for the GRPO baseline (prompt_phase=false), method=p2o for P^2O (prompt_phase=true)",
    "trainer.temperature": "the top-level temperature (the trainer takes log-probs at the sampling temperature)",
    "trainer.seed": "the top-level seed",
    "prompt.k": "the top-level k (a hard question gets k - plain_per_group templates)",
    "prompt.seed": "the top-level seed",
    "engine_kwargs": "the engine's own section: `local:` (device, dtype, max_batch_size) or `vllm:` (url, api_key, "
                     "gpu_memory_utilization, ...; the self-reflection server under vllm.reference)",
}

_STRICT = ConfigDict(strict=True, extra="forbid")  # every config dataclass: values of the field's type, no unknown keys


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


# What a change of a field means when a run resumes (its `resume` rule; run_dir.py reads it):
IDENTITY = "identity"  # what the run is: recorded in identity.json; a change makes the run directory another run's
RESUMABLE = "resumable"  # may change on resume: how long it runs, where its servers are, how it reports, its memory
FIXED = "fixed"  # every other field (what the run optimises): a change is refused


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take (`knob(check=...)`); None passes for an optional field."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is outside
    high_open: bool = False

    def __contains__(self, value: float) -> bool:  # False for NaN: every comparison with it is
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, low_open=True)  # (0, 1]


def knob(default: Any = MISSING, *, factory: Any = MISSING, resume: str = FIXED, check: Range | None = None,
         policy_only: bool = False) -> Any:
    """A config field with its rules declared next to it (dataclass field metadata):
    `resume`: IDENTITY, RESUMABLE or FIXED (a section's rule covers every key inside it);
    `check`: the Range its value must be in (checked by `check_ranges` when the section is built);
    `policy_only`: a vLLM setting of the policy's server that the self-reflection
    reference server never inherits (`VLLMOptions.reference_options`)."""
    return field(default=default, default_factory=factory,
                 metadata={"resume": resume, "check": check, "policy_only": policy_only})


def check_ranges(section: Any, prefix: str | None = None, error: type[Exception] = ValueError) -> None:
    """Every field declared with `check=` holds a value in its Range, else `error` naming the
    field (`<Section>.<field>`, or `prefix` + field)."""
    prefix = f"{type(section).__name__}." if prefix is None else prefix
    for f in dataclasses.fields(section):
        allowed, value = f.metadata.get("check"), getattr(section, f.name)
        if allowed is None or value is None or value in allowed:
            continue
        optional = type(None) in typing.get_args(get_type_hints(type(section))[f.name])
        raise error(f"{prefix}{f.name} must be {allowed}{' or null' if optional else ''}, got {value!r}")


# Names whose values are secrets (api_key, reference_api_key, hf_token, password, Authorization, ...);
# `api_key_env` holds only the NAME of a variable and is kept.
SECRET_KEY = re.compile(r"(^|_)(api_?key|key|secret|password|passwd|token|authorization|auth|credentials?)$",
                        re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")  # http://user:password@host


def redact(value: Any, key: str = "") -> Any:
    """`value` without secrets: every value under a secret-like key becomes "***" and
    credentials inside URLs are removed. The one filter every config passes through
    before it leaves the process (config.yaml, trackers, logs, summaries, errors)."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if value not in (None, "", False) and SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub("***@", value)
    return value


LORA_ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


@dataclass
class LoraConfig:
    """Train a LoRA adapter instead of every weight (`TrainerConfig.lora`; peft's LoraConfig under
    the hood). Only the adapter gets gradients and optimiser state; pi_init (the KL reference and
    Self-Ref's reflection) is the base model with the adapter disabled, never a second copy; a vLLM
    engine is synced with the adapter alone (dspy_p2o/lora.py, engines/weight_sync.py)."""

    __pydantic_config__ = _STRICT

    r: int = knob(16, check=Range(1, 512))  # the adapter's rank (vLLM serves ranks up to 512)
    alpha: float = knob(32.0, check=POSITIVE)  # peft's lora_alpha: the update is scaled by alpha / r
    # on the adapter's input in every trainer pass, so pi_theta / pi_old carries dropout noise (TRL disables dropout)
    dropout: float = knob(0.0, check=Range(0, 1, high_open=True))
    # "all-linear" (every linear layer but the output head, as peft spells it) or module names, e.g.
    # [q_proj, v_proj]; lm_head / embed_tokens are trained too, then vLLM is synced with merged weights
    target_modules: list[str] | str = LORA_ALL_LINEAR

    def __post_init__(self) -> None:
        check_ranges(self)
        if isinstance(self.target_modules, str) and self.target_modules != LORA_ALL_LINEAR:
            raise ValueError(f"LoraConfig.target_modules must be {LORA_ALL_LINEAR!r} or a list of module names, "
                             f"got {self.target_modules!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"LoraConfig.target_modules must name at least one module, got {self.target_modules!r}")


@dataclass
class TrainerConfig:
    """Hyper-parameters of the GRPO trainer (`P2OConfig.trainer`). Defaults follow the paper
    (DESIGN.md §3) where it says. The sampling temperature and the seed are the run's
    (`P2OConfig.temperature`, `.seed`): `GRPOTrainer` takes them as arguments."""

    __pydantic_config__ = _STRICT

    lr: float = knob(1e-6, check=POSITIVE)  # AdamW learning rate (paper: 1e-6)
    # linear warm-up over this fraction of total_steps (paper: 5%)
    warmup_ratio: float = knob(0.05, check=Range(0, 1, high_open=True))
    lr_schedule: str = "constant"  # after warm-up: "constant", "cosine" or "linear" decay to 0 (needs total_steps)
    weight_decay: float = knob(0.0, check=NON_NEGATIVE)  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # global grad-norm clipping; <= 0 disables it
    # questions per optimiser step; None = the whole batch in one step (paper: 64 of 128)
    mini_batch_size: int | None = knob(None, check=AT_LEAST_1)
    # passes over each batch's mini-batches (TRL's num_iterations, verl's ppo_epochs)
    updates_per_batch: int = knob(1, check=AT_LEAST_1)
    # padded tokens per forward/backward (length-bucketed micro-batches)
    micro_batch_tokens: int = knob(4096, resume=RESUMABLE, check=AT_LEAST_1)
    epsilon_low: float = knob(0.2, check=Range(0, 1, high_open=True))  # PPO clip below: ratio >= 1 - epsilon_low
    # PPO clip above (DAPO's clip-higher): ratio <= 1 + epsilon_high
    epsilon_high: float = knob(0.28, check=NON_NEGATIVE)
    loss_agg: str = "dapo"  # "grpo" (sequence mean, then batch mean) | "dapo" (token mean) | "dr_grpo" (sum / constant)
    # dr_grpo's constant length; None = the longest completion of the batch
    dr_grpo_length: int | None = knob(None, check=AT_LEAST_1)
    scale_rewards: str = "group"  # advantage std scaling: "group" (GRPO) | "batch" | "none" (Dr. GRPO)
    # KL(pi || pi_init) coefficient; 0 = no reference model loaded (paper: no KL)
    beta: float = knob(0.0, check=NON_NEGATIVE)
    # truncated importance sampling min(cap, pi_trainer / pi_engine) per token; None = off
    tis_cap: float | None = knob(None, check=POSITIVE)
    distill: bool = True  # gradient on x (context distillation) or, False, on the sampled T(x, z) (ablation)
    template_ratio: str = "mask"  # distilled tokens with pi(y_t|x)/pi(y_t|x~) outside the bounds: "mask" | "soft" | "off"
    template_ratio_bounds: tuple[float, float] = (0.01, 10.0)  # the authors' bounds
    template_clip: bool = False  # distilled tokens may climb to pi(y_t|x~) in one batch (upper clip, losses.py)
    # recompute activations in backward (long completions on GPU)
    gradient_checkpointing: bool = knob(False, resume=RESUMABLE)
    dtype: str = "auto"  # compute dtype: "auto" = bf16 autocast on GPU (fp32 master weights), fp32 on CPU
    sync: str = "step"  # engine weight sync after every optimiser "step" or only every "epoch"
    keep_last_checkpoints: int = knob(2, resume=RESUMABLE, check=NON_NEGATIVE)  # older ones are deleted; 0 keeps all
    # False: checkpoints hold the weights only (about a third of the disk with AdamW); a resume then
    # restarts AdamW's moments from zero (said when it resumes)
    checkpoint_optimizer: bool = knob(True, resume=RESUMABLE)
    # "none": every process holds the whole model, gradients and AdamW state (DDP); "fsdp2": each of N
    # processes holds 1/N of them (PyTorch FSDP2 `fully_shard` on every decoder layer and the model;
    # launch with torchrun or accelerate launch). Checkpoints are alike either way: a resume may change it
    sharding: str = knob("none", resume=RESUMABLE)
    # multi-process: how long a rank waits in a collective (GEPA runs on rank 0)
    process_timeout_s: float = knob(6 * 3600.0, check=POSITIVE)
    # a LoRA adapter instead of every weight (LoraConfig); None = full fine-tuning
    lora: LoraConfig | None = knob(None, resume=IDENTITY)

    def __post_init__(self) -> None:
        def choice(name: str, options: tuple) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"TrainerConfig.{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("lr_schedule", LR_SCHEDULES)
        choice("loss_agg", LOSS_AGGREGATIONS)
        choice("scale_rewards", SCALES)
        choice("template_ratio", TEMPLATE_RATIO_MODES)
        choice("sync", ("step", "epoch"))
        choice("dtype", ("auto", *DTYPES))
        choice("sharding", SHARDINGS)
        if self.sharding == "fsdp2" and DTYPES.get(self.dtype) == "float16":
            raise ValueError("TrainerConfig.sharding fsdp2 trains in float32 or bfloat16 (float16 would need a "
                             "sharded gradient scaler); set trainer.dtype to bfloat16, float32 or auto")
        if self.sharding == "fsdp2" and self.lora is not None:
            raise ValueError("TrainerConfig.sharding fsdp2 shards full fine-tuning; a LoRA run (trainer.lora) keeps "
                             "its small adapter state replicated: set trainer.sharding to none")
        check_ranges(self)
        lo, hi = self.template_ratio_bounds
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"TrainerConfig.template_ratio_bounds must satisfy 0 < lo <= 1 <= hi, got {(lo, hi)}")
        self.template_ratio_bounds = (float(lo), float(hi))


@dataclass
class PromptPhaseConfig:
    """Settings of the prompt phase (`P2OConfig.prompt`). The templates per hard question and
    the seed come from the run (k - plain_per_group, seed + epoch): `run_prompt_phase` takes them."""

    __pydantic_config__ = _STRICT

    # who proposes templates: GEPA (instructions), fewshot (demo sets: DSPy's LabeledFewShot over gold answers and
    # the run's own successful rollouts), or gepa+fewshot (both pools, one budget: fewshot takes at most half)
    optimizer: str = "gepa"
    min_hard: int = knob(100, check=AT_LEAST_1)  # GEPA runs only on at least this many hard questions (authors: 100)
    dev_size: int = knob(300, check=AT_LEAST_1)  # hard_dev size; half the hard set when it has fewer than 2 * dev_size
    budget: str | int = "heavy_4"  # light / medium / heavy (GEPA's auto), heavy_4 = 4 x heavy, or metric calls
    beam_width: int = knob(16, check=AT_LEAST_1)  # W: parents explored per GEPA iteration, from the Pareto front
    same_template_in_group: bool = False  # ablation: one template for all K rollouts
    num_threads: int = knob(8, resume=RESUMABLE, check=AT_LEAST_1)
    stop_at_score: float = knob(1.0, check=POSITIVE)  # stop GEPA once a template's mean dev score reaches this
    solved_threshold: float = knob(1.0, check=FRACTION)  # a score at or above this counts as "solved"
    reflection_minibatch_size: int = knob(3, check=AT_LEAST_1)
    # GEPA merge (combine two candidates that evolved different predictors of a compound program) stays off:
    # gepa 0.1.4 draws the common ancestor weighted by its mean dev score and raises ("Total of weights must be
    # greater than zero") when that is 0, as the seed's usually is on a hard set (questions the policy fails
    # without a template). A one-predictor program has nothing to merge; round-robin reflection still evolves
    # every predictor of a compound one (tests/test_gepa_phase.py shows both)
    use_merge: bool = False
    max_reflection_failures: int = knob(3, check=AT_LEAST_1)  # consecutive failed reflection calls that end the phase
    score_hard_train: bool = True  # score front + cover templates on hard_train to assign them too
    fewshot_k: int = knob(2, check=AT_LEAST_1)  # demos per predictor in a fewshot candidate
    fewshot_candidates: int = knob(8, check=AT_LEAST_1)  # demo sets proposed (each scored on hard_dev, within budget)
    fewshot_source: str = "both"  # labeled (gold answers), bootstrapped (the run's own successful rollouts), both
    # stop a prompt phase once the reflection LM's cost (litellm's price map, USD) reaches this; None: no cap.
    # Templates found so far are kept; a model without a price never trips it
    max_cost_usd: float | None = knob(None, resume=RESUMABLE, check=NON_NEGATIVE)
    gepa_kwargs: dict = field(default_factory=dict)  # passed on to gepa.optimize

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.optimizer not in PROMPT_OPTIMIZERS:
            raise ValueError(f"PromptPhaseConfig.optimizer must be one of {', '.join(PROMPT_OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.fewshot_source not in FEWSHOT_SOURCES:
            raise ValueError(f"PromptPhaseConfig.fewshot_source must be one of {', '.join(FEWSHOT_SOURCES)}, "
                             f"got {self.fewshot_source!r}")
        if isinstance(self.budget, str) and self.budget not in BUDGET_PRESETS:
            raise ValueError(f"PromptPhaseConfig.budget must be one of {sorted(BUDGET_PRESETS)} or a number of "
                             f"metric calls, got {self.budget!r}")
        if not isinstance(self.budget, str) and (isinstance(self.budget, bool) or int(self.budget) < 1):
            raise ValueError(f"PromptPhaseConfig.budget as metric calls must be >= 1, got {self.budget!r}")


@dataclass
class DataConfig:
    """Where the CLI finds the program, metric and data (compile() takes them as arguments)."""

    __pydantic_config__ = _STRICT

    program: str = "math_cot"  # built-in name, "module:attr" or "file.py:attr"
    metric: str = "math"  # "math" (dspy_p2o.rewards.math_metric) or "module:attr"
    # "math_train", "aime", a local .jsonl/.parquet path or a hub dataset id
    train: str = knob("math_train", resume=RESUMABLE)
    train_limit: int | None = knob(None, resume=RESUMABLE, check=AT_LEAST_1)
    val: str | None = knob(None, resume=RESUMABLE)  # same forms as train; None = no validation set
    val_limit: int | None = knob(None, resume=RESUMABLE, check=AT_LEAST_1)
    question_field: str | None = knob(None, resume=RESUMABLE)  # auto-detected when None
    answer_field: str | None = knob(None, resume=RESUMABLE)
    # training rows whose difficulty / level lies in [min, max] (None: no bound); validation is not filtered
    train_min_difficulty: float | None = knob(None, resume=RESUMABLE, check=NON_NEGATIVE)
    train_max_difficulty: float | None = knob(None, resume=RESUMABLE, check=NON_NEGATIVE)
    # row fields kept on the training examples as labels, e.g. a worked solution named `reasoning`:
    # the few-shot prompt phase's labelled demos show it (GRPO's reward reads the answer only)
    keep_fields: list[str] = knob(factory=list, resume=RESUMABLE)

    def __post_init__(self) -> None:
        check_ranges(self)
        low, high = self.train_min_difficulty, self.train_max_difficulty
        if low is not None and high is not None and low > high:
            raise ValueError(f"DataConfig.train_min_difficulty {low} is above train_max_difficulty {high}")


# vLLM's --dtype choices
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
WEIGHT_SYNC_MODES = ("reload", "nccl")


@dataclass
class LocalOptions:
    """The in-process engine (`engine: local`; `P2OConfig.local`, `LocalEngine`'s keywords).
    With the trainer's module shared (training), device and dtype are the trainer's."""

    __pydantic_config__ = _STRICT

    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: cuda when present, else cpu
    dtype: str | None = None  # None / "auto": bf16 on GPU, fp32 on CPU; or one of config.DTYPES
    # sequences decoded together (prompts x n); larger inputs are chunked
    max_batch_size: int = knob(64, check=AT_LEAST_1)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.dtype not in (None, "auto", *DTYPES):
            raise ValueError(f"LocalOptions.dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class VLLMServerOptions:
    """How a managed `vllm serve` is launched, or where an attached server is (`url`).
    `VLLMServer` takes exactly this; `VLLMOptions` adds the engine's client and sync settings."""

    __pydantic_config__ = _STRICT

    url: str | None = knob(None, policy_only=True)  # attach to a running server (its root URL); None: launch one
    api_key: str | None = knob(None, policy_only=True)  # attached: its key (default $VLLM_API_KEY); managed: random
    port: int | None = knob(None, policy_only=True, check=Range(1, 65535))  # managed: None = a free port
    host: str = "127.0.0.1"  # managed: bind address (a dev-mode server stays on loopback)
    allow_remote_dev_routes: bool = False  # bind a dev-mode server to a non-loopback host anyway
    served_model_name: str | None = knob(None, policy_only=True)  # managed default "policy" ("reference")
    # leaves room for a trainer / a reference server on the same GPU
    gpu_memory_utilization: float = knob(0.45, check=FRACTION)
    tensor_parallel_size: int = knob(1, check=AT_LEAST_1)
    max_model_len: int | None = knob(None, check=AT_LEAST_1)  # None: the model's
    device: str | None = None  # "cpu" (vLLM's CPU build) or "cuda"; None: cuda when torch sees a GPU
    dtype: str = "auto"  # vLLM's --dtype; "auto" is float32 on CPU
    kv_cache_memory_bytes: int | None = knob(None, check=AT_LEAST_1)  # None: 1 GiB on CPU, vLLM's choice on GPU
    enforce_eager: bool = False  # no CUDA graphs / torch.compile (faster cold start)
    extra_args: list[str] = field(default_factory=list)  # appended to `vllm serve` verbatim
    startup_timeout_s: float = knob(600.0, check=POSITIVE)  # how long a managed server may take to answer /health
    log_path: str | None = knob(None, policy_only=True)  # the managed server's stdout+stderr; None: a temp file
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. {CUDA_VISIBLE_DEVICES: "1"}
    server_command: list[str] | None = None  # the launch prefix; None: vLLM's own CLI (any vLLM build)
    # set: --enable-lora --max-lora-rank (this, rounded up to a rank vLLM offers) and runtime adapter
    # loading; a LoRA run sets it from trainer.lora.r
    max_lora_rank: int | None = knob(None, policy_only=True, check=Range(1, 512))

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class VLLMOptions(VLLMServerOptions):
    """The vLLM engine (`engine: vllm`; `P2OConfig.vllm`, `VLLMEngine`'s options): its server
    (managed or attached), the HTTP client and the weight sync.

    `reference` is the frozen server of the initial weights that self-reflection
    (reflection=self) asks; unset, it is these options minus the policy-only fields
    (a managed server named "reference" beside the policy's). Set, it is used as written.
    A LoRA run (trainer.lora) needs none: the policy's server serves the base model under its own
    name beside the adapter, and that is pi_init (unless the adapter is synced as merged weights)."""

    request_timeout_s: float = knob(3600.0, check=POSITIVE)  # per-request read timeout (long generations take minutes)
    max_concurrency: int = knob(64, check=AT_LEAST_1)  # requests in flight at once (vLLM schedules them together)
    max_retries: int = knob(5, check=NON_NEGATIVE)  # attempts per request after connection errors / HTTP 502-504
    weight_sync: str = knob("reload", policy_only=True)  # "reload" (safetensors + reload_weights) or "nccl" (GPUs)
    verify_sync: bool = knob(True, policy_only=True)  # compare served log-probs with the trainer's after a sync
    # None: 1e-3 float32 server, 0.15 otherwise
    sync_tolerance: float | None = knob(None, policy_only=True, check=POSITIVE)
    sync_dir: str | None = knob(None, policy_only=True)  # where weights are written for reload; None: /dev/shm
    reload_kwargs: dict[str, Any] = knob(factory=dict, policy_only=True)  # extra kwargs of vLLM's reload_weights
    reference: VLLMOptions | None = knob(None, policy_only=True)  # the self-reflection server (see above)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"VLLMOptions.weight_sync must be one of {', '.join(WEIGHT_SYNC_MODES)}, "
                             f"got {self.weight_sync!r}")
        if self.reference is not None and self.reference.reference is not None:
            raise ValueError("VLLMOptions.reference has a reference of its own; a reference server needs none")

    def reference_options(self) -> VLLMOptions:
        """The options of the self-reflection server: `reference` as written, else these minus
        every policy-only field (a copy of the policy's `url` would attach to the policy server)."""
        if self.reference is not None:
            options = self.reference
        else:
            policy_only = {f.name: (f.default_factory() if f.default is MISSING else f.default)
                           for f in dataclasses.fields(self) if f.metadata.get("policy_only")}
            options = dataclasses.replace(self, **policy_only)
        if options.url is None and options.served_model_name is None:  # an attached one keeps its own name
            options = dataclasses.replace(options, served_model_name="reference")
        return options


ENGINE_OPTIONS = {"local": LocalOptions, "vllm": VLLMOptions}  # engine kind -> its options (its config section)


@dataclass
class RewardsConfig:
    """How the metric and the maths verifier run (`P2OConfig.rewards`): limits, not what is optimised."""

    __pydantic_config__ = _STRICT

    # a metric call still running after this many seconds scores 0 (counted as a failure); None = no limit
    metric_timeout_s: float | None = knob(60.0, check=POSITIVE)
    verify_workers: int | None = knob(None, check=AT_LEAST_1)  # math-verify worker processes; None = min(4, CPUs)
    verify_memory_mb: int = knob(4096, check=NON_NEGATIVE)  # address-space cap per math-verify worker (MiB); 0 = none

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class P2OConfig:
    """Every knob of a P^2O run. Defaults are the paper's GPU setting (DESIGN.md §3)."""

    __pydantic_config__ = _STRICT

    # -- models and engines
    # local model dir or hub id (CLI); compile() takes it as an argument
    policy: str | None = knob(None, resume=IDENTITY)
    # "local" (in-process transformers, options in `local`) or "vllm" (options in `vllm`)
    engine: str = knob("local", resume=RESUMABLE)
    # "self" (frozen initial policy), "teacher:<litellm model>", "custom" (an LM given to compile)
    reflection: str = knob("self", resume=RESUMABLE)
    # e.g. {"api_base": ..., "api_key_env": "MOONSHOT_API_KEY"}
    reflection_kwargs: dict[str, Any] = knob(factory=dict, resume=RESUMABLE)
    reflection_max_tokens: int = knob(4096, resume=RESUMABLE, check=AT_LEAST_1)
    # a teacher's retries per call (litellm back-off); reflection_kwargs.num_retries wins
    reflection_retries: int = knob(3, check=NON_NEGATIVE)
    # a teacher's seconds per attempt; reflection_kwargs.timeout wins
    reflection_timeout_s: float = knob(120.0, check=POSITIVE)
    reflection_preflight: bool = True  # one 1-token teacher call at start: a wrong endpoint or key fails before training
    adapter: str = "chat"  # DSPy adapter that renders, parses and serves the program: "chat", "json" or "xml"

    # -- Alg. 1
    # "p2o", or "grpo": the baseline (same trainer, same rollout budget, no prompt phase)
    method: str = knob("p2o", resume=IDENTITY)
    epochs: int = knob(5, resume=RESUMABLE, check=AT_LEAST_1)
    batch_size: int = knob(128, resume=IDENTITY, check=AT_LEAST_1)  # questions per phase-1 batch
    # rollouts per question (GRPO group size); k - plain_per_group templates per hard question
    k: int = knob(6, resume=IDENTITY)
    temperature: float = knob(0.6, resume=IDENTITY)  # sampling, and the trainer's log-probs
    top_p: float = knob(1.0, check=FRACTION)
    top_k: int = knob(0, check=NON_NEGATIVE)
    max_tokens: int = knob(12288, resume=IDENTITY, check=AT_LEAST_1)  # completion budget per rollout
    # a question whose prompt + max_tokens exceeds the policy's context: "refuse" (before any work) | "skip"
    long_prompts: str = "refuse"
    # program executions rolled out at once (one thread each; rollouts.py)
    max_concurrent_executions: int = knob(1024, resume=RESUMABLE, check=AT_LEAST_1)
    plain_per_group: int = knob(0, resume=IDENTITY)  # plain (un-templated) rollouts kept in each templated group
    # a question is hard when its mean reward is below tau (default: no success)
    tau: float = knob(1e-9, resume=IDENTITY, check=FRACTION)
    near_hard: bool = knob(False, resume=IDENTITY)  # the authors' code: exactly one success out of K is hard too
    # "all" rollouts of a group, or only its "plain" ones (falls back to all)
    hardness_on: str = knob("all", resume=IDENTITY)
    shuffle: bool = True
    # data order, sampling, the trainer's python / numpy / torch seeds, GEPA (+ epoch)
    seed: int = knob(0, resume=IDENTITY, check=NON_NEGATIVE)

    # -- bookkeeping
    # phase-1 batches between checkpoints (mid-epoch resume granularity)
    checkpoint_every: int = knob(1, resume=RESUMABLE, check=AT_LEAST_1)
    eval_every_epoch: bool = knob(True, resume=RESUMABLE)  # validation accuracy (no templates) after every epoch
    eval_k: int = knob(1, resume=RESUMABLE, check=AT_LEAST_1)  # samples per validation question (pass@1 is their mean)
    trackers: list[str] = knob(factory=list, resume=RESUMABLE)  # accelerate trackers: "tensorboard", "wandb"
    progress: bool = knob(True, resume=RESUMABLE)

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    prompt: PromptPhaseConfig = field(default_factory=PromptPhaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    local: LocalOptions = knob(factory=LocalOptions, resume=RESUMABLE)
    vllm: VLLMOptions = knob(factory=VLLMOptions, resume=RESUMABLE)
    rewards: RewardsConfig = knob(factory=RewardsConfig, resume=RESUMABLE)

    @property
    def engine_options(self) -> LocalOptions | VLLMOptions:
        """The options of the chosen engine (`local` or `vllm`)."""
        return self.vllm if self.engine == "vllm" else self.local

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_ranges(self, prefix="", error=ConfigError)
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.engine in ENGINE_OPTIONS, f"engine must be 'local' or 'vllm', got {self.engine!r}"),
            (self.reflection in ("self", "custom") or self.reflection.startswith("teacher:"),
             f"reflection must be 'self', 'teacher:<litellm model>' or 'custom', got {self.reflection!r}"),
            (not self.reflection.startswith("teacher:") or self.reflection[len("teacher:"):].strip(),
             f'reflection {self.reflection!r} names no model; write "teacher:<litellm model>", e.g. "teacher:openai/gpt-4.1"'),
            (self.temperature > 0, f"temperature must be > 0 (the trainer takes log-probs at the sampling temperature), "
                                   f"got {self.temperature}"),
            (self.adapter in ADAPTERS, f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}"),
            (self.k >= 2, f"k must be >= 2 (GRPO compares rollouts within a group), got {self.k}"),
            (0 <= self.plain_per_group < self.k, f"plain_per_group must be in [0, k), got {self.plain_per_group}"),
            (self.hardness_on in ("all", "plain"), f"hardness_on must be 'all' or 'plain', got {self.hardness_on!r}"),
            (self.long_prompts in ("refuse", "skip"), f"long_prompts must be 'refuse' or 'skip', got {self.long_prompts!r}"),
            (not (self.trainer.sharding == "fsdp2" and self.engine == "vllm" and self.vllm.weight_sync == "nccl"),
             "trainer.sharding fsdp2 syncs vLLM by reload (vllm.weight_sync: reload): the NCCL transfer sends from "
             "rank 0 alone, and under FSDP2 rank 0 holds only its shard"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def grpo_only_reason(self, train_size: int) -> str | None:
        """Why a P^2O run of this config on `train_size` questions can never train with a template (it is
        then GRPO), and how to change that; None when it can (or the method is GRPO anyway)."""
        if self.method != "p2o":
            return None
        if self.epochs < 2:
            return ("epochs=1: the prompt phase runs after an epoch and only a later epoch uses its templates; "
                    "set epochs >= 2")
        if self.prompt.min_hard > train_size:
            return (f"prompt.min_hard={self.prompt.min_hard} but the trainset has {train_size} questions: the prompt "
                    f"phase needs at least min_hard hard questions; set prompt.min_hard <= {train_size}")
        return None

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with its secrets redacted: what may be written or sent anywhere."""
        return redact(json.loads(json.dumps(self.to_dict(), default=_jsonable)))

    def to_yaml(self) -> str:
        """The redacted config as YAML (config.yaml of a run)."""
        return yaml.safe_dump(self.redacted(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "P2OConfig":
        """A config from plain data (YAML's); a wrong value, unknown or moved key is a ConfigError naming it."""
        _check_moved(data)
        try:
            return _adapter().validate_json(json.dumps(data, default=_jsonable))
        except ValidationError as exc:
            raise _config_error(exc) from None

    @classmethod
    def load(cls, source: "P2OConfig | Mapping[str, Any] | str | Path | None", overrides: Mapping[str, Any] | None = None) -> "P2OConfig":
        """A config from a dataclass, dict or YAML path, with overrides applied on top."""
        if source is None:
            data: dict[str, Any] = {}
        elif isinstance(source, P2OConfig):
            data = source.to_dict()
        elif isinstance(source, Mapping):
            data = dict(source)
        else:
            data = read_yaml(Path(source))
        data = json.loads(json.dumps(data, default=_jsonable))  # deep copy, tuples -> lists
        for key, value in (overrides or {}).items():
            _set_path(data, resolve_key(key), value)
        return cls.from_dict(data)


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config; `base: other.yaml` (relative to this file) is read first and overridden
    by this file's keys, so ablations state only what differs."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"config file {str(path)!r}: base chain loops back to {str(base_path)!r}")
    return _merge(read_yaml(base_path, _seen + (base_path,)), data)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line; values are parsed by `parse_scalar`.

    An empty key or value, or a value that is not valid YAML, is a ConfigError naming the
    key and the expected form (never a YAML parser's traceback, never a silent None)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if not raw.strip():
            raise ConfigError(f"override {key!r} has no value; write {key}=<value> (null for none)")
        try:
            out[key] = parse_scalar(raw)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise ConfigError(f"override {key!r}: value {raw!r} is not valid YAML ({problem}); expected a number, "
                              "true/false, a string, a [list] or a {mapping}") from None
    return out


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_scalar(raw: str) -> Any:
    """A command-line value as YAML, minus YAML 1.1's surprises: `off`/`on`/`yes`/`no` stay
    strings (`template_ratio=off`) and `1e-5` is a number, not the string YAML 1.1 makes of it."""
    value = yaml.safe_load(raw)
    text = raw.strip()
    if isinstance(value, bool) and text.lower() not in ("true", "false"):
        return text
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(text):
        return float(text)
    return value


def resume_rule(key: str) -> str:
    """The resume rule of a dotted config key: the first rule other than FIXED on its path
    (a RESUMABLE section's keys are all resumable); FIXED for a key the schema does not have."""
    cls: type | None = P2OConfig
    for part in key.split("."):
        declared = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
        if part not in declared:
            return FIXED
        rule = declared[part].metadata.get("resume", FIXED)
        if rule != FIXED:
            return rule
        cls = _section_type(get_type_hints(cls)[part])
    return FIXED


def identity_keys() -> list[str]:
    """The top-level fields that make a run what it is (IDENTITY), in declaration order."""
    return [f.name for f in dataclasses.fields(P2OConfig) if f.metadata.get("resume") == IDENTITY]


def sections() -> list[str]:
    """The top-level fields that are sections (trainer, prompt, data, local, vllm)."""
    hints = get_type_hints(P2OConfig)
    return [f.name for f in dataclasses.fields(P2OConfig) if _section_type(hints[f.name]) is not None]


def resolve_key(key: str) -> list[str]:
    """The dotted path of an override key; a bare name must match exactly one field."""
    if "." in key or key in MOVED or key in {f.name for f in dataclasses.fields(P2OConfig)}:
        return key.split(".")
    matches = [path for path in _field_paths(P2OConfig) if path[-1] == key]
    if not matches:
        raise ConfigError(unknown_keys([key]))
    if len(matches) > 1:
        options = ", ".join(".".join(m) for m in matches)
        raise ConfigError(f"config key {key!r} is ambiguous; use one of: {options}")
    return matches[0]


def unknown_keys(keys: list[str], root: type = P2OConfig) -> str:
    """The error for keys the schema lacks, each with its closest field (difflib) when there is
    one: `unknown config key 'trainer.lrr'; did you mean 'trainer.lr'?`. A key is compared with
    the fields of its own section (a bare name: with every field's name)."""
    by_name: dict[str, list[str]] = {}
    for path in _field_paths(root):
        by_name.setdefault(path[-1], []).append(".".join(path))
    for f in dataclasses.fields(root):  # a misspelt section ("trainr") is a bare name too
        by_name.setdefault(f.name, [f.name])
    named = []
    for key in keys:
        hint = " or ".join(repr(c) for c in _closest(key, root, by_name))
        named.append(f"{key!r}" + (f" (did you mean {hint}?)" if hint and len(keys) > 1 else
                                   f"; did you mean {hint}?" if hint else ""))
    return f"unknown config key{'s' if len(keys) > 1 else ''} {', '.join(named)}"


def _closest(key: str, root: type, by_name: dict[str, list[str]]) -> list[str]:
    section, _, name = key.rpartition(".")
    if not section:
        close = difflib.get_close_matches(name, list(by_name), n=1)
        return close if not close or len(by_name[close[0]]) == 1 else by_name[close[0]]
    siblings = [p[-1] for p in _field_paths(root, optional_sections=True) if ".".join(p[:-1]) == section]
    return [f"{section}.{match}" for match in difflib.get_close_matches(name, siblings, n=1)]


def _field_paths(cls: type, prefix: tuple[str, ...] = (), *, optional_sections: bool = False,
                 _within: tuple[type, ...] = ()) -> list[list[str]]:
    """Every leaf field's path; `optional_sections` descends into `X | None` sections too
    (vllm.reference), once: a section of a type already on its path is a leaf."""
    paths = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        section = _section_type(hint) if optional_sections or dataclasses.is_dataclass(hint) else None
        if section is None or section in _within:
            paths.append(list(prefix + (f.name,)))
        else:
            paths.extend(_field_paths(section, prefix + (f.name,), optional_sections=optional_sections,
                                      _within=_within + (cls,)))
    return paths


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if node.get(part) is None:  # an unset optional section (trainer.lora: null) is set key by key too
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def _check_moved(data: Any) -> None:
    """A key that left the schema names its new home (never an 'unknown key', never dropped)."""
    for key, home in MOVED.items():
        section, _, name = key.rpartition(".")
        node = data.get(section) if section and isinstance(data, Mapping) else data
        if isinstance(node, Mapping) and name in node:
            raise ConfigError(f"config key {key!r} has moved; use {home}")


def engine_options_from(kind: str, values: Mapping[str, Any]) -> LocalOptions | VLLMOptions:
    """The typed options of engine `kind` ("local" or "vllm") from plain data, e.g. the eval
    command's `--engine-arg`s; a wrong key or value is a ConfigError naming it."""
    if kind not in ENGINE_OPTIONS:
        raise ConfigError(f"engine must be one of {', '.join(ENGINE_OPTIONS)}, got {kind!r}")
    try:
        return _adapter(ENGINE_OPTIONS[kind]).validate_json(json.dumps(dict(values), default=_jsonable))
    except ValidationError as exc:
        raise _config_error(exc, ENGINE_OPTIONS[kind]) from None


@functools.cache
def _adapter(cls: type = P2OConfig) -> TypeAdapter:
    return TypeAdapter(cls)


# pydantic's error types -> the form a value must take, for error messages
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping"}


def _config_error(exc: ValidationError, root: type = P2OConfig) -> ConfigError:
    """pydantic's first error as one line naming the key (all unknown keys at once)."""
    errors = exc.errors()
    unknown = [_key(e["loc"], root) for e in errors if e["type"] == "unexpected_keyword_argument"]
    if unknown:
        return ConfigError(unknown_keys(unknown, root))
    first = errors[0]
    key, value = _key(first["loc"], root), first["input"]
    if first["type"] == "value_error":  # a dataclass's own check (__post_init__)
        error = first["ctx"]["error"]
        if isinstance(error, ConfigError) or not key:  # the root's own check names its field already
            return ConfigError(str(error))
        return ConfigError(f"invalid config section {key!r}: {error}")
    if first["type"] == "dataclass_type":
        return ConfigError(f"config section {key or 'top level'!r} must be a mapping, got {type(value).__name__}")
    expected = " or ".join(dict.fromkeys(_EXPECTED[e["type"]] for e in errors
                                         if _key(e["loc"], root) == key and e["type"] in _EXPECTED))
    if not expected:
        return ConfigError(f"config key {key!r}: {first['msg']}, got {value!r}")
    if value is None:
        return ConfigError(f"config key {key!r} must have a value ({expected}), got null")
    return ConfigError(f"config key {key!r} must be {expected}, got {value!r}")


def _key(loc: tuple, root: type = P2OConfig) -> str:
    """The dotted config key of a pydantic error location (positions inside a value dropped)."""
    parts, cls = [], root
    for part in loc:
        parts.append(str(part))
        cls = _section_type(get_type_hints(cls).get(part)) if isinstance(part, str) else None
        if cls is None:
            break
    return ".".join(parts)


def _section_type(hint: Any) -> type | None:
    """The config dataclass a field holds (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    sections = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
    return sections[0] if len(sections) == 1 else None


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)
