"""P^2O run configuration: one dataclass tree, loadable from YAML, overridable by key=value.

A leaf module: it imports only the standard library, yaml and pydantic, so reading a
config (and `dspy-p2o train --help`) loads no torch, DSPy or GEPA. The trainer and the
prompt phase take their configs from here, as TRL keeps grpo_config.py apart from its trainer.

`P2OConfig` nests `TrainerConfig` (`trainer`), `PromptPhaseConfig` (`prompt`) and
`DataConfig` (`data`). Every knob has one home: the sampling temperature, the group size
`k` and the seed are the run's (top level); the loop hands them to the trainer and the
prompt phase as arguments. Overrides may use a dotted path (`trainer.lr=1e-5`) or a bare
field name (`lr=1e-5`, `distill=false`, `min_hard=8`): the field is found wherever it
lives in the tree. pydantic checks every value against its field's type, strictly (`1` is
not `true`, `"5"` is not 5; an integer is a number); each error is one ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

ADAPTERS = ("chat", "json", "xml")  # DSPy adapters that render, parse and serve the program (renderer.py)
METHODS = ("p2o", "grpo")  # P^2O, or the GRPO baseline: the same trainer and rollout budget, no prompt phase
LR_SCHEDULES = ("constant", "cosine", "linear")
LOSS_AGGREGATIONS = ("grpo", "dapo", "dr_grpo")  # trainer/losses.py
TEMPLATE_RATIO_MODES = ("mask", "soft", "off")  # trainer/losses.py
SCALES = ("group", "batch", "none")  # advantage std scaling (trainer/advantages.py)
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
}

_STRICT = ConfigDict(strict=True, extra="forbid")  # every config dataclass: values of the field's type, no unknown keys


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


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


@dataclass
class TrainerConfig:
    """Hyper-parameters of the GRPO trainer (`P2OConfig.trainer`). Defaults follow the paper
    (DESIGN.md §3) where it says. The sampling temperature and the seed are the run's
    (`P2OConfig.temperature`, `.seed`): `GRPOTrainer` takes them as arguments."""

    __pydantic_config__ = _STRICT

    lr: float = 1e-6  # AdamW learning rate (paper: 1e-6)
    warmup_ratio: float = 0.05  # linear warm-up over this fraction of total_steps (paper: 5%)
    lr_schedule: str = "constant"  # after warm-up: "constant", "cosine" or "linear" decay to 0 (needs total_steps)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # global grad-norm clipping; <= 0 disables it
    mini_batch_size: int | None = None  # questions per optimiser step; None = the whole batch in one step (paper: 64 of 128)
    updates_per_batch: int = 1  # passes over each batch's mini-batches (TRL's num_iterations, verl's ppo_epochs)
    micro_batch_tokens: int = 4096  # padded tokens per forward/backward (length-bucketed micro-batches)
    epsilon_low: float = 0.2  # PPO clip below: ratio >= 1 - epsilon_low
    epsilon_high: float = 0.28  # PPO clip above (DAPO's clip-higher): ratio <= 1 + epsilon_high
    loss_agg: str = "dapo"  # "grpo" (sequence mean, then batch mean) | "dapo" (token mean) | "dr_grpo" (sum / constant)
    dr_grpo_length: int | None = None  # dr_grpo's constant length; None = the longest completion of the batch
    scale_rewards: str = "group"  # advantage std scaling: "group" (GRPO) | "batch" | "none" (Dr. GRPO)
    beta: float = 0.0  # KL(pi || pi_init) coefficient; 0 = no reference model loaded (paper: no KL)
    tis_cap: float | None = None  # truncated importance sampling min(cap, pi_trainer / pi_engine) per token; None = off
    distill: bool = True  # gradient on x (context distillation) or, False, on the sampled T(x, z) (ablation)
    template_ratio: str = "mask"  # distilled tokens with pi(y_t|x)/pi(y_t|x~) outside the bounds: "mask" | "soft" | "off"
    template_ratio_bounds: tuple[float, float] = (0.01, 10.0)  # the authors' bounds
    template_clip: bool = False  # distilled tokens may climb to pi(y_t|x~) in one batch (upper clip, losses.py)
    gradient_checkpointing: bool = False  # recompute activations in backward (long completions on GPU)
    dtype: str = "auto"  # compute dtype: "auto" = bf16 autocast on GPU (fp32 master weights), fp32 on CPU
    sync: str = "step"  # engine weight sync after every optimiser "step" or only every "epoch"
    keep_last_checkpoints: int = 2  # older checkpoints are deleted
    process_timeout_s: float = 6 * 3600.0  # multi-process: how long a rank waits in a collective (GEPA runs on rank 0)

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
        if self.lr <= 0:
            raise ValueError(f"TrainerConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainerConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"TrainerConfig.mini_batch_size must be >= 1 or None, got {self.mini_batch_size}")
        if self.updates_per_batch < 1:
            raise ValueError(f"TrainerConfig.updates_per_batch must be >= 1, got {self.updates_per_batch}")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"TrainerConfig.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"TrainerConfig epsilons must satisfy 0 <= epsilon_low < 1, epsilon_high >= 0; "
                             f"got {self.epsilon_low}, {self.epsilon_high}")
        if self.beta < 0:
            raise ValueError(f"TrainerConfig.beta must be >= 0, got {self.beta}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"TrainerConfig.tis_cap must be > 0 or None, got {self.tis_cap}")
        lo, hi = self.template_ratio_bounds
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"TrainerConfig.template_ratio_bounds must satisfy 0 < lo <= 1 <= hi, got {(lo, hi)}")
        self.template_ratio_bounds = (float(lo), float(hi))


@dataclass
class PromptPhaseConfig:
    """Settings of the prompt phase (`P2OConfig.prompt`). The templates per hard question and
    the seed come from the run (k - plain_per_group, seed + epoch): `run_prompt_phase` takes them."""

    __pydantic_config__ = _STRICT

    min_hard: int = 100  # GEPA runs only on at least this many hard questions (authors: 100)
    dev_size: int = 300  # hard_dev size; half the hard set when it has fewer than 2 * dev_size
    budget: str | int = "heavy_4"  # light / medium / heavy (GEPA's auto), heavy_4 = 4 x heavy, or metric calls
    beam_width: int = 16  # W: parents explored per GEPA iteration, from the Pareto front
    same_template_in_group: bool = False  # ablation: one template for all K rollouts
    num_threads: int = 8
    stop_at_score: float = 1.0  # stop GEPA once a template's mean dev score reaches this
    solved_threshold: float = 1.0  # a score at or above this counts as "solved"
    reflection_minibatch_size: int = 3
    # GEPA merge (combine two candidates that evolved different predictors of a compound program) stays off:
    # gepa 0.1.4 draws the common ancestor weighted by its mean dev score and raises ("Total of weights must be
    # greater than zero") when that is 0, as the seed's usually is on a hard set (questions the policy fails
    # without a template). A one-predictor program has nothing to merge; round-robin reflection still evolves
    # every predictor of a compound one (tests/test_gepa_phase.py shows both)
    use_merge: bool = False
    max_reflection_failures: int = 3  # consecutive failed reflection calls that end the phase
    score_hard_train: bool = True  # score front + cover templates on hard_train to assign them too
    gepa_kwargs: dict = field(default_factory=dict)  # passed on to gepa.optimize

    def __post_init__(self) -> None:
        for name in ("min_hard", "dev_size", "beam_width", "num_threads", "reflection_minibatch_size",
                     "max_reflection_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"PromptPhaseConfig.{name} must be >= 1, got {getattr(self, name)}")
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
    train: str = "math_train"  # "math_train", "aime", a local .jsonl/.parquet path or a hub dataset id
    train_limit: int | None = None
    val: str | None = None  # same forms as train; None = no validation set
    val_limit: int | None = None
    question_field: str | None = None  # auto-detected when None
    answer_field: str | None = None


@dataclass
class RewardsConfig:
    """How the metric and the maths verifier run (`P2OConfig.rewards`): limits, not what is optimised."""

    __pydantic_config__ = _STRICT

    metric_timeout_s: float | None = 60.0  # a metric call still running after this scores 0 (counted); None = no limit
    verify_workers: int | None = None  # math-verify worker processes; None = min(4, CPUs)
    verify_memory_mb: int = 4096  # address-space cap per math-verify worker (MiB); 0 = none

    def __post_init__(self) -> None:
        if self.metric_timeout_s is not None and not self.metric_timeout_s > 0:
            raise ValueError(f"RewardsConfig.metric_timeout_s must be > 0 or null (no limit), got {self.metric_timeout_s}")
        if self.verify_workers is not None and self.verify_workers < 1:
            raise ValueError(f"RewardsConfig.verify_workers must be >= 1 or null, got {self.verify_workers}")
        if self.verify_memory_mb < 0:
            raise ValueError(f"RewardsConfig.verify_memory_mb must be >= 0 (0: no cap), got {self.verify_memory_mb}")


@dataclass
class P2OConfig:
    """Every knob of a P^2O run. Defaults are the paper's GPU setting (DESIGN.md §3)."""

    __pydantic_config__ = _STRICT

    # -- models and engines
    policy: str | None = None  # local model dir or hub id (CLI); compile() takes it as an argument
    engine: str = "local"  # "local" (in-process transformers) or "vllm"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"url": ..., "gpu_memory_utilization": 0.4}
    reflection: str = "self"  # "self" (frozen initial policy), "teacher:<litellm model>", "custom" (an LM given to compile)
    reflection_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"api_base": ..., "api_key_env": "MOONSHOT_API_KEY"}
    reflection_max_tokens: int = 4096
    reflection_retries: int = 3  # a teacher's retries per call (litellm back-off); reflection_kwargs.num_retries wins
    reflection_timeout_s: float = 120.0  # a teacher's seconds per attempt; reflection_kwargs.timeout wins
    reflection_preflight: bool = True  # one 1-token teacher call at start: a wrong endpoint or key fails before training
    adapter: str = "chat"  # DSPy adapter that renders, parses and serves the program: "chat", "json" or "xml"

    # -- Alg. 1
    method: str = "p2o"  # "p2o", or "grpo": the baseline (same trainer, same rollout budget, no prompt phase)
    epochs: int = 5
    batch_size: int = 128  # questions per phase-1 batch
    k: int = 6  # rollouts per question (GRPO group size); k - plain_per_group templates per hard question
    temperature: float = 0.6  # sampling, and the trainer's log-probs
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 12288  # completion budget per rollout
    plain_per_group: int = 0  # plain (un-templated) rollouts kept in each templated group
    tau: float = 1e-9  # a question is hard when its mean reward is below tau (default: no success)
    near_hard: bool = False  # the authors' code: exactly one success out of K is hard too
    hardness_on: str = "all"  # "all" rollouts of a group, or only its "plain" ones (falls back to all)
    shuffle: bool = True
    seed: int = 0  # data order, sampling, the trainer's python / numpy / torch seeds, GEPA (+ epoch)

    # -- bookkeeping
    checkpoint_every: int = 1  # phase-1 batches between checkpoints (mid-epoch resume granularity)
    eval_every_epoch: bool = True  # validation accuracy (no templates) after every epoch
    eval_k: int = 1  # samples per validation question (pass@1 is their mean)
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: "tensorboard", "wandb"
    progress: bool = True

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    prompt: PromptPhaseConfig = field(default_factory=PromptPhaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.engine in ("local", "vllm"), f"engine must be 'local' or 'vllm', got {self.engine!r}"),
            (self.reflection in ("self", "custom") or self.reflection.startswith("teacher:"),
             f"reflection must be 'self', 'teacher:<litellm model>' or 'custom', got {self.reflection!r}"),
            (not self.reflection.startswith("teacher:") or self.reflection[len("teacher:"):].strip(),
             f'reflection {self.reflection!r} names no model; write "teacher:<litellm model>", e.g. "teacher:openai/gpt-4.1"'),
            (self.temperature > 0, f"temperature must be > 0 (the trainer takes log-probs at the sampling temperature), "
                                   f"got {self.temperature}"),
            (self.reflection_retries >= 0, f"reflection_retries must be >= 0, got {self.reflection_retries}"),
            (self.reflection_timeout_s > 0, f"reflection_timeout_s must be > 0, got {self.reflection_timeout_s}"),
            (self.adapter in ADAPTERS, f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.k >= 2, f"k must be >= 2 (GRPO compares rollouts within a group), got {self.k}"),
            (0 <= self.plain_per_group < self.k, f"plain_per_group must be in [0, k), got {self.plain_per_group}"),
            (self.hardness_on in ("all", "plain"), f"hardness_on must be 'all' or 'plain', got {self.hardness_on!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

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


def resolve_key(key: str) -> list[str]:
    """The dotted path of an override key; a bare name must match exactly one field."""
    if "." in key or key in MOVED:
        return key.split(".")
    matches = [path for path in _field_paths(P2OConfig) if path[-1] == key]
    if not matches:
        raise ConfigError(f"unknown config key {key!r}")
    if len(matches) > 1:
        options = ", ".join(".".join(m) for m in matches)
        raise ConfigError(f"config key {key!r} is ambiguous; use one of: {options}")
    return matches[0]


def _field_paths(cls: type, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    paths = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            paths.extend(_field_paths(sub, prefix + (f.name,)))
        else:
            paths.append(list(prefix + (f.name,)))
    return paths


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
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


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(P2OConfig)


# pydantic's error types -> the form a value must take, for error messages
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping"}


def _config_error(exc: ValidationError) -> ConfigError:
    """pydantic's first error as one line naming the key (all unknown keys at once)."""
    errors = exc.errors()
    unknown = [_key(e["loc"]) for e in errors if e["type"] == "unexpected_keyword_argument"]
    if unknown:
        return ConfigError(f"unknown config key(s) {', '.join(unknown)}")
    first = errors[0]
    key, value = _key(first["loc"]), first["input"]
    if first["type"] == "value_error":  # a dataclass's own check (__post_init__)
        error = first["ctx"]["error"]
        return error if isinstance(error, ConfigError) else ConfigError(
            f"invalid config section {key or 'top level'!r}: {error}")
    if first["type"] == "dataclass_type":
        return ConfigError(f"config section {key or 'top level'!r} must be a mapping, got {type(value).__name__}")
    expected = " or ".join(dict.fromkeys(_EXPECTED[e["type"]] for e in errors
                                         if _key(e["loc"]) == key and e["type"] in _EXPECTED))
    if not expected:
        return ConfigError(f"config key {key!r}: {first['msg']}, got {value!r}")
    if value is None:
        return ConfigError(f"config key {key!r} must have a value ({expected}), got null")
    return ConfigError(f"config key {key!r} must be {expected}, got {value!r}")


def _key(loc: tuple) -> str:
    """The dotted config key of a pydantic error location (positions inside a value dropped)."""
    parts, cls = [], P2OConfig
    for part in loc:
        parts.append(str(part))
        cls = get_type_hints(cls).get(part) if isinstance(part, str) else None
        if not dataclasses.is_dataclass(cls):
            break
    return ".".join(parts)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)
