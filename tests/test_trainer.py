import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dspy_p2o.rollouts import Rollout
from dspy_p2o.trainer import GRPOTrainer, TrainerConfig, latest_checkpoint
from dspy_p2o.trainer.logprobs import sequence_logprobs

from trainer_fixtures import random_ids, templated_group, trainer_model_dir  # noqa: F401

HERE = Path(__file__).parent


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return random_ids(12, g), random_ids(16, g), random_ids(6, g), random_ids(6, g)


def _logp(trainer, prompt, completion) -> float:
    lp = sequence_logprobs(trainer.model, [prompt], [completion], pad_id=trainer.pad_id, max_tokens=4096)
    return lp[0].sum().item()


class _InputSpy:
    """Records the token rows (padding stripped) of every forward that builds a graph."""

    def __init__(self, model):
        self.grad_rows, self.nograd_rows = [], []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        (self.grad_rows if torch.is_grad_enabled() else self.nograd_rows).extend(rows)


@pytest.mark.parametrize("distill", [True, False])
def test_gradient_is_taken_on_the_right_prompt(trainer_model_dir, distill):
    x, x_tilde, good, bad = _prompts()
    rollouts = templated_group("q", x, x_tilde, [good, bad], [1.0, 0.0])
    trainer = GRPOTrainer(trainer_model_dir, config=TrainerConfig(distill=distill))
    spy = _InputSpy(trainer.model)
    trainer.train_on(rollouts)
    grad_prompt = x if distill else x_tilde
    assert sorted(spy.grad_rows) == sorted([grad_prompt + good, grad_prompt + bad])
    if distill:  # the template ratio needs log pi(y | x~) before the update, without a graph
        assert x_tilde + good in spy.nograd_rows and x + good in spy.nograd_rows
    else:
        assert all(row[:len(x)] != x for row in spy.nograd_rows)


def test_gradient_prompt_is_x_when_distilled_else_the_sampled_prompt():
    from dspy_p2o.trainer.grpo import gradient_prompt

    x, x_tilde = [11, 12], [13, 14, 15]
    (templated,) = (r.calls[0] for r in templated_group("q", x, x_tilde, [[16]], [1.0]))
    (plain,) = (r.calls[0] for r in templated_group("q", x, x_tilde, [[16]], [1.0], template=None))
    assert gradient_prompt(templated, distill=True) == x
    assert gradient_prompt(templated, distill=False) == x_tilde  # the no-distillation ablation
    assert gradient_prompt(plain, distill=True) == gradient_prompt(plain, distill=False) == x


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("template_ratio", ["off", "mask"])  # "off": on-policy, the gradient pass takes pi_old
def test_sequences_are_built_once_and_never_changed(trainer_model_dir, monkeypatch, template_ratio):
    import copy
    import dataclasses

    built = []
    prepare = GRPOTrainer._prepare

    def spy(self, *args, **kwargs):
        seqs, tilde = prepare(self, *args, **kwargs)
        built.append((seqs, copy.deepcopy(seqs)))
        return seqs, tilde

    monkeypatch.setattr(GRPOTrainer, "_prepare", spy)
    trainer = GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-3, template_ratio=template_ratio))
    metrics = trainer.train_on(_batch())
    ((seqs, before),) = built
    assert (seqs.old is None) == (template_ratio == "off")
    for field in dataclasses.fields(seqs):
        assert _same(getattr(seqs, field.name), getattr(before, field.name)), field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        seqs.old = None
    # the old log-probs of the gradient pass still reach the engine comparison and the ratio metrics
    assert "logprob_diff_plain_abs_mean" in metrics and "template_log_ratio_mean" in metrics


@pytest.mark.parametrize("distill", [True, False])
def test_positive_advantage_raises_logprob_on_the_gradient_prompt(trainer_model_dir, distill):
    x, x_tilde, good, bad = _prompts()
    rollouts = templated_group("q", x, x_tilde, [good, good, bad, bad], [1.0, 1.0, 0.0, 0.0])
    trainer = GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-3, distill=distill))
    before = {"x": _logp(trainer, x, good), "x~": _logp(trainer, x_tilde, good)}
    for _ in range(5):
        metrics = trainer.train_on(rollouts)
    after = {"x": _logp(trainer, x, good), "x~": _logp(trainer, x_tilde, good)}
    gain = {k: after[k] - before[k] for k in before}
    trained, other = ("x", "x~") if distill else ("x~", "x")
    assert gain[trained] > 1.0, gain
    assert gain[trained] > gain[other], gain
    assert trainer.global_step == 5 and metrics["steps"] == 1
    assert ("template_masked_frac" in metrics) == distill


