"""P^2O with 2 CPU processes under torchrun (gloo; accelerate reads it as MULTI_CPU).

The processes are real: `torch.distributed.run` (torchrun) starts them, and they run the
code of this checkout (PYTHONPATH), one thread each.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loop_fixtures import kill_in_epoch_two, sum_examples, write_jsonl, write_train_config
from trainer_fixtures import trainer_model_dir  # noqa: F401

HERE = Path(__file__).parent
ROOT = HERE.parent
CASES = ("grpo", "dapo", "dr_grpo", "dapo_two_steps", "lora")  # tests/ddp_step.py's CASES


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def _torchrun(processes: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]


def _train(processes: int | None, config: Path, run_dir: Path, *extra) -> list[str]:
    """`python -m dspy_p2o.cli train` (processes=None: the plain one-process path) or under torchrun."""
    cli = ["-m", "dspy_p2o.cli", "train", "--config", str(config), "--run-dir", str(run_dir), *extra]
    return [sys.executable, *cli] if processes is None else _torchrun(processes, *cli)


def _run(cmd, timeout=400, **env) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_shard_gives_each_rank_a_contiguous_near_equal_share():
    from dspy_p2o.collectives import shard

    for n in range(0, 9):
        items = list(range(n))
        shares = [shard(items, rank, 3) for rank in range(3)]
        assert sum(shares, []) == items  # in rank order, every item once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.slow  # two torchrun launches: ~40 s on 2 cores
def test_ddp_step_of_two_processes_equals_one_process_step(trainer_model_dir, tmp_path):
    """Same global batch, shared over 2 processes vs all on 1: same all-reduced gradients and weights
    for every loss aggregation (their normalisers are global sums), on-policy and with the template
    ratio, with mini-batches whose rows all sit on one process (the other runs idle passes), and with a
    LoRA adapter and the KL term (only the adapter's gradients: the base is frozen)."""
    for processes in (1, 2):
        _run(_torchrun(processes, str(HERE / "ddp_step.py"), str(trainer_model_dir), str(tmp_path / str(processes))))
    for case in CASES:
        one, two = (torch.load(tmp_path / p / f"{case}.pt") for p in ("1", "2"))
        m1, m2 = (json.loads((tmp_path / p / f"{case}.json").read_text()) for p in ("1", "2"))
        assert (m1["processes"], m2["processes"]) == (1, 2)
        assert len(one["grads"]) == len(two["grads"]) == m1["steps"] == m2["steps"] >= 1, case
        for step_one, step_two in zip(one["grads"], two["grads"]):
            for a, b in zip(step_one, step_two):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=case)
        for name, weight in one["weights"].items():
            assert (two["weights"][name] - weight).abs().max().item() < 1e-5, (case, name)
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7), case
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5), case
        assert (m2["rollouts"], m2["groups"]) == (m1["rollouts"], m1["groups"]) == (16, 4)


# ---------------------------------------------------------------------- the CLI under torchrun
TRAIN_SIZE, VAL_SIZE, BATCH, K, EPOCHS = 12, 4, 4, 4, 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, format_model_dir):
    """A tiny `dspy-p2o train` config with the prompt phase on: every question is hard (tau > 1),
    so GEPA runs after epoch 1 (self-reflection by the tiny model); a validation set is scored
    after every epoch; the metric records which rank scored each rollout."""
    root = tmp_path_factory.mktemp("multiprocess")
    data, val = root / "train.jsonl", root / "val.jsonl"
    write_jsonl(data, sum_examples(TRAIN_SIZE, 0, "train"))
    write_jsonl(val, sum_examples(VAL_SIZE, 1, "val"))
    config = root / "tiny.yaml"
    write_train_config(config, format_model_dir, data, "loop_fixtures:rank_recording_metric", val_file=val,
                       epochs=EPOCHS, batch_size=BATCH, k=K, tau=1.01, min_hard=1, plain_per_group=2)
    return root, config


@pytest.fixture(scope="module")
def two_process_run(tiny_run):
    root, config = tiny_run
    run_dir, log = root / "two", root / "two-metric-calls.txt"
    _run(_train(2, config, run_dir), P2O_TEST_METRIC_LOG=str(log))
    return run_dir, log


