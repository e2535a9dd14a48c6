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

from loop_fixtures import assert_continued, kill_in_epoch_two, sum_examples, write_jsonl, write_train_config
from trainer_fixtures import trainer_model_dir  # noqa: F401

HERE = Path(__file__).parent
ROOT = HERE.parent
CASES = ("grpo", "dapo", "dr_grpo", "dapo_two_steps", "lora", "uneven")  # tests/ddp_step.py's CASES
SHARDED_CASES = tuple(c for c in CASES if c != "lora")  # ddp_step.py's UNSHARDED run without sharding
PHASES = ("old", "templated", "ref", "step")  # tests/ddp_step.py's PHASES
LAYOUTS = {"one": (1, "none"), "ddp": (2, "none"), "fsdp2": (2, "fsdp2")}  # processes, trainer.sharding


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


@pytest.fixture(scope="module")
def step_runs(trainer_model_dir, tmp_path_factory):
    """tests/ddp_step.py's batch under a layout of LAYOUTS, run once on first use: layout -> its output dir."""
    root, done = tmp_path_factory.mktemp("steps"), {}

    def run(layout: str) -> Path:
        if layout not in done:
            processes, sharding = LAYOUTS[layout]
            _run(_torchrun(processes, str(HERE / "ddp_step.py"), str(trainer_model_dir), str(root / layout),
                           "--sharding", sharding))
            done[layout] = root / layout
        return done[layout]

    return run


def _case(directory: Path, case: str) -> tuple[dict, dict]:
    return torch.load(directory / f"{case}.pt"), json.loads((directory / f"{case}.json").read_text())


def _assert_same_step(one_dir: Path, two_dir: Path) -> None:
    """Same global batch, shared over 2 processes vs all on 1: same all-reduced gradients and weights
    for every loss aggregation (their normalisers are global sums), on-policy and with the template
    ratio, with mini-batches whose rows all sit on one process (the other runs idle passes), and with a
    LoRA adapter and the KL term (only the adapter's gradients: the base is frozen; not sharded), and
    with shares of different sizes (a compound batch, every scoring phase on)."""
    cases = CASES if json.loads((two_dir / "grpo.json").read_text())["sharding"] == "none" else SHARDED_CASES
    for case in cases:
        (one, m1), (two, m2) = _case(one_dir, case), _case(two_dir, case)
        assert (m1["processes"], m2["processes"]) == (1, 2)
        assert len(one["grads"]) == len(two["grads"]) == m1["steps"] == m2["steps"] >= 1, case
        for step_one, step_two in zip(one["grads"], two["grads"]):
            for a, b in zip(step_one, step_two):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=case)
        assert one["weights"].keys() == two["weights"].keys()
        for name, weight in one["weights"].items():
            assert (two["weights"][name] - weight).abs().max().item() < 1e-5, (case, name)
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7), case
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5), case
        assert (m2["rollouts"], m2["groups"]) == (m1["rollouts"], m1["groups"]) == (16, 4)


@pytest.mark.slow  # two torchrun launches: ~40 s on 2 cores
def test_ddp_step_of_two_processes_equals_one_process_step(step_runs):
    _assert_same_step(step_runs("one"), step_runs("ddp"))


@pytest.mark.slow  # two torchrun launches: ~40 s on 2 cores
def test_fsdp2_step_of_two_processes_equals_one_process_step(step_runs):
    """The same, with the model, gradients and AdamW state sharded over the 2 processes (FSDP2; the
    reference model of the KL term too): the gradients are gathered from the shards to compare."""
    _assert_same_step(step_runs("one"), step_runs("fsdp2"))
    assert _case(step_runs("fsdp2"), "grpo")[1]["sharding"] == "fsdp2"


