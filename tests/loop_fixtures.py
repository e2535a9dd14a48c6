"""A small arithmetic world for loop tests: the format-trained tiny model, sums as questions."""

import json
import os
import random
import signal
import subprocess
import time

import dspy


def sum_examples(n: int, seed: int, prefix: str) -> list[dspy.Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append(dspy.Example(id=f"{prefix}/{i}", question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question"))
    return out


def write_jsonl(path, examples) -> None:
    path.write_text("".join(json.dumps({"problem": ex.question, "answer": ex.answer}) + "\n" for ex in examples))


def kill_in_epoch_two(cmd: list[str], run_dir, *, env: dict, timeout_s: float, cwd=None) -> dict:
    """Start a `dspy-p2o train` command as a shell starts a job (its own process group), and once a
    checkpoint inside epoch 2 exists SIGKILL that process group, as `kill -9 -PGID` does: the process
    itself, or torchrun (whose ranks run in sessions of their own). Asserts that every process of the
    run died with it (ranks and their helpers included) and that the run was stopped mid-epoch;
    returns the state.json it left."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    state_file = run_dir / "state.json"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if state.get("epoch") == 1 and state.get("phase") == "train" and state.get("batch", 0) >= 1:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    else:
        raise AssertionError(f"no checkpoint inside epoch 2 after {timeout_s} s")
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"processes of the killed run still running: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
    state = json.loads(state_file.read_text())
    assert (state["epoch"], state["phase"], state["done"]) == (1, "train", False) and state["batch"] >= 1, state
    return state


def assert_continued(run_dir, killed: dict) -> None:
    """A resumed run continued where the killed one stopped: the resume point recorded in
    resumes.jsonl is the killed run's state, and metrics.jsonl logs every batch and every optimiser
    step once (a run that restarted from scratch would log the first epoch's steps again)."""
    resumes = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    point = resumes[-1]["from"]
    # (resumes.jsonl numbers epochs from 1, as the console and the run's files do; state.json from 0)
    assert (point["epoch"], point["phase"], point["batch"]) == (killed["epoch"] + 1, killed["phase"], killed["batch"])
    assert point["step"] == killed["checkpoint_step"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batches = [(m["train/epoch"], m["train/batch"]) for m in records if "train/batch" in m]
    assert len(batches) == len(set(batches)), f"a batch was logged twice: {batches}"
    steps = [m["step"] for m in records if m.get("train/steps", 0) > 0]
    assert steps == sorted(set(steps)), f"an optimiser step was logged twice: {steps}"


def tiny_overrides(**extra) -> dict:
    """Settings that make a full P^2O run take seconds on CPU."""
    base = dict(epochs=2, batch_size=4, k=4, temperature=1.0, max_tokens=24, progress=False,
                reflection_max_tokens=48, lr=1e-3, min_hard=1, dev_size=2, budget=12, beam_width=2,
                num_threads=2, micro_batch_tokens=2048)
    base.update(extra)
    return base


def closeness_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """A graded reward (1 at the right sum, less the further off) so GRPO groups have variance."""
    try:
        return max(0.0, 1.0 - abs(int(str(pred.answer).strip()) - int(gold.answer)) / 10)
    except (TypeError, ValueError):
        return 0.0


def slow_closeness_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """closeness_metric taking 50 ms: keeps a tiny run inside each training batch long enough for a
    test to observe (and SIGKILL) it mid-epoch; at full speed a whole epoch fit between two polls."""
    time.sleep(0.05)
    return closeness_metric(gold, pred)


def sum_program():
    """The program the format model was taught (see conftest.format_model_dir)."""
    return dspy.ChainOfThought("question -> answer")


def rank_recording_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """0.9 x slow_closeness_metric (never a full 1, so with tau=1 every question is hard), appending this
    process's rank (torchrun's RANK) to the file named by $P2O_TEST_METRIC_LOG, one line per call: who
    scored what in a multi-process run."""
    import os

    if os.environ.get("P2O_TEST_METRIC_LOG"):
        with open(os.environ["P2O_TEST_METRIC_LOG"], "a", encoding="utf-8") as f:
            f.write(os.environ.get("RANK", "0") + "\n")
    return 0.9 * slow_closeness_metric(gold, pred)


def write_train_config(path, policy, train_file, metric: str, val_file=None, **overrides) -> None:
    """A `dspy-p2o train` YAML config from tiny_overrides-style flat settings (nested where they belong)."""
    import yaml

    sections = {"lr": "trainer", "micro_batch_tokens": "trainer", "min_hard": "prompt", "dev_size": "prompt",
                "budget": "prompt", "beam_width": "prompt", "num_threads": "prompt"}
    flat = {"policy": str(policy), "trainer": {}, "prompt": {},
            "data": {"train": str(train_file), "metric": metric, "program": "loop_fixtures:sum_program",
                     "val": str(val_file) if val_file else None}}
    for key, value in tiny_overrides(**overrides).items():
        (flat[sections[key]] if key in sections else flat)[key] = value
    path.write_text(yaml.safe_dump(flat))
