"""Every `dspy-p2o train` usage error is one line naming the key and the expected form, exit code 2."""

import subprocess
import sys

import pytest

from dspy_p2o.cli import main

CONFIG = "benchmarks/configs/grpo_baseline.yaml"


@pytest.mark.parametrize("override, message", [
    ("k=", "override 'k' has no value; write k=<value>"),
    ("k=null", "config key 'k' must have a value (an integer), got null"),
    ("epochs=[1", "override 'epochs': value '[1' is not valid YAML"),
    ("trainer.lr={a", "override 'trainer.lr': value '{a' is not valid YAML"),
    ("=3", "override '=3' is not of the form key=value"),
    ("trainer.lrr=1e-5", "unknown config key 'trainer.lrr'; did you mean 'trainer.lr'?"),
    ("max_tokens=0", "max_tokens must be >= 1, got 0"),
    ("engine_kwargs={url: http://h:8000}", "config key 'engine_kwargs' has moved; use the engine's own section"),
])
def test_override_errors_are_one_line_with_exit_code_2(capsys, override, message):
    assert main(["train", "--config", CONFIG, override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dspy-p2o train: error: ") and message in err


def test_cli_process_prints_one_line_not_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dspy_p2o.cli", "train", "--config", CONFIG, "--resume",
                           "--run-dir", str(tmp_path / "none")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"dspy-p2o train: error: nothing to resume in {tmp_path / 'none'} "
                                                "(no state.json)"]


@pytest.mark.parametrize("engine, arg, message", [
    ("vllm", "tensor_paralel_size=2", "--engine-arg: unknown config key 'tensor_paralel_size'; "
                                      "did you mean 'tensor_parallel_size'?"),
    ("vllm", "gpu_memory_utilization=2", "VLLMOptions.gpu_memory_utilization must be in (0, 1], got 2"),
    ("local", "max_batch_size=x", "--engine-arg: config key 'max_batch_size' must be an integer, got 'x'"),
])
def test_eval_engine_args_go_through_the_typed_engine_options(capsys, tmp_path, engine, arg, message):
    """A wrong --engine-arg is one line before any engine starts (the model need not exist)."""
    assert main(["eval", "--model", str(tmp_path / "m"), "--engine", engine, "--engine-arg", arg,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dspy-p2o eval: error: ") and message in err, err


CPU_RECIPE = "benchmarks/configs/smollm2_cpu.yaml"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("dspy-p2o train: error: "), err
    return err


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for run_dir, what in ((blocker, "is a file"), (blocker / "run", f"is under '{blocker}', a file")):
        assert main(["train", "--config", CONFIG, "--run-dir", str(run_dir)]) == 2
        assert f"run directory '{run_dir}' {what}, not a directory" in _one_line(capsys)


def test_a_misspelled_packaged_model_is_one_line_with_a_did_you_mean_and_leaves_nothing(tmp_path, capsys):
    import time

    run_dir = tmp_path / "run"
    start = time.monotonic()
    assert main(["train", "--config", CPU_RECIPE, "--run-dir", str(run_dir), "policy=smollm2-135m-instruc"]) == 2
    assert time.monotonic() - start < 20  # no hub retries
    err = _one_line(capsys)
    assert "model 'smollm2-135m-instruc' is neither a model directory nor a packaged model (did you mean " \
           "'smollm2-135m-instruct'? packaged models: smollm2-135m-instruct)" in err and "HF_HUB_OFFLINE=1" in err
    assert not run_dir.exists()  # no metrics.jsonl, no run.lock


def test_an_unreachable_hub_is_named_without_retries(monkeypatch):
    import huggingface_hub

    from dspy_p2o.engines.hf import check_model_path

    def unreachable(repo_id, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(FileNotFoundError, match=r"'org/model' is neither .* the Hugging Face hub cannot be reached "
                                                r"\(ConnectionError\) and its cache has no such model"):
        check_model_path("org/model")


def test_a_tracker_whose_package_is_missing_names_the_extra_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as if tensorboard had never been installed
                        lambda name, *a: None if name.split(".")[0] in ("tensorboard", "tensorboardX")
                        else find_spec(name, *a))
    run_dir, policy = tmp_path / "run", f"policy={tmp_path / 'no-model'}"  # the trackers are checked first
    assert main(["train", "--config", CPU_RECIPE, "--run-dir", str(run_dir), policy]) == 2
    assert ("tracker 'tensorboard' needs the tensorboard package, which is not installed: "
            "pip install 'dspy_p2o[tensorboard]' (or drop it from trackers)") in _one_line(capsys)
    assert not run_dir.exists()
    assert main(["train", "--config", CPU_RECIPE, "--run-dir", str(run_dir), policy, "trackers=[tensorbored]"]) == 2
    assert "unknown tracker 'tensorbored'" in _one_line(capsys)


def test_ctrl_c_stops_a_run_with_one_line_giving_the_command_that_resumes_it(tmp_path, format_model_dir):
    import json
    import os
    import shlex
    import signal
    import time
    from pathlib import Path

    from loop_fixtures import sum_examples, write_jsonl, write_train_config

    write_jsonl(tmp_path / "train.jsonl", sum_examples(8, 0, "train"))
    config = tmp_path / "tiny.yaml"
    write_train_config(config, format_model_dir, tmp_path / "train.jsonl", "loop_fixtures:slow_closeness_metric",
                       method="grpo", epochs=2, batch_size=4)
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "dspy_p2o.cli"]
    proc = subprocess.Popen([*cli, "train", "--config", str(config), "--run-dir", str(run_dir), "k=2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # mid-epoch 1: a checkpoint after its first batch
        state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
        if state.get("batch", 0) >= 1:
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    out, err = proc.communicate(timeout=120)
    resume = (f"dspy-p2o train --config {config} --run-dir {run_dir} --resume k=2")
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"dspy-p2o train: stopped; resume with: {resume}"], err[-3000:]
    assert not json.loads((run_dir / "state.json").read_text())["done"]
    resumed = subprocess.run([*cli, *shlex.split(resume)[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["done"]


def test_full_disk_while_writing_a_checkpoint_stops_with_one_line_and_loses_nothing(tmp_path, format_model_dir,
                                                                                   monkeypatch, capsys):
    """The disk fills up as the second checkpoint is written (its trainer_state.json write fails with
    ENOSPC): one line naming the checkpoint and the command that resumes, exit code 1, no
    .tmp-checkpoint left; the run then resumes from the first checkpoint and finishes."""
    import errno
    import json
    import shlex

    from dspy_p2o import checkpoints
    from loop_fixtures import sum_examples, write_jsonl, write_train_config

    write_jsonl(tmp_path / "train.jsonl", sum_examples(8, 0, "train"))
    config = tmp_path / "tiny.yaml"
    write_train_config(config, format_model_dir, tmp_path / "train.jsonl", "loop_fixtures:closeness_metric",
                       method="grpo", epochs=1, batch_size=4, progress=False)
    run_dir = tmp_path / "run"
    write_state, calls = checkpoints.write_state, []

    def fills_up(directory, state):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_state(directory, state)

    monkeypatch.setattr(checkpoints, "write_state", fills_up)
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir), "k=2"]) == 1
    resume = f"dspy-p2o train --config {config} --run-dir {run_dir} --resume k=2"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dspy-p2o train: error: no space left while writing checkpoint 2 in {run_dir / 'checkpoints'} (removed); "
        "nothing lost: free some space (or set trainer.checkpoint_optimizer=false or a lower "
        f"trainer.keep_last_checkpoints), then resume with: {resume}"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-00000001"]
    monkeypatch.undo()
    assert main(shlex.split(resume)[1:]) == 0
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"] and state["checkpoint_step"] == 2
