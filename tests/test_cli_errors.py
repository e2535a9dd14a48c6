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
