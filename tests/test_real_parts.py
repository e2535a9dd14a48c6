"""`real_parts.require`: a missing real part skips a test module locally and fails it under CI=true."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

NEEDS_MISSING_PART = '''
from real_parts import require

require("dspy_p2o_no_such_module", "pip install dspy-p2o-no-such-module")


def test_uses_the_part():
    assert False, "ran without its real part"
'''


def _pytest(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    """pytest on a suite of two modules, one of them needing a part that is not installed."""
    (tmp_path / "test_needs_part.py").write_text(NEEDS_MISSING_PART)
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
def test_a_missing_part_skips_the_module_locally_with_the_install_command(tmp_path, ci):
    done = _pytest(tmp_path, ci)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 passed, 1 skipped" in done.stdout and "error" not in done.stdout.lower(), done.stdout[-2000:]
    assert "'dspy_p2o_no_such_module' is not installed (pip install dspy-p2o-no-such-module)" in done.stdout


def test_a_missing_part_fails_under_ci(tmp_path):
    done = _pytest(tmp_path, "true")
    assert done.returncode != 0 and "skipped" not in done.stdout, done.stdout[-2000:]
    assert "CI=true requires every real part: 'dspy_p2o_no_such_module' is not installed" in done.stdout