def test_zero_std_groups_are_skipped(trainer_model_dir):
    x, x_tilde, good, bad = _prompts()
    flat = templated_group("flat", x, x_tilde, [good, bad], [1.0, 1.0], template=None)
    trainer = GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-3))
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_on(flat)
    assert metrics["zero_std_group_frac"] == 1.0 and metrics["steps"] == 0 and trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    live = templated_group("live", x, x_tilde, [good, bad], [1.0, 0.0], template=None)
    metrics = trainer.train_on(flat + live)
    assert metrics["zero_std_group_frac"] == 0.5 and trainer.global_step == 1


def _batch(n_groups=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for q in range(n_groups):
        x, x_tilde = random_ids(8 + 3 * q, g), random_ids(11 + q, g)
        completions = [random_ids(2 + (q + k) % 5, g) for k in range(4)]
        rollouts += templated_group(f"q{q}", x, x_tilde, completions[:2], [1.0, 0.0])
        rollouts += templated_group(f"q{q}", x, x_tilde, completions[2:], [1.0, 0.0], template=None)
    return rollouts


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_micro_batching_does_not_change_the_gradient(trainer_model_dir, agg):
    rollouts = _batch()
    grads = []
    for tokens in (10_000, 24):  # one micro-batch vs one sequence per micro-batch
        config = TrainerConfig(lr=1e-3, loss_agg=agg, micro_batch_tokens=tokens, max_grad_norm=0)
        trainer = GRPOTrainer(trainer_model_dir, config=config)
        seen = []
        step = trainer.optimizer.step
        trainer.optimizer.step = lambda *a, **k: (seen.append([p.grad.clone() for p in trainer.model.parameters()]),
                                                  step(*a, **k))[1]
        trainer.train_on(rollouts)
        grads.append(seen[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_mini_batches_step_and_sync_a_separate_engine(trainer_model_dir):
    from dspy_p2o.engines import LocalEngine

    engine = LocalEngine(trainer_model_dir)
    config = TrainerConfig(lr=1e-3, mini_batch_size=2)
    trainer = GRPOTrainer(trainer_model_dir, config=config)
    name, param = next(iter(trainer.model.named_parameters()))
    metrics = trainer.train_on(_batch(n_groups=3))  # no after_step: the engine is not synced (sync="epoch")
    assert trainer.global_step == 2 and metrics["steps"] == 2  # 3 questions, 2 per step
    served = dict(engine.model.named_parameters())[name]
    assert not torch.equal(served, param)  # sync="epoch": not yet
    engine.sync_weights(trainer.model)
    assert torch.equal(served, param)
    synced = []  # sync="step": after every optimiser step
    trainer.train_on(_batch(n_groups=3), after_step=lambda: synced.append(engine.sync_weights(trainer.model)))
    assert len(synced) == 2 and torch.equal(served, param)


def test_updates_per_batch_reuses_the_rollouts_off_policy(trainer_model_dir):
    """A second pass over the same rollouts is off-policy: its PPO ratio departs from 1 and clips."""
    config = TrainerConfig(lr=5e-2, mini_batch_size=3, updates_per_batch=3, template_ratio="off", max_grad_norm=0)
    trainer = GRPOTrainer(trainer_model_dir, config=config)
    metrics = trainer.train_on(_batch(n_groups=3))
    assert trainer.global_step == 3 and metrics["steps"] == 3
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0  # later passes see a moved policy
    with pytest.raises(ValueError, match="updates_per_batch"):
        TrainerConfig(updates_per_batch=0)


def test_shared_module_engine_sees_updates_and_metrics_are_reported(trainer_model_dir):
    from dspy_p2o.engines import LocalEngine

    trainer = GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-3, tis_cap=2.0, beta=0.05,
                                                                 template_ratio_bounds=(0.999, 1.001)))
    engine = LocalEngine(trainer.model, trainer.tokenizer)
    metrics = trainer.train_on(_batch(), after_step=lambda: engine.sync_weights(trainer.model))
    for key in ("reward_mean", "zero_std_group_frac", "completion_len_mean", "clip_frac_low", "clip_frac_high",
                "template_log_ratio_mean", "template_masked_frac", "logprob_diff_plain_abs_mean", "grad_norm", "lr",
                "tokens_per_s", "time_train", "kl"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["template_masked_frac"] > 0.5  # bounds this tight mask most distilled tokens
    out = engine.generate([[11, 12, 13]], n=2, max_tokens=3, seed=0)  # sampling restores training mode
    assert len(out[0].completions) == 2 and trainer.model.training


def test_bad_rollouts_are_named(trainer_model_dir):
    trainer = GRPOTrainer(trainer_model_dir, config=TrainerConfig())
    bad = Rollout.of_call("q7", [1, 2], [1, 2], [5, 6], [-1.0], 1.0)
    with pytest.raises(ValueError, match=r"example 'q7'.*1 behaviour log-probs for 2"):
        trainer.train_on([bad])
    with pytest.raises(ValueError, match="loss_agg"):
        TrainerConfig(loss_agg="sum")
    with pytest.raises(ValueError, match="total_steps"):
        GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr_schedule="cosine"))


