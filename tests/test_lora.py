"""LoRA runs (trainer.lora): config, adapter-only training, pi_init as the adapter-disabled base,
adapter checkpoints, merging, the local engine, and a whole compile. The vLLM side (adapter-only
sync against a real server) is in test_vllm_real.py, the 2-process step in test_multiprocess.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dspy
import pytest
import torch
import yaml

import dspy_p2o
from dspy_p2o import lora
from dspy_p2o.config import ConfigError, LoraConfig, P2OConfig, parse_overrides
from dspy_p2o.trainer import GRPOTrainer, TrainerConfig
from dspy_p2o.trainer.logprobs import sequence_logprobs
from ddp_step import global_batch
from loop_fixtures import kill_in_epoch_two, sum_examples, tiny_overrides, write_jsonl, write_train_config
from trainer_fixtures import trainer_model_dir  # noqa: F401

HERE = Path(__file__).parent
ROOT = HERE.parent
LORA = LoraConfig(r=4, alpha=8.0)


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _rows():
    rollouts = [r for group in global_batch() for r in group]
    return [c.prompt_ids for r in rollouts for c in r.calls], [c.completion_ids for r in rollouts for c in r.calls]


def _logprobs(model, prompts, completions):
    with torch.no_grad():
        return torch.cat(sequence_logprobs(model, prompts, completions, pad_id=0, max_tokens=4096))


def _trained(model_dir, steps=2, **config) -> GRPOTrainer:
    """A LoRA trainer after `steps` GRPO steps at a large lr: its adapter is far from zero."""
    trainer = GRPOTrainer(model_dir, config=TrainerConfig(lr=1e-2, lora=config.pop("lora", LORA), **config))
    for _ in range(steps):
        trainer.train_on([r for group in global_batch() for r in group])
    return trainer


# ---------------------------------------------------------------------- config
def test_the_lora_block_reaches_the_config_from_yaml_overrides_compile_and_p2o(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, v_proj]}\n")
    assert P2OConfig.load(path).trainer.lora == LoraConfig(r=16, alpha=32.0, dropout=0.05,
                                                            target_modules=["q_proj", "v_proj"])
    assert P2OConfig().trainer.lora is None  # full fine-tuning by default
    # dotted overrides into the unset section, whole or key by key
    assert P2OConfig.load(None, parse_overrides(["trainer.lora={r: 8}"])).trainer.lora == LoraConfig(r=8)
    assert P2OConfig.load(None, parse_overrides(["trainer.lora.r=8", "trainer.lora.alpha=4"])).trainer.lora == \
        LoraConfig(r=8, alpha=4.0)
    assert P2OConfig.load(path, parse_overrides(["trainer.lora=null"])).trainer.lora is None
    # compile(..., lora=...) and P2O(..., lora=...): a bare `lora` is trainer.lora
    seen = []

    class Loop:
        def __init__(self, program, trainset, *, config, **kwargs):
            seen.append(config)

        def run_loop(self):
            return dspy_p2o.CompileResult(program=None, checkpoint=Path("."), history=[], templates={},
                                          run_dir=Path("."))

    monkeypatch.setattr("dspy_p2o.api.P2OLoop", Loop)
    dspy_p2o.compile(None, [], metric=None, policy="p", lora={"r": 4, "target_modules": "all-linear"})
    dspy_p2o.P2O(metric=None, policy="p", lora={"r": 2}).compile(None, trainset=[])
    assert [c.trainer.lora for c in seen] == [LoraConfig(r=4), LoraConfig(r=2)]


@pytest.mark.parametrize("override, message", [
    ("trainer.lora.r=0", "invalid config section 'trainer.lora': LoraConfig.r must be in [1, 512], got 0"),
    ("trainer.lora.alpha=0", "invalid config section 'trainer.lora': LoraConfig.alpha must be > 0, got 0.0"),
    ("trainer.lora.target_modules=linear",
     "invalid config section 'trainer.lora': LoraConfig.target_modules must be 'all-linear' or a list of module "
     "names, got 'linear'"),
    ("trainer.lora.target_modules=[]",
     "invalid config section 'trainer.lora': LoraConfig.target_modules must name at least one module, got []"),
    ("trainer.lora.alhpa=8", "unknown config key 'trainer.lora.alhpa'; did you mean 'trainer.lora.alpha'?"),
    ("trainer.lora=8", "config section 'trainer.lora' must be a mapping, got int"),
])
def test_a_bad_lora_value_is_one_error_naming_its_key(override, message):
    with pytest.raises(ConfigError) as info:
        P2OConfig.load(None, parse_overrides([override]))
    assert str(info.value) == message


def test_a_resume_with_another_lora_config_is_refused_by_name(tmp_path):
    from dspy_p2o.config import IDENTITY, resume_rule
    from dspy_p2o.run_dir import RunDir

    assert resume_rule("trainer.lora") == IDENTITY and resume_rule("trainer.lora.r") == IDENTITY
    run = RunDir(tmp_path / "run")
    first = P2OConfig.load(None, {"trainer.lora": {"r": 8}})
    identity = {"policy": "p", "trainset": "abc"}
    run.check(first, identity)
    run.start(first, identity, resuming=False)
    run.save_state({"epoch": 0})
    assert run.check(P2OConfig.load(first), identity) is True
    with pytest.raises(ConfigError, match=r"incompatible run \(trainer.lora: \{'r': 8, .*\} -> \{'r': 16, "):
        run.check(P2OConfig.load(first, {"trainer.lora.r": 16}), identity)
    with pytest.raises(ConfigError, match=r"incompatible run \(trainer.lora: \{'r': 8, .*\} -> None\)"):
        run.check(P2OConfig.load(first, {"trainer.lora": None}), identity)


def test_a_managed_vllm_server_of_a_lora_run_loads_adapters_at_run_time():
    from dspy_p2o.config import VLLMServerOptions
    from dspy_p2o.engines.vllm_server import lora_rank_bound, serve_arguments

    args = serve_arguments("m", VLLMServerOptions(max_lora_rank=12), port=1, served_model_name="policy")
    assert args[args.index("--enable-lora"):][:3] == ["--enable-lora", "--max-lora-rank", "16"]  # vLLM's next rank
    assert "--enable-lora" not in serve_arguments("m", VLLMServerOptions(), port=1, served_model_name="policy")
    assert [lora_rank_bound(r) for r in (1, 2, 8, 9, 320, 512)] == [1, 8, 8, 16, 320, 512]
    # the reference server never inherits it
    assert P2OConfig.load(None, {"vllm.max_lora_rank": 8}).vllm.reference_options().max_lora_rank is None


# ---------------------------------------------------------------------- training
def test_only_the_adapter_trains_and_holds_optimiser_state(trainer_model_dir):
    base = _base(trainer_model_dir).state_dict()
    trainer = _trained(trainer_model_dir, steps=1)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trainable)
    assert len(trainer.optimizer.state) == len(trainable)  # AdamW moments for the adapter only
    after = trainer.model.get_base_model().state_dict()
    for key, value in base.items():  # the base weights did not move
        assert torch.equal(after[key.replace("_proj.weight", "_proj.base_layer.weight")], value), key
    assert any(p.abs().max() > 0 for n, p in trainer.model.named_parameters() if ".lora_B." in n)


def test_kl_reference_is_the_base_model_with_the_adapter_disabled(trainer_model_dir):
    trainer = _trained(trainer_model_dir, steps=2, beta=0.1)
    assert trainer.ref_model is None  # no second copy of the weights
    prompts, completions = _rows()
    reference = torch.cat(trainer._reference_logprobs(prompts, completions, None))
    separately_loaded = _logprobs(_base(trainer_model_dir), prompts, completions)
    torch.testing.assert_close(reference, separately_loaded, atol=1e-5, rtol=0)
    adapted = _logprobs(trainer.model, prompts, completions)  # the adapter is back on afterwards
    assert (adapted - separately_loaded).abs().max() > 1e-3
    metrics = trainer.train_on([r for group in global_batch() for r in group])
    assert metrics["kl"] > 0


def test_a_lora_checkpoint_holds_the_adapter_and_restores_it(trainer_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    trainer = _trained(trainer_model_dir, steps=2)
    checkpoint = trainer.save_checkpoint(tmp_path / "checkpoints")
    model_dir = checkpoint / "model"
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "adapter_model.safetensors").is_file()
    assert not (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").is_file()
    with safe_open(str(model_dir / "adapter_model.safetensors"), "pt") as handle:  # the adapter, nothing else
        assert len(list(handle.keys())) == len(lora.trainable_names(trainer.model))
    assert not (checkpoint / "state" / "model.safetensors").exists()  # the weights are stored once
    assert (checkpoint / "state" / "optimizer").is_dir()  # AdamW's state of the adapter
    from dspy_p2o.checkpoints import size_bytes

    expected = trainer.checkpoint_bytes()  # what the run announces: the adapter and its two moments
    assert expected["optimizer"] == 2 * expected["weights"]
    adapter_bytes = (model_dir / "adapter_model.safetensors").stat().st_size
    assert expected["weights"] < adapter_bytes < expected["weights"] + 20_000  # + the safetensors header
    assert sum(expected.values()) < size_bytes(checkpoint)
    # peft loads the checkpoint onto the base model: the trainer's adapted model
    prompts, completions = _rows()
    loaded = PeftModel.from_pretrained(_base(trainer_model_dir), str(model_dir)).eval()
    torch.testing.assert_close(_logprobs(loaded, prompts, completions), _logprobs(trainer.model, prompts, completions),
                               atol=1e-6, rtol=0)
    # a fresh trainer resumes the adapter and its optimiser state
    fresh = GRPOTrainer(trainer_model_dir, config=trainer.config)
    fresh.load_checkpoint(checkpoint)
    assert fresh.global_step == 2
    mine, theirs = trainer.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    for a, b in zip(trainer.optimizer.state.values(), fresh.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    # a full fine-tuning checkpoint is no checkpoint of an adapter
    full = GRPOTrainer(trainer_model_dir, config=TrainerConfig()).save_checkpoint(tmp_path / "full")
    with pytest.raises(ValueError, match="is not a checkpoint of this LoRA adapter"):
        GRPOTrainer(trainer_model_dir, config=trainer.config).load_checkpoint(full)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "lm_head"]])
def test_the_merge_command_writes_a_model_equal_to_the_adapted_one(trainer_model_dir, tmp_path, capsys, targets):
    """`dspy-p2o merge`: base + adapter as one plain model (tied output head targeted too, where
    peft's own merge_and_unload adds the head's update to the shared matrix twice)."""
    from transformers import AutoModelForCausalLM

    from dspy_p2o.cli import main
    from dspy_p2o.engines.hf import check_model_path

    trainer = _trained(trainer_model_dir, steps=2, lora=LoraConfig(r=4, alpha=8.0, target_modules=targets))
    adapter = trainer.save_checkpoint(tmp_path / "checkpoints") / "model"
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompts, completions = _rows()
    trainer.model.eval()
    torch.testing.assert_close(_logprobs(merged, prompts, completions), _logprobs(trainer.model, prompts, completions),
                               atol=1e-5, rtol=0)
    # a checkpoint or a run directory (its latest checkpoint) names the same adapter
    run_like = tmp_path  # holds checkpoints/
    for named in (adapter.parent, run_like):
        again = tmp_path / f"merged-from-{named.name}"
        assert main(["merge", "--adapter", str(named), "--out", str(again)]) == 0
        assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # errors: one line each, exit 2
    not_adapter = ["--adapter", str(trainer_model_dir), "--out", str(tmp_path / "x")]
    for argv, message in ((not_adapter, "is not a LoRA adapter"),
                          (["--adapter", str(adapter), "--out", str(out)], "is not empty"),
                          (["--adapter", str(adapter), "--out", str(tmp_path / "y"), "--base", str(tmp_path / "no")],
                           "does not exist")):
        capsys.readouterr()
        assert main(["merge", *argv]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith("dspy-p2o merge: error: ") and message in err, err
    # the adapter directory is no model directory: said, with the command that makes one
    with pytest.raises(FileNotFoundError, match="is a LoRA adapter, not a model directory; .*dspy-p2o merge"):
        check_model_path(str(adapter))


def test_merged_weights_leave_the_live_module_as_it_was(trainer_model_dir):
    from dspy_p2o.lora import merged_state_dict, vllm_unservable

    head = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "lm_head"])
    trainer = _trained(trainer_model_dir, steps=1, lora=head)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state = merged_state_dict(trainer.model)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert vllm_unservable(trainer.model) == "an adapter on embed_tokens, lm_head"  # tied: both carry it
    plain = _base(trainer_model_dir)
    plain.load_state_dict(state)
    prompts, completions = _rows()
    trainer.model.eval()
    torch.testing.assert_close(_logprobs(plain, prompts, completions), _logprobs(trainer.model, prompts, completions),
                               atol=1e-5, rtol=0)
    assert vllm_unservable(_trained(trainer_model_dir, steps=0).model) is None  # all-linear: vLLM serves it


# ---------------------------------------------------------------------- engines
def test_the_local_engine_samples_the_adapted_module_and_its_base_without_the_adapter(trainer_model_dir):
    from dspy_p2o.engines.base import SamplingParams
    from dspy_p2o.engines.local import LocalEngine, process_logits

    trainer = _trained(trainer_model_dir, steps=2)
    engine = LocalEngine(trainer.model, trainer.tokenizer)
    base_engine = engine.without_adapter()
    assert base_engine.model is engine.model and base_engine._lock is engine._lock  # no copy; one lock
    prompt = engine.chat_prompt_ids([{"role": "user", "content": "What is 2 + 3?"}])
    params = SamplingParams(temperature=1.0, max_tokens=8)
    base = _base(trainer_model_dir)
    for eng, reference in ((base_engine, base), (engine, trainer.model)):
        out = eng.generate([prompt], n=2, temperature=1.0, max_tokens=8, seed=3)[0]
        for c in out.completions:
            with torch.no_grad():
                logits = reference(input_ids=torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
            expected = process_logits(logits, params).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)
    assert engine.sync_weights(trainer.model).seconds == 0.0  # the trainer's own module: a free sync
    with pytest.raises(TypeError, match="not a peft"):
        LocalEngine(base, trainer.tokenizer).without_adapter()


# ---------------------------------------------------------------------- the loop
def test_self_reflection_in_a_lora_run_is_the_policy_module_with_its_adapter_disabled(tmp_path, format_model_dir,
                                                                                      monkeypatch):
    from dspy_p2o.loop import P2OLoop
    from dspy_p2o.rewards import math_metric

    def no_second_engine(*args, **kwargs):
        raise AssertionError("a LoRA run loaded a second pi_init engine")

    monkeypatch.setattr("dspy_p2o.resources.make_reference_engine", no_second_engine)
    cfg = P2OConfig.load(None, {"policy": str(format_model_dir), **tiny_overrides(), "trainer.lora": {"r": 4}})
    loop = P2OLoop(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"), metric=math_metric,
                   policy=format_model_dir, config=cfg, run_dir=tmp_path / "run")
    try:
        loop._build()
        reference = loop.resources._initial_policy_engine()
        assert reference.model is loop.trainer.model is loop.engine.model and reference._adapter_disabled
    finally:
        loop.release()


def test_lora_compile_runs_both_phases_and_serves_the_adapter(tmp_path):
    """The prompt-phase world (test_loop.py) with an adapter and the KL term: GEPA finds the helpful
    templates, epoch 2 trains on them, the checkpoint is the adapter and the program serves it."""
    import prompt_phase_fixtures as world
    from peft import PeftModel

    base_dir = tmp_path / "policy"
    engine = world.build_policy(tmp_path / "base")
    engine.model.save_pretrained(base_dir)
    engine.tokenizer.save_pretrained(base_dir)
    run_dir = tmp_path / "run"
    reflection, script = world.scripted_reflection_lm()
    trainset = world.hard_examples()
    result = dspy_p2o.compile(world.make_program(), trainset, metric=world.metric, policy=base_dir,
                              reflection=reflection, valset=trainset[:4], run_dir=run_dir, lora={"r": 8, "alpha": 16},
                              **tiny_overrides(batch_size=6, min_hard=4, dev_size=4, budget=60, plain_per_group=1,
                                               temperature=0.5, max_tokens=12, beta=0.05))
    assert [h["epoch"] for h in result.history] == [1, 2]
    record = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert record["ran"] and script.requests and record["assignments"]
    assert result.history[1]["templated/pass@1"] > result.history[1].get("plain/pass@1", 0.0)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("train/steps", 0) for m in metrics) >= 2 and any(m.get("train/kl", 0) > 0 for m in metrics)
    assert (result.checkpoint / "adapter_config.json").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["lora"]["r"] == 8
    adapted = PeftModel.from_pretrained(_base(base_dir), str(result.checkpoint))
    assert any(p.abs().max() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)  # it trained
    served = result.engine.model  # the returned program answers with the adapted module
    assert served.peft_config["default"].r == 8 and not served._adapters_disabled
    assert result.program(question=world.question(3)).answer is not None


@pytest.mark.slow  # a killed run, its resume and a fresh run of the CLI: ~2 min on 2 cores
def test_a_lora_run_killed_in_epoch_two_resumes_to_the_same_step_count(tmp_path, format_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, sum_examples(8, 0, "train"))
    config = tmp_path / "tiny.yaml"
    write_train_config(config, format_model_dir, data, "loop_fixtures:slow_closeness_metric", epochs=2, batch_size=4,
                       method="grpo")
    lora = "trainer.lora={r: 4, alpha: 8}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}

    def train(run_dir, *extra):
        return [sys.executable, "-m", "dspy_p2o.cli", "train", "--config", str(config), "--run-dir", str(run_dir),
                *extra]

    run_dir = tmp_path / "killed"
    kill_in_epoch_two(train(run_dir, lora), run_dir, env=env, timeout_s=240)
    refused = subprocess.run(train(run_dir, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "trainer.lora" in refused.stderr  # the adapter is the run's identity
    resumed = subprocess.run(train(run_dir, "--resume", "--quiet", lora), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "a LoRA adapter" in resumed.stdout and "dspy-p2o merge" in resumed.stdout
    fresh_dir = tmp_path / "fresh"
    fresh = subprocess.run(train(fresh_dir, lora), env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def final(run):
        state = json.loads((run / "state.json").read_text())
        checkpoint = Path(state["checkpoint"])
        assert (checkpoint / "model" / "adapter_config.json").is_file()
        return state["done"], json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]

    done_resumed, steps_resumed = final(run_dir)
    done_fresh, steps_fresh = final(fresh_dir)
    assert done_resumed and done_fresh and steps_resumed == steps_fresh > 0


def test_under_bf16_compute_the_frozen_base_is_bf16_and_the_adapter_fp32(trainer_model_dir):
    """No fp32 master copy of weights that never change: half the base's memory on GPU (here: CPU bf16 autocast)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # one mixed precision per process: this test's differs from the others'
    try:
        trainer = _trained(trainer_model_dir, steps=1, dtype="bf16")
    finally:
        AcceleratorState._reset_state()
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.bfloat16}
    assert any(p.abs().max() > 0 for n, p in params.items() if ".lora_B." in n)