@pytest.mark.slow  # shares step_runs' launches
def test_every_process_runs_the_same_forward_passes_in_every_phase(step_runs):
    """The trainer's collective-safety invariant (GRPOTrainer._plan): per phase -- old, templated and
    reference scoring, the optimiser steps' gradient passes -- both processes run as many forwards as
    the busiest one needs, under DDP and under FSDP2 (where a missing forward would hang the other)."""
    for layout in ("ddp", "fsdp2"):
        for case in CASES if layout == "ddp" else SHARDED_CASES:
            ranks = _case(step_runs(layout), case)[1]["ranks"]
            assert ranks[0]["passes"] == ranks[1]["passes"], (layout, case, ranks)
        # "uneven": rank 0 holds 8 plain rows, rank 1 24 rows of which 12 distilled, in several micro-batches
        ranks = _case(step_runs(layout), "uneven")[1]["ranks"]
        assert (ranks[0]["rows"], ranks[1]["rows"]) == (8, 24)
        one = _case(step_runs("one"), "uneven")[1]["ranks"][0]["passes"]
        for phase in PHASES:
            assert ranks[0]["passes"][phase] >= 2, (layout, phase)  # rank 0 scored its rows and padded
            assert ranks[0]["passes"][phase] <= one[phase]  # a share needs at most what the whole batch does


@pytest.mark.slow  # shares step_runs' launches
def test_fsdp2_holds_half_the_parameter_gradient_and_optimizer_bytes_per_process(step_runs):
    """Per process, at the optimiser step: DDP keeps a full replica of the parameters, gradients and
    AdamW state; FSDP2 over 2 processes keeps half of each (its DTensor shards)."""
    for case in SHARDED_CASES:
        one = _case(step_runs("one"), case)[1]["ranks"][0]["memory"]
        ddp, fsdp = (_case(step_runs(layout), case)[1]["ranks"] for layout in ("ddp", "fsdp2"))
        for kind in ("params", "grads", "optimizer"):
            assert all(r["memory"][kind] == one[kind] for r in ddp), (case, kind)
            assert all(r["memory"][kind] <= 0.51 * one[kind] for r in fsdp), (case, kind, fsdp, one)
            assert sum(r["memory"][kind] for r in fsdp) >= one[kind]  # between them, all of it


@pytest.mark.slow  # two torchrun launches: ~30 s on 2 cores
@pytest.mark.parametrize("sharding", ["none", "fsdp2"])
def test_checkpoint_is_renamed_only_after_every_process_wrote_and_a_full_disk_leaves_none(
        trainer_model_dir, tmp_path, sharding):
    """Rank 1 slow to write (1.5 s per torch.save): the checkpoint still holds its RNG state and both
    processes return it. Rank 1's disk full: both processes raise NoSpaceForCheckpoint, the temporary
    directory is gone and the earlier checkpoint is intact."""
    _run(_torchrun(2, str(HERE / "checkpoint_ranks.py"), str(trainer_model_dir), str(tmp_path), "--sharding", sharding))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r == {"slow": {"saved": "checkpoint-00000001"}, "full": {"no_space": 2}} for r in reports), reports
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-00000001"]
    state = checkpoints / "checkpoint-00000001" / "state"
    assert {"random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"} <= {p.name for p in state.iterdir()}
    assert (state / "optimizer" / ".metadata").is_file()
    # written by 2 processes (sharded or not), it loads into one unsharded process: weights and AdamW state
    from safetensors.torch import load_file

    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

    one = GRPOTrainer(trainer_model_dir, config=TrainerConfig(lr=1e-3))
    one.load_checkpoint(checkpoints / "checkpoint-00000001")
    saved = load_file(str(checkpoints / "checkpoint-00000001" / "model" / "model.safetensors"))
    assert all(torch.equal(one.model.state_dict()[name], tensor) for name, tensor in saved.items())
    adam = one.optimizer.state_dict()["state"]
    assert len(adam) == len(list(one.model.parameters())) and {int(s["step"]) for s in adam.values()} == {1}


# ---------------------------------------------------------------------- the CLI under torchrun
TRAIN_SIZE, VAL_SIZE, BATCH, K, EPOCHS = 12, 4, 4, 4, 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, format_model_dir):
    """A tiny `dspy-p2o train` config with the prompt phase on: every question is hard (rewards < tau = 1),
    so GEPA runs after epoch 1 (self-reflection by the tiny model); a validation set is scored
    after every epoch; the metric records which rank scored each rollout."""
    root = tmp_path_factory.mktemp("multiprocess")
    data, val = root / "train.jsonl", root / "val.jsonl"
    write_jsonl(data, sum_examples(TRAIN_SIZE, 0, "train"))
    write_jsonl(val, sum_examples(VAL_SIZE, 1, "val"))
    config = root / "tiny.yaml"
    write_train_config(config, format_model_dir, data, "loop_fixtures:rank_recording_metric", val_file=val,
                       epochs=EPOCHS, batch_size=BATCH, k=K, tau=1.0, min_hard=1, plain_per_group=2)
    return root, config