def test_warmup_and_cosine_schedule(trainer_model_dir):
    config = TrainerConfig(lr=1.0, warmup_ratio=0.2, lr_schedule="cosine")
    trainer = GRPOTrainer(trainer_model_dir, config=config, total_steps=10)
    factors = [trainer.scheduler.lr_lambdas[0](s) for s in range(11)]
    assert factors[:2] == [0.5, 1.0]  # ceil(0.2 * 10) = 2 warm-up steps
    assert factors[6] == pytest.approx(0.5) and factors[10] == pytest.approx(0.0)


@pytest.mark.parametrize("schedule, total, expected", [
    ("constant", 5, [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", 5, [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
    ("linear", 1, [1.0]),  # the warm-up is the whole run: its one step still trains at the full lr
])
def test_lr_schedule_warms_up_from_its_first_step(schedule, total, expected):
    from dspy_p2o.trainer.grpo import make_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, schedule, warmup_ratio=0.4, total_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(expected)


def test_checkpoints_keep_the_last_n_and_restore(trainer_model_dir, tmp_path):
    config = TrainerConfig(lr=1e-3, keep_last_checkpoints=2)
    trainer = GRPOTrainer(trainer_model_dir, config=config)
    for step in range(3):
        trainer.train_on(_batch())
        trainer.save_checkpoint(tmp_path, {"epoch": step})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-00000002", "checkpoint-00000003"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000003"
    fresh = GRPOTrainer(trainer_model_dir, config=config)
    assert fresh.load_checkpoint(tmp_path / "checkpoint-00000002") == {"epoch": 1}
    assert fresh.global_step == 2
    assert _adam_steps(fresh) == 2
    # the saved model dir is a plain transformers model
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-00000003" / "model")
    for a, b in zip(reloaded.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(a, b)


def test_checkpoint_without_optimizer_state_keeps_the_weights_and_restarts_adam(trainer_model_dir, tmp_path):
    """trainer.checkpoint_optimizer=false: a checkpoint of the weights only (about a third of one with
    AdamW's two moments); loading it restores weights, step and schedule, and says AdamW restarted."""
    from dspy_p2o.checkpoints import size_bytes

    sizes = {}
    for keep_optimizer in (True, False):
        config = TrainerConfig(lr=1e-3, checkpoint_optimizer=keep_optimizer, lr_schedule="linear")
        trainer = GRPOTrainer(trainer_model_dir, config=config, total_steps=4)
        trainer.train_on(_batch())
        trainer.train_on(_batch())
        path = trainer.save_checkpoint(tmp_path / str(keep_optimizer))
        sizes[keep_optimizer] = size_bytes(path)
        assert (path / "state" / "optimizer").is_dir() == keep_optimizer
        fresh = GRPOTrainer(trainer_model_dir, config=config, total_steps=4)
        fresh.load_checkpoint(path)
        assert fresh.global_step == 2 and fresh.optimizer_restarted == (not keep_optimizer)
        assert fresh.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
        assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), trainer.model.parameters()))
        assert _adam_steps(fresh) == 2 if keep_optimizer else not fresh.optimizer.state_dict()["state"]
        expected = trainer.checkpoint_bytes()
        assert expected["optimizer"] == (2 * expected["weights"] if keep_optimizer else 0)
        assert sum(expected.values()) < sizes[keep_optimizer] < sum(expected.values()) * 1.1 + 200_000  # + tokenizer
    assert sizes[False] < 0.45 * sizes[True]


