"""The run directory under hostile and careless use: one live run per directory (a real flock,
a real holder process, a real SIGKILL), no directory poisoned by a run that never started,
a torn metrics line repaired on open."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import dspy
import pytest

import dspy_p2o
from dspy_p2o.config import ConfigError
from dspy_p2o.loop import P2OLoop
from dspy_p2o.metrics import MetricsLogger, read_metrics
from dspy_p2o.rewards import math_metric
from dspy_p2o.run_dir import RunDirBusy
from loop_fixtures import sum_examples, tiny_overrides

HOLDER = textwrap.dedent("""
    import sys, time
    from dspy_p2o.run_dir import RunDir
    lock = RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    time.sleep(600)
""")


def _hold_lock(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _loop(run_dir, policy, **overrides):
    from dspy_p2o.config import P2OConfig

    cfg = P2OConfig.load(None, {"policy": str(policy), **tiny_overrides(**overrides)})
    return P2OLoop(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"), metric=math_metric,
                   policy=str(policy), config=cfg, run_dir=run_dir)


def test_flock_refuses_a_second_run_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    run_dir, policy = tmp_path / "run", tmp_path / "policy"
    policy.mkdir()
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RunDirBusy) as refused:
            _loop(run_dir, policy)
        message = str(refused.value)
        assert f"pid {holder.pid} on {socket.gethostname()} (started 20" in message and str(run_dir) in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    loop = _loop(run_dir, policy)  # the kernel dropped the dead holder's flock: taken over
    try:
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            _loop(run_dir, policy)  # held for the loop's lifetime, even against this same process
    finally:
        loop.release()
    _loop(run_dir, policy).release()  # released: free again


def test_runs_that_fail_before_training_leave_no_identity_behind(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    typo = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"model directory '{typo}' does not exist"):
        dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"), metric=math_metric,
                         policy=typo, run_dir=run_dir, **tiny_overrides())
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="Unrecognized model"):  # fails to load: checked run dir, not yet started
        _loop(run_dir, not_a_model).run_loop()
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        _loop(run_dir, tiny_model_dir, temperature=0)
    assert not (run_dir / "identity.json").exists() and not (run_dir / "config.yaml").exists()
    loop = _loop(run_dir, tiny_model_dir, k=2)  # the corrected command is a new run, not a refused resume
    assert loop.resuming is False
    loop.release()


def test_a_numeric_knob_out_of_range_fails_before_the_run_directory_is_claimed(tmp_path, tiny_model_dir):
    """max_tokens=0 used to pass validation, fail later and have the corrected command refused as another run."""
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="^max_tokens must be >= 1, got 0$"):
        _loop(run_dir, tiny_model_dir, max_tokens=0)
    assert not run_dir.exists()
    loop = _loop(run_dir, tiny_model_dir)  # the corrected command is a new run, not a refused resume
    assert loop.resuming is False
    loop.release()


def test_torn_last_metrics_line_is_cut_on_open(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.4}\n{"step": 3, "train/lo')
    with MetricsLogger(path) as logger:
        logger.log({"loss": 0.3}, step=3, prefix="train/")
        logger.log({"loss": 0.2}, step=4, prefix="train/")
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    path.write_text('{"step": 1, "train')  # torn first line: nothing complete survives
    with MetricsLogger(path) as logger:
        logger.log({"loss": 0.1}, step=1, prefix="train/")
    assert [r["step"] for r in read_metrics(path)] == [1]


def test_a_discarded_lock_leaves_no_file_and_one_who_opened_it_before_locks_the_path_again(tmp_path, monkeypatch):
    from dspy_p2o import run_dir as rd

    path = tmp_path / "run.lock"
    first = rd.RunLock(path).acquire()
    first.release(discard=True)  # a run that never claimed its directory
    assert not path.exists()

    # B opens run.lock while A holds it; A discards it and C takes the path before B's flock returns:
    # B, with the lock of a deleted file, must see that and find C holding the path.
    a, c = rd.RunLock(path).acquire(), rd.RunLock(path)
    real_flock, raced = rd.fcntl.flock, []

    def flock(fd, op):
        if op & rd.fcntl.LOCK_EX and not raced:
            raced.append(fd)
            a.release(discard=True)
            c.acquire()
        return real_flock(fd, op)

    monkeypatch.setattr(rd.fcntl, "flock", flock)
    with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()}"):
        rd.RunLock(path).acquire()
    assert raced and path.exists()
    c.release()