@pytest.fixture(scope="module")
def two_process_run(tiny_run):
    root, config = tiny_run
    run_dir, log = root / "two", root / "two-metric-calls.txt"
    done = _run(_train(2, config, run_dir), P2O_TEST_METRIC_LOG=str(log))
    (root / "two-stdout.txt").write_text(done.stdout)
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
    # rank 1 scored its half of every batch's rollouts and of the validation set (greedy, one sample),
    # after the metric's two probe calls at start (rewards.check_metric, on every process); rank 0 its
    # halves plus GEPA's calls. An answer outside the adapter's format scores 0 without a metric call:
    # the tiny model writes a few per run at T = 1
    calls = log.read_text().split()
    per_rank = 2 + EPOCHS * ((TRAIN_SIZE // BATCH) * (BATCH // 2) * K + VAL_SIZE // 2)
    assert per_rank - 8 <= calls.count("1") <= per_rank and calls.count("0") > per_rank and set(calls) == {"0", "1"}
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
    # the final line once, from the main process
    assert [line for line in (root / "two-stdout.txt").read_text().splitlines() if line.startswith("done:")] == [
        f"done: {EPOCHS} epochs; checkpoint {_final_checkpoint(run_dir) / 'model'}; summary {run_dir / 'summary.md'}"]
    # one process on the same global batch: the same number of optimiser steps
    single = root / "one"
    _run(_train(None, config, single))
    assert _final_step(single) == _final_step(run_dir)


def _final_checkpoint(run_dir: Path) -> Path:
    return Path(json.loads((run_dir / "state.json").read_text())["checkpoint"])


def _kill_and_keep_a_copy(cmd: list[str], run_dir: Path) -> tuple[dict, Path]:
    """kill_in_epoch_two (torchrun's process group SIGKILLed: its ranks must die with it), and a copy of the
    killed run's directory to resume a second way."""
    import shutil

    state = kill_in_epoch_two(cmd, run_dir, env=_env(), cwd=ROOT, timeout_s=300)
    copy = run_dir.with_name(run_dir.name + "-copy")
    shutil.copytree(run_dir, copy)  # (a resume looks its checkpoint up by name, in its own directory)
    return state, copy


def _assert_finished(run_dir: Path, processes: int) -> None:
    """A completed run: every batch logged once, the steps adding up to the last checkpoint's, and the
    resume recorded with the number of processes that resumed it."""
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    batches = [m for m in metrics if "train/reward_mean" in m]
    assert sorted((m["train/epoch"], m["train/batch"]) for m in batches) == [
        (e, b) for e in range(1, EPOCHS + 1) for b in range(TRAIN_SIZE // BATCH)]
    assert sum(m["train/steps"] for m in batches) == _final_step(run_dir)
    assert _read_jsonl(run_dir / "resumes.jsonl")[-1]["from"]["processes"] == processes
    assert len(_read_jsonl(run_dir / "rewards/epoch-2.jsonl")) == TRAIN_SIZE


@pytest.mark.slow  # a killed 2-process run, resumed by 2 processes and by 1: ~2-3 min on 2 cores
def test_two_process_run_killed_in_epoch_two_resumes_to_the_same_step_count(tiny_run, two_process_run):
    """torchrun's process group SIGKILLed mid-epoch 2 (its ranks die with it, releasing the run's lock); the
    resumed run continues from the checkpoint (not from scratch) to the uninterrupted run's step count. The
    same killed run also resumes under ONE process: checkpoints are independent of the process count."""
    root, config = tiny_run
    run_dir = root / "killed"
    state, copy = _kill_and_keep_a_copy(_train(2, config, run_dir), run_dir)
    assert not state["done"] and state["epoch"] == 1
    _run(_train(2, config, run_dir, "--resume"))
    assert_continued(run_dir, state)
    assert _final_step(run_dir) == _final_step(two_process_run[0])
    assert len(_read_jsonl(run_dir / "rewards/epoch-2.jsonl")) == TRAIN_SIZE
    _assert_finished(run_dir, processes=2)
    _run(_train(None, config, copy, "--resume"))  # one plain process, no process group
    assert_continued(copy, state)
    _assert_finished(copy, processes=1)


@pytest.mark.slow  # a killed 2-process FSDP2 run, resumed by 2 processes and by 1: ~3 min on 2 cores
def test_fsdp2_run_with_gepa_killed_in_epoch_two_resumes_under_two_or_one_processes(tiny_run):
    """`trainer.sharding=fsdp2` through the whole loop under torchrun x 2: rollouts from each rank's own
    engine replica (synced from the gathered weights), GEPA on rank 0, validation, sharded checkpoints
    (each rank writes its shard of AdamW's state; the main process the gathered weights). Killed mid-epoch
    2, it resumes from its checkpoint and finishes; a copy resumes under one process (torchrun x 1: the
    optimizer state resharded from 2 shards to 1)."""
    root, config = tiny_run
    run_dir, sharded = root / "fsdp2", "trainer.sharding=fsdp2"
    state, copy = _kill_and_keep_a_copy(_train(2, config, run_dir, sharded), run_dir)
    gepa = json.loads((run_dir / "templates/epoch-1.json").read_text())
    assert gepa["ran"] and gepa["cost"]["metric_calls_gepa"] > 0
    checkpoint = Path(state["checkpoint"])
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 2
    assert sorted(p.name for p in (checkpoint / "state/optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    done = _run(_train(2, config, run_dir, "--resume", sharded))
    assert_continued(run_dir, state)
    _assert_finished(run_dir, processes=2)
    assert [line[:5] for line in done.stdout.splitlines() if line.startswith("done:")] == ["done:"]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(_final_checkpoint(run_dir) / "model")  # a plain model dir
    assert trained.config.model_type == "qwen3"
    _run(_train(1, config, copy, "--resume", sharded))
    assert_continued(copy, state)
    _assert_finished(copy, processes=1)


@pytest.mark.slow  # a 2-process run against an in-process test server: ~1-2 min on 2 cores
def test_fsdp2_run_attached_to_a_shared_vllm_server_syncs_the_gathered_weights(tiny_run):
    """engine: vllm with vllm.url under FSDP2: both ranks sample from the one server; after every
    optimiser step the shards are gathered onto rank 0, which reloads the server (the other rank waits):
    at the end the server serves exactly the final checkpoint's weights."""
    from safetensors.torch import load_file

    from dspy_p2o.testing.fake_vllm import FakeVLLMServer

    root, config = tiny_run
    run_dir, key = root / "fsdp2-vllm", "test-key"
    with FakeVLLMServer(tiny_run_policy(config), api_key=key) as server:
        _run(_train(2, config, run_dir, "method=grpo", "epochs=1", "engine=vllm", f"vllm.url={server.url}",
                    f"vllm.api_key={key}", "trainer.sharding=fsdp2"))
        paths = [path for _, path in server.request_log]
        served = {k: v.detach().clone() for k, v in server.engine.model.state_dict().items()}
    assert paths.count("/collective_rpc") == _final_step(run_dir) > 0  # one reload per optimiser step
    trained = load_file(str(_final_checkpoint(run_dir) / "model" / "model.safetensors"))
    assert all(torch.equal(served[name], tensor) for name, tensor in trained.items())


def tiny_run_policy(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["policy"]


def test_gpu_recipe_launches_the_tested_paths_and_shards_by_decoder_layer(trainer_model_dir):
    """What can be checked of the GPU recipe on CPU: its accelerate configs load (one process per GPU, as
    torchrun starts them here; DeepSpeed's is kept, untested), run.sh defaults to FSDP2 through
    trainer.sharding (accelerate's own FSDP plugin is refused by the trainer), and FSDP2 wraps each of
    the policy's decoder layers."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from dspy_p2o.trainer.sharding import decoder_layers

    configs = {name: load_config_from_file(str(ROOT / "benchmarks/gpu/accelerate" / f"{name}.yaml"))
               for name in ("multi_gpu", "zero")}
    assert [configs[n].distributed_type for n in ("multi_gpu", "zero")] == [
        DistributedType.MULTI_GPU, DistributedType.DEEPSPEED]
    run_sh = (ROOT / "benchmarks/gpu/run.sh").read_text()
    assert "DIST=${DIST:-fsdp2}" in run_sh and "fsdp2) ACCELERATE=multi_gpu; SHARDING=fsdp2 ;;" in run_sh
    assert "  sharding: $SHARDING" in run_sh
    model = AutoModelForCausalLM.from_pretrained(trainer_model_dir)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["Qwen3DecoderLayer"] * model.config.num_hidden_layers