def test_full_disk_while_writing_a_checkpoint_removes_it_and_keeps_the_earlier_one(trainer_model_dir, tmp_path,
                                                                                  monkeypatch):
    import errno

    from dspy_p2o import checkpoints
    from dspy_p2o.checkpoints import NoSpaceForCheckpoint

    trainer = GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-3))
    trainer.train_on(_batch())
    first = trainer.save_checkpoint(tmp_path)
    trainer.train_on(_batch())

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_state", full_disk)
    with pytest.raises(NoSpaceForCheckpoint, match="no space left while writing checkpoint 2"):
        trainer.save_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no .tmp-checkpoint-00000002
    monkeypatch.undo()
    assert GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-3)).load_checkpoint(first) == {}


def test_sharding_refuses_what_it_cannot_shard_in_one_line(trainer_model_dir):
    """FSDP2 needs a process group (torchrun / accelerate launch), is not applied to a peft (LoRA) model,
    and is turned on by trainer.sharding, not by accelerate's FSDP plugin (accelerate shards only on GPUs,
    so that path would run untested code)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from dspy_p2o.config import ConfigError
    from dspy_p2o.trainer.grpo import _refuse_accelerate_fsdp
    from dspy_p2o.trainer.sharding import shard_module

    with pytest.raises(ConfigError, match="launch it with torchrun or accelerate launch"):
        GRPOTrainer(trainer_model_dir, config=TrainerConfig(sharding="fsdp2"))
    model = AutoModelForCausalLM.from_pretrained(trainer_model_dir)
    model.peft_config = {"default": None}  # what peft's PeftModel carries
    with pytest.raises(ConfigError, match="does not shard a peft \\(LoRA\\) model"):
        shard_module(model, device=torch.device("cpu"), compute_dtype=None)
    with pytest.raises(ConfigError, match="set trainer.sharding: fsdp2"):
        _refuse_accelerate_fsdp(SimpleNamespace(distributed_type=DistributedType.FSDP))
    _refuse_accelerate_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def _adam_steps(trainer) -> int:
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert len(steps) == 1
    return steps.pop()


def _run(script_args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    return subprocess.Popen([sys.executable, str(HERE / "trainer_run.py"), *map(str, script_args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow  # three subprocesses: ~40-90 s on this machine
def test_killed_run_resumes_to_the_same_final_state(trainer_model_dir, tmp_path):
    steps = 5
    reference = _run([trainer_model_dir, tmp_path / "ref", steps])
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    run_dir = tmp_path / "killed"
    victim = _run([trainer_model_dir, run_dir, steps, "--pause", 1.0])
    deadline = time.time() + 240
    while len(list((run_dir / "checkpoints").glob("checkpoint-*"))) < 2:
        assert victim.poll() is None, victim.communicate()[0]
        assert time.time() < deadline, "no second checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed_from = latest_checkpoint(run_dir / "checkpoints")
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) < steps

    resumed = _run([trainer_model_dir, run_dir, steps])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    ref = json.loads((tmp_path / "ref" / "final.json").read_text())
    got = json.loads((run_dir / "final.json").read_text())
    assert got["resumed_from"] >= 2 and ref["resumed_from"] == 0
    assert got["global_step"] == ref["global_step"] == steps
    assert got["adam_step"] == ref["adam_step"] == steps
    assert got["weights_sum"] == pytest.approx(ref["weights_sum"], rel=1e-6)
    assert got["lr"] == pytest.approx(ref["lr"])


def test_template_clip_moves_a_distilled_completion_further_per_batch(trainer_model_dir, tmp_path):
    """PPO's clip bounds what one batch can teach pi(y | x); with `template_clip` the bound is the
    template's own probability, so several passes over one batch move pi(y | x) further."""
    x, x_tilde, good, bad = _prompts()
    # prime: make `good` likely under x~ only (the template "unlocks" it)
    primer = GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-2, distill=False, warmup_ratio=0.0))
    for _ in range(10):
        primer.train_on(templated_group("q", x, x_tilde, [good, good, bad, bad], [1.0, 1.0, 0.0, 0.0]))
    primer.model.save_pretrained(tmp_path / "primed")
    primer.tokenizer.save_pretrained(tmp_path / "primed")
    assert _logp(primer, x_tilde, good) - _logp(primer, x, good) > 3.0
    gains = {}
    for clip in (False, True):
        trainer = GRPOTrainer(tmp_path / "primed", config=TrainerConfig(
            lr=3e-3, updates_per_batch=8, template_ratio="off", template_clip=clip, warmup_ratio=0.0))
        before = _logp(trainer, x, good)
        trainer.train_on(templated_group("q", x, x_tilde, [good, good, bad, bad], [1.0, 1.0, 0.0, 0.0]))
        gains[clip] = _logp(trainer, x, good) - before
    assert gains[True] > gains[False] + 0.5, gains
