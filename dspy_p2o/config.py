"""P^2O run configuration: one dataclass tree, loadable from YAML, overridable by key=value.

`P2OConfig` nests the trainer's and the prompt phase's own configs. Overrides may use a
dotted path (`trainer.lr=1e-5`) or a bare field name (`lr=1e-5`, `distill=false`,
`min_hard=8`): the field is found wherever it lives in the tree; a top-level field wins
over nested ones of the same name (`k`, `seed`, `temperature` drive their nested copies).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml

from dspy_p2o.prompt_phase.gepa_phase import PromptPhaseConfig
from dspy_p2o.renderer import ADAPTERS
from dspy_p2o.trainer.grpo import TrainerConfig


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
class DataConfig:
    """Where the CLI finds the program, metric and data (compile() takes them as arguments)."""

    program: str = "math_cot"  # built-in name, "module:attr" or "file.py:attr"
    metric: str = "math"  # "math" (dspy_p2o.rewards.math_metric) or "module:attr"
    train: str = "math_train"  # "math_train", "aime", a local .jsonl/.parquet path or a hub dataset id
    train_limit: int | None = None
    val: str | None = None  # same forms as train; None = no validation set
    val_limit: int | None = None
    question_field: str | None = None  # auto-detected when None
    answer_field: str | None = None


@dataclass
class P2OConfig:
    """Every knob of a P^2O run. Defaults are the paper's GPU setting (DESIGN.md §3)."""

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
    epochs: int = 5
    batch_size: int = 128  # questions per phase-1 batch
    k: int = 6  # rollouts per question (GRPO group size)
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 12288  # completion budget per rollout
    prompt_phase: bool = True  # False = the GRPO baseline (same trainer, same rollout budget)
    plain_per_group: int = 0  # plain (un-templated) rollouts kept in each templated group
    tau: float = 1e-9  # a question is hard when its mean reward is below tau (default: no success)
    near_hard: bool = False  # the authors' code: exactly one success out of K is hard too
    hardness_on: str = "all"  # "all" rollouts of a group, or only its "plain" ones (falls back to all)
    shuffle: bool = True
    seed: int = 0

    # -- bookkeeping
    checkpoint_every: int = 1  # phase-1 batches between checkpoints (mid-epoch resume granularity)
    eval_every_epoch: bool = True  # validation accuracy (no templates) after every epoch
    eval_k: int = 1  # samples per validation question (pass@1 is their mean)
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: "tensorboard", "wandb"
    progress: bool = True

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    prompt: PromptPhaseConfig = field(default_factory=PromptPhaseConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        # The top-level knobs are the single source of truth for their nested copies (validated
        # here, and the same in config.yaml and in a resume's comparison with it).
        self.validate()
        if isinstance(self.trainer, TrainerConfig):
            self.trainer = dataclasses.replace(self.trainer, temperature=self.temperature, seed=self.seed)

    def validate(self) -> None:
        checks = [
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
        return _build(cls, data, "")

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
    if "." in key:
        return key.split(".")
    matches = [path for path in _field_paths(P2OConfig) if path[-1] == key]
    if not matches:
        raise ConfigError(f"unknown config key {key!r}")
    if [key] in matches:  # a top-level knob (k, seed, temperature) drives its nested copies
        return [key]
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


def _build(cls: type, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {where or 'top level'!r} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, sub, where + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config section {where or 'top level'!r}: {exc}") from exc


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Light type checking for YAML values: ints for floats, lists for tuples; clear errors."""
    text = str(hint)
    if value is None:
        if "None" in text or hint is Any:
            return None
        raise ConfigError(f"config key {key!r} must have a value ({_expected(hint)}), got null")
    if hint is float or text in ("float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is int or text in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if text.startswith("tuple") and isinstance(value, list):
        return tuple(value)
    return value


def _expected(hint: Any) -> str:
    """The form a value of this type takes, for error messages."""
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    if hint in names:
        return names[hint]
    text = str(hint)
    return "a list" if text.startswith(("list", "tuple")) else "a mapping" if text.startswith("dict") else text


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)
