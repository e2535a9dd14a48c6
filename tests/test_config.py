"""The run configuration: a leaf module, one home per knob, strict values, errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dspy_p2o.config import MOVED, ConfigError, P2OConfig, parse_overrides
from dspy_p2o.run_dir import config_changes

ROOT = Path(__file__).resolve().parents[1]


def test_config_module_and_train_help_import_no_torch_dspy_or_gepa():
    code = ("import sys, dspy_p2o.config, dspy_p2o.train_cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'dspy', 'gepa', 'transformers'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_run_dir_and_checkpoint_layout_import_no_torch():
    """The run directory finds checkpoints through the torch-free layout module, not the trainer."""
    code = ("import sys, dspy_p2o.run_dir, dspy_p2o.checkpoints; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'dspy', 'transformers'}))")
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
    ("trainer.lrr=1", "unknown config key(s) trainer.lrr"),
])
def test_a_bad_value_is_one_error_naming_its_key(override, message):
    with pytest.raises(ConfigError) as info:
        P2OConfig.load(None, parse_overrides([override]))
    assert str(info.value) == message


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
    moved = P2OConfig.load(first, {"vllm.url": "http://127.0.0.1:9000", "vllm.max_concurrency": 8, "local.dtype": "bf16"})
    assert run.check(moved, identity) is True
    assert run._accepted == {"vllm.url": ("http://127.0.0.1:8000", "http://127.0.0.1:9000"),
                             "vllm.max_concurrency": (64, 8), "local.dtype": (None, "bf16")}
    with pytest.raises(ConfigError, match=r"incompatible run \(trainer.lr: 1e-06 -> 2e-06\)"):
        run.check(P2OConfig.load(moved, {"trainer.lr": 2e-6}), identity)
