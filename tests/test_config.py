"""The run configuration: a leaf module, one home per knob, strict values, errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dspy_p2o.config import MOVED, ConfigError, P2OConfig, PromptPhaseConfig, parse_overrides
from dspy_p2o.run_dir import config_changes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("modules, heavy", [
    (("dspy_p2o.config", "dspy_p2o.train_cli"), {"torch", "dspy", "gepa", "transformers"}),
    # the run directory finds checkpoints through the torch-free layout module, not the trainer
    (("dspy_p2o.run_dir", "dspy_p2o.checkpoints"), {"torch", "dspy", "transformers"}),
])
def test_config_module_and_train_help_import_no_torch_dspy_or_gepa(modules, heavy):
    code = (f"import sys, {', '.join(modules)}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(heavy)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_dotted_overrides_of_nested_knobs_are_honoured():
    cfg = P2OConfig.load(None, parse_overrides(["trainer.lr=2e-5", "trainer.template_ratio_bounds=[0.1, 5]",
                                                "prompt.min_hard=8", "prompt.budget=light", "data.train=x.jsonl",
                                                "temperature=0.7", "seed=3", "k=4"]))
    assert (cfg.trainer.lr, cfg.trainer.template_ratio_bounds) == (2e-5, (0.1, 5.0))
    assert (cfg.prompt.min_hard, cfg.prompt.budget, cfg.data.train) == (8, "light", "x.jsonl")
    assert (cfg.temperature, cfg.seed, cfg.k) == (0.7, 3, 4)
    again = P2OConfig.load(yaml.safe_load(cfg.to_yaml()))  # config.yaml round trip: nothing rewritten
    assert again == cfg


@pytest.mark.parametrize("key", sorted(MOVED))
def test_a_moved_key_names_its_new_home(key):
    section, _, name = key.rpartition(".")
    home = {"prompt_phase": "method", "engine_kwargs": "`local:`.*`vllm:`"}.get(key, f"top-level {name}")
    for source, overrides in ((None, {key: 1}), ({section: {name: 1}} if section else {name: 1}, None)):
        with pytest.raises(ConfigError, match=f"config key '{key}' has moved; use .*{home}"):
            P2OConfig.load(source, overrides)


@pytest.mark.parametrize("override, message", [
    ("trainer.lr=fast", "config key 'trainer.lr' must be a number, got 'fast'"),
    ("distill=1", "config key 'trainer.distill' must be true or false, got 1"),
    ("epochs=2.5", "config key 'epochs' must be an integer, got 2.5"),
    ("min_hard='8'", "config key 'prompt.min_hard' must be an integer, got '8'"),
    ("budget=1.5", "config key 'prompt.budget' must be a string or an integer, got 1.5"),
    ("trackers=[3]", "config key 'trackers' must be a string, got 3"),
    ("trainer.lr=-1", "invalid config section 'trainer': TrainerConfig.lr must be > 0, got -1.0"),
    ("method=ppo", "method must be one of p2o, grpo, got 'ppo'"),
    ("trainer.lrr=1", "unknown config key 'trainer.lrr'; did you mean 'trainer.lr'?"),
])
def test_a_bad_value_is_one_error_naming_its_key(override, message):
    with pytest.raises(ConfigError) as info:
        P2OConfig.load(None, parse_overrides([override]))
    assert str(info.value) == message


@pytest.mark.parametrize("overrides, message", [
    (["trainer.sharding=fsdp3"], "TrainerConfig.sharding must be one of ('none', 'fsdp2'), got 'fsdp3'"),
    (["trainer.sharding=fsdp2", "trainer.dtype=fp16"], "TrainerConfig.sharding fsdp2 trains in float32 or bfloat16"),
    (["trainer.sharding=fsdp2", "engine=vllm", "vllm.weight_sync=nccl"],
     "trainer.sharding fsdp2 syncs vLLM by reload (vllm.weight_sync: reload)"),
    (["trainer.sharding=fsdp2", "trainer.lora.r=8"], "a LoRA run (trainer.lora) keeps its small adapter state "
                                                      "replicated: set trainer.sharding to none"),
])
def test_sharding_combinations_that_cannot_work_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        P2OConfig.load(None, parse_overrides(overrides))
    assert P2OConfig.load(None, parse_overrides(["trainer.sharding=fsdp2", "engine=vllm"])).trainer.sharding == "fsdp2"


def test_a_section_that_is_not_a_mapping_is_named():
    with pytest.raises(ConfigError, match="config section 'trainer' must be a mapping, got int"):
        P2OConfig.load({"trainer": 3})


def test_benchmark_configs_load():
    for path in sorted((ROOT / "benchmarks" / "configs").glob("*.yaml")):
        P2OConfig.load(path)
    assert P2OConfig.load(ROOT / "benchmarks/configs/grpo_baseline.yaml").method == "grpo"


def test_an_older_run_dirs_config_compares_in_todays_keys():
    """Run dirs written before `method` and the single home of k / seed / temperature resume."""
    new = P2OConfig.load(None, {"method": "grpo"}).redacted()
    old = yaml.safe_load(P2OConfig().to_yaml())
    del old["method"]
    old["prompt_phase"] = False
    old["trainer"].update(temperature=0.6, seed=0)
    old["prompt"].update(k=6, seed=0)
    assert config_changes(old, new) == {}
    old["prompt_phase"] = True
    assert config_changes(old, new) == {"method": ("p2o", "grpo")}


def test_resume_rules_are_read_from_the_fields_declarations():
    """run_dir asks config.resume_rule: a field's own rule, else its section's; unknown keys are fixed."""
    from dspy_p2o.config import FIXED, IDENTITY, RESUMABLE, identity_keys, resume_rule

    assert set(identity_keys()) == {"policy", "k", "batch_size", "method", "seed", "temperature", "max_tokens",
                                    "plain_per_group", "hardness_on", "near_hard", "tau"}
    assert resume_rule("k") == IDENTITY and resume_rule("epochs") == RESUMABLE
    assert resume_rule("trainer.micro_batch_tokens") == RESUMABLE and resume_rule("trainer.lr") == FIXED
    assert resume_rule("data.train") == RESUMABLE and resume_rule("data.metric") == FIXED
    for key in ("vllm", "vllm.url", "vllm.reference", "local.max_batch_size"):  # the engine sections, as a whole
        assert resume_rule(key) == RESUMABLE, key
    assert resume_rule("no_such_key") == FIXED and resume_rule("trainer.no_such_key") == FIXED


def test_an_engine_section_change_is_accepted_on_resume_and_a_trainer_change_refused(tmp_path):
    from dspy_p2o.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    first = P2OConfig.load(None, {"engine": "vllm", "vllm.url": "http://127.0.0.1:8000"})
    identity = {"policy": "p", "trainset": "abc"}
    assert run.check(first, identity) is False
    run.start(first, identity, resuming=False)
    run.save_state({"epoch": 0})
    moved = P2OConfig.load(first, {"vllm.url": "http://127.0.0.1:9000", "vllm.max_concurrency": 8,
                                   "local.dtype": "bf16"})
    assert run.check(moved, identity) is True
    assert run._accepted == {"vllm.url": ("http://127.0.0.1:8000", "http://127.0.0.1:9000"),
                             "vllm.max_concurrency": (64, 8), "local.dtype": (None, "bf16")}
    with pytest.raises(ConfigError, match=r"incompatible run \(trainer.lr: 1e-06 -> 2e-06\)"):
        run.check(P2OConfig.load(moved, {"trainer.lr": 2e-6}), identity)


@pytest.mark.parametrize("override, message", [
    ("max_tokens=0", "max_tokens must be >= 1, got 0"),
    ("top_p=0", "top_p must be in (0, 1], got 0.0"),
    ("top_p=1.5", "top_p must be in (0, 1], got 1.5"),
    ("top_k=-1", "top_k must be >= 0, got -1"),
    ("tau=0", "tau must be in (0, 1], got 0.0"),
    ("eval_k=0", "eval_k must be >= 1, got 0"),
    ("reflection_max_tokens=0", "reflection_max_tokens must be >= 1, got 0"),
    ("temperature=.nan", "temperature must be > 0 (the trainer takes log-probs at the sampling temperature), got nan"),
    ("trainer.keep_last_checkpoints=-1",
     "invalid config section 'trainer': TrainerConfig.keep_last_checkpoints must be >= 0, got -1"),
    ("trainer.micro_batch_tokens=0",
     "invalid config section 'trainer': TrainerConfig.micro_batch_tokens must be >= 1, got 0"),
    ("trainer.mini_batch_size=0",
     "invalid config section 'trainer': TrainerConfig.mini_batch_size must be >= 1 or null, got 0"),
    ("trainer.lr=.nan", "invalid config section 'trainer': TrainerConfig.lr must be > 0, got nan"),
    ("prompt.dev_size=0", "invalid config section 'prompt': PromptPhaseConfig.dev_size must be >= 1, got 0"),
    ("prompt.solved_threshold=1.5",
     "invalid config section 'prompt': PromptPhaseConfig.solved_threshold must be in (0, 1], got 1.5"),
    ("data.train_limit=0", "invalid config section 'data': DataConfig.train_limit must be >= 1 or null, got 0"),
    ("local.max_batch_size=0", "invalid config section 'local': LocalOptions.max_batch_size must be >= 1, got 0"),
    ("vllm.gpu_memory_utilization=1.2",
     "invalid config section 'vllm': VLLMOptions.gpu_memory_utilization must be in (0, 1], got 1.2"),
    ("vllm.reference={port: 0}",
     "invalid config section 'vllm.reference': VLLMOptions.port must be in [1, 65535] or null, got 0"),
])
def test_numeric_ranges_are_checked_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError) as info:
        P2OConfig.load(None, parse_overrides([override]))
    assert str(info.value) == message


# Numeric fields whose check is not a plain range: cross-field (validate()) or any value meaningful.
OWN_CHECKS = {"P2OConfig.k", "P2OConfig.temperature", "P2OConfig.plain_per_group",
              "TrainerConfig.max_grad_norm", "TrainerConfig.template_ratio_bounds", "PromptPhaseConfig.budget"}


def test_every_numeric_knob_declares_its_range():
    import dataclasses
    import typing

    from dspy_p2o.config import ENGINE_OPTIONS, DataConfig, PromptPhaseConfig, TrainerConfig

    unchecked = []
    for cls in (P2OConfig, TrainerConfig, PromptPhaseConfig, DataConfig, *ENGINE_OPTIONS.values()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            name = f"{cls.__name__}.{f.name}"
            if kinds & {int, float} and f.metadata.get("check") is None and name not in OWN_CHECKS:
                unchecked.append(name)
    assert unchecked == []


@pytest.mark.parametrize("source, overrides, message", [
    (None, ["lrr=1e-5"], "unknown config key 'lrr'; did you mean 'lr'?"),
    (None, ["epochz=2"], "unknown config key 'epochz'; did you mean 'epochs'?"),
    (None, ["dtyp=bf16"], "unknown config key 'dtyp'; did you mean 'trainer.dtype' or 'local.dtype' or 'vllm.dtype'?"),
    (None, ["vllm.reference.urll=x"], "unknown config key 'vllm.reference.urll'; did you mean 'vllm.reference.url'?"),
    (None, ["trainer.zzzz=1"], "unknown config key 'trainer.zzzz'"),  # nothing close: no guess
    ({"trainr": {"lr": 1e-5}}, [], "unknown config key 'trainr'; did you mean 'trainer'?"),
    ({"trainer": {"lrr": 1, "betta": 2}}, [],
     "unknown config keys 'trainer.lrr' (did you mean 'trainer.lr'?), 'trainer.betta' (did you mean 'trainer.beta'?)"),
])
def test_an_unknown_key_suggests_the_closest_field(source, overrides, message):
    with pytest.raises(ConfigError) as info:
        P2OConfig.load(source, parse_overrides(overrides))
    assert str(info.value) == message


def test_an_unknown_key_in_a_yaml_file_suggests_the_closest_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1\ntrainer:\n  lrr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'trainer.lrr'; did you mean 'trainer.lr'\?$"):
        P2OConfig.load(path)


def test_the_rewards_section_holds_the_metric_time_limit_and_the_verifier_settings_with_their_ranges():
    from dspy_p2o.config import RESUMABLE, resume_rule

    cfg = P2OConfig.load(None, {"metric_timeout_s": None, "rewards.verify_workers": 2})
    assert (cfg.rewards.metric_timeout_s, cfg.rewards.verify_workers, cfg.rewards.verify_memory_mb) == (None, 2, 4096)
    assert P2OConfig().rewards.metric_timeout_s == 60.0
    for override, message in ({"metric_timeout_s": 0}, "metric_timeout_s must be > 0 or null"), \
                             ({"verify_workers": 0}, "verify_workers must be >= 1 or null"), \
                             ({"verify_memory_mb": -1}, "verify_memory_mb must be >= 0"):
        with pytest.raises(ConfigError, match=message):
            P2OConfig.load(None, override)
    assert resume_rule("rewards.metric_timeout_s") == resume_rule("rewards.verify_workers") == RESUMABLE


@pytest.mark.parametrize("override, message", [
    ("prompt.optimizer=dspy", "invalid config section 'prompt': PromptPhaseConfig.optimizer must be one of gepa, "
                              "fewshot, gepa+fewshot, got 'dspy'"),
    ("fewshot_source=gold", "invalid config section 'prompt': PromptPhaseConfig.fewshot_source must be one of "
                            "labeled, bootstrapped, both, got 'gold'"),
    ("max_cost_usd=-0.5", "invalid config section 'prompt': PromptPhaseConfig.max_cost_usd must be >= 0 or null, "
                          "got -0.5"),
    ("fewshot_k=0", "invalid config section 'prompt': PromptPhaseConfig.fewshot_k must be >= 1, got 0"),
])
def test_the_prompt_optimizer_its_demo_source_and_cost_cap_are_checked(override, message):
    with pytest.raises(ConfigError) as info:
        P2OConfig.load(None, parse_overrides([override]))
    assert str(info.value) == message
    cfg = P2OConfig.load(None, parse_overrides(["optimizer=gepa+fewshot", "max_cost_usd=2.5"]))
    assert (cfg.prompt.optimizer, cfg.prompt.max_cost_usd, PromptPhaseConfig().optimizer) == ("gepa+fewshot", 2.5, "gepa")