def _final_step(run_dir: Path) -> int:
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"]
    return json.loads((Path(state["checkpoint"]) / "trainer_state.json").read_text())["global_step"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # one 2-process and one 1-process run: ~1-2 min on 2 cores
def test_two_process_cli_run_shares_rollouts_and_runs_gepa_once(tiny_run, two_process_run):
    root, config = tiny_run
    run_dir, log = two_process_run
    ids = sorted(f"train/{i}" for i in range(TRAIN_SIZE))
    for epoch in range(1, EPOCHS + 1):  # every question rolled out by exactly one rank, once per epoch
        assert sorted(r["id"] for r in _read_jsonl(run_dir / f"rewards/epoch-{epoch}.jsonl")) == ids
        assert all(len(r["rewards"]) == K for r in _read_jsonl(run_dir / f"rewards/epoch-{epoch}.jsonl"))
        assert sorted(h["id"] for h in _read_jsonl(run_dir / f"hard/epoch-{epoch}.jsonl")) == ids
    gepa = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert gepa["ran"] and gepa["cost"]["metric_calls_gepa"] > 0  # (the tiny self-reflection LM may find nothing)
    assert "last epoch" in json.loads((run_dir / "templates/epoch-2.json").read_text())["reason"]
    # rank 1 scored exactly its half of every batch's rollouts and of the validation set (greedy,
    # one sample); rank 0 its halves plus GEPA's calls
    calls = log.read_text().split()
    per_rank = EPOCHS * ((TRAIN_SIZE // BATCH) * (BATCH // 2) * K + VAL_SIZE // 2)
    assert calls.count("1") == per_rank and calls.count("0") > per_rank and set(calls) == {"0", "1"}
    # metrics.jsonl: each batch once, with the global batch's numbers; each optimiser step once
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    batches = [m for m in metrics if "train/reward_mean" in m]
    assert sorted((m["train/epoch"], m["train/batch"]) for m in batches) == [
        (e, b) for e in range(1, EPOCHS + 1) for b in range(TRAIN_SIZE // BATCH)]
    assert all(m["train/rollouts"] == BATCH * K for m in batches)
    stepped = [m["step"] for m in batches if m["train/steps"] > 0]
    assert stepped == sorted(set(stepped))
    assert sum(m["train/steps"] for m in batches) == _final_step(run_dir) == stepped[-1]
    epochs = [m for m in metrics if "epoch/epoch" in m]
    assert len(epochs) == EPOCHS and all(0 <= m["epoch/val/pass@1"] <= 1 for m in epochs)
    assert len([m for m in metrics if any(k.startswith("gepa/") for k in m)]) == 1
    assert {k for m in metrics for k in m if k.startswith("epoch/wait_frac/")} == {
        "epoch/wait_frac/rank0", "epoch/wait_frac/rank1"}
    assert not list(run_dir.rglob("*.tmp"))
    # one process on the same global batch: the same number of optimiser steps
    single = root / "one"
    _run(_train(None, config, single))
    assert _final_step(single) == _final_step(run_dir)


@pytest.mark.slow  # a killed and a resumed 2-process run: ~1-2 min on 2 cores
def test_two_process_run_killed_in_epoch_two_resumes_to_the_same_step_count(tiny_run, two_process_run):
    root, config = tiny_run
    run_dir = root / "killed"
    state = kill_in_epoch_two(_train(2, config, run_dir), run_dir, env=_env(), cwd=ROOT, timeout_s=300)
    assert not state["done"] and state["epoch"] == 1
    _run(_train(2, config, run_dir, "--resume"))
    assert _final_step(run_dir) == _final_step(two_process_run[0])
    assert len(_read_jsonl(run_dir / "rewards/epoch-2.jsonl")) == TRAIN_SIZE


def test_gpu_accelerate_configs_load_and_fsdp_wraps_the_policys_decoder_layer(trainer_model_dir):
    """What can be checked of the GPU recipe's accelerate configs on CPU (accelerate 1.15 runs no FSDP
    here): they load, DDP is the default's type, and FSDP's wrap class is the Qwen3 decoder layer."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    configs = {name: load_config_from_file(str(ROOT / "benchmarks/gpu/accelerate" / f"{name}.yaml"))
               for name in ("ddp", "fsdp", "zero")}
    assert [configs[n].distributed_type for n in ("ddp", "fsdp", "zero")] == [
        DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.DEEPSPEED]
    fsdp = configs["fsdp"].fsdp_config
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpoints and weight sync need the full weights
    model = AutoModelForCausalLM.from_pretrained(trainer_model_dir)
    layers = [m for m in model.modules() if type(m).__name__ == fsdp["fsdp_transformer_layer_cls_to_wrap"]]
    assert len(layers) == model.config.num_hidden_layers
    assert "DIST=${DIST:-ddp}" in (ROOT / "benchmarks/gpu/run.sh").read_text()
