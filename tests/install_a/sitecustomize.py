"""Makes this interpreter look like an install without some packages (the README's install (a),
`pip install -e .`, has none of the test extras): `DSPY_P2O_HIDE_PACKAGES=tensorboard,vllm,...` cannot
be imported, and `importlib.util.find_spec` does not find them. tests/test_readme.py puts this folder
first on PYTHONPATH to run the README's commands under the install they name."""

import importlib.abc
import importlib.util
import os
import sys

HIDDEN = tuple(filter(None, os.environ.get("DSPY_P2O_HIDE_PACKAGES", "").split(",")))


def _hidden(name: str) -> bool:
    return name.split(".")[0] in HIDDEN


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if HIDDEN:
    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: None if _hidden(name) else _find_spec(name, package)
    sys.meta_path.insert(0, _Hide())
