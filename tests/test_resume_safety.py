"""Resume after the worst-timed kill (a real SIGKILL between a new checkpoint and the state that
records it) and resume with a changed config: always resumable, never a step logged twice,
never a changed setting ignored silently."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import dspy
import pytest
import yaml

import dspy_p2o
from dspy_p2o.config import ConfigError
from loop_fixtures import sum_examples, tiny_overrides
from safety_fixtures import noisy_metric

TESTS = str(Path(__file__).parent)

# Kill this process (SIGKILL: no clean-up) the 2nd time the loop saves its state: after the
# trainer wrote checkpoint 2, before state.json records it.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import dspy, dspy_p2o
    from dspy_p2o.run_dir import RunDir
    from loop_fixtures import sum_examples, tiny_overrides
    from safety_fixtures import noisy_metric
    real, calls = RunDir.save_state, []
    def save_state(self, state):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, state)
    RunDir.save_state = save_state
    dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(8, 0, "train"), metric=noisy_metric,
                     policy=sys.argv[2], run_dir=sys.argv[1], **tiny_overrides(**eval(sys.argv[3])))
""")
SETTINGS = dict(epochs=1, batch_size=2, k=2, method="grpo", keep_last_checkpoints=1, max_tokens=32,
                temperature=0.3)  # outputs that parse: the noisy metric then gives every group variance


def _killed_run(run_dir, policy):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run_dir), str(policy), repr(SETTINGS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]


def _resume(run_dir, policy, **changes):
    return dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(8, 0, "train"),
                            metric=noisy_metric, policy=policy, run_dir=run_dir,
                            **tiny_overrides(**{**SETTINGS, **changes}))


def _train_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/reward_mean" in r]


def test_kill_between_checkpoint_and_state_leaves_the_recorded_checkpoint_and_no_duplicate_steps(tmp_path,
                                                                                              format_model_dir):
    run_dir = tmp_path / "run"
    _killed_run(run_dir, format_model_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert (Path(state["checkpoint"]) / "trainer_state.json").is_file()  # pruned only after the state moved on
    assert _train_steps(run_dir) == [1, 2]  # batch 2 was logged before the kill
    result = _resume(run_dir, format_model_dir)
    assert len(result.history) == 1
    assert _train_steps(run_dir) == [1, 2, 3, 4]  # batch 2 replayed, logged once
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-00000004"]  # keep_last 1


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, format_model_dir):
    run_dir = tmp_path / "run"
    _killed_run(run_dir, format_model_dir)
    state = json.loads((run_dir / "state.json").read_text())
    shutil.rmtree(state["checkpoint"])  # what the old prune-before-state order left behind
    assert (run_dir / "checkpoints" / "checkpoint-00000002" / "trainer_state.json").is_file()
    result = _resume(run_dir, format_model_dir)
    assert len(result.history) == 1 and result.checkpoint.parent.name == "checkpoint-00000004"
    steps = _train_steps(run_dir)
    assert steps[-1] == 4 and len(steps) == len(set(steps))  # batch 2 not trained twice, no step logged twice


def test_resume_refuses_changed_meaning_and_records_more_epochs(tmp_path, format_model_dir):
    run_dir = tmp_path / "run"
    same = dict(batch_size=4, temperature=0.7)  # not the trainer's default 1.0: its nested copy must match too
    _resume(run_dir, format_model_dir, **same)  # a complete 1-epoch run
    for change, named in (({"lr": 5e-4}, "trainer.lr: 0.001 -> 0.0005"), ({"beta": 0.1}, "trainer.beta: 0.0 -> 0.1"),
                          ({"distill": False}, "trainer.distill: True -> False")):
        with pytest.raises(ConfigError, match=f"incompatible run \\({named}\\)"):
            _resume(run_dir, format_model_dir, **same, **change)
    result = _resume(run_dir, format_model_dir, **same, epochs=2, progress=True)
    assert [h["epoch"] for h in result.history] == [1, 2]  # a finished run continues for the new epochs
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == 2
    records = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert records[-1]["changed"] == {"epochs": [1, 2], "progress": [False, True]}


def test_cli_prints_a_refused_resume_as_one_line(tmp_path, format_model_dir):
    from dspy_p2o.config import P2OConfig

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": ex.question, "answer": ex.answer}) + "\n"
                            for ex in sum_examples(4, 0, "train")))
    config = tmp_path / "c.yaml"
    config.write_text(P2OConfig.load(None, {"policy": str(format_model_dir), "data.train": str(data),
                                            "data.metric": "safety_fixtures:noisy_metric",
                                            **tiny_overrides(**{**SETTINGS, "batch_size": 4})}).to_yaml())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "dspy_p2o.cli", "train", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    done = subprocess.run(cmd + ["--resume", "trainer.beta=0.5"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "belongs to an incompatible run (trainer.beta: 0.0 -> 0.5);" in lines[0], done.stderr


class _Stop(Exception):
    pass


@pytest.mark.parametrize("sync", ["step", "epoch"])
def test_resume_syncs_the_engine_exactly_once(tmp_path, format_model_dir, monkeypatch, sync):
    """Stopped between phase 1 and the end of the epoch (state.json says "prompt"), a resume
    serves the restored weights through one sync -- the checkpoint load's -- and no second one."""
    from dspy_p2o.loop import P2OLoop
    from dspy_p2o.resources import RunResources

    run_dir = tmp_path / "run"

    def stop(self, state):
        raise _Stop

    with monkeypatch.context() as patch:
        patch.setattr(P2OLoop, "_end_epoch", stop)
        with pytest.raises(_Stop):
            _resume(run_dir, format_model_dir, sync=sync)
    assert json.loads((run_dir / "state.json").read_text())["phase"] == "prompt"
    syncs = []
    real = RunResources.sync
    monkeypatch.setattr(RunResources, "sync", lambda self: syncs.append(1) or real(self))
    assert len(_resume(run_dir, format_model_dir, sync=sync).history) == 1
    assert len(syncs) == 1
