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
