"""Real parts (vLLM, the packaged SmolLM2 model) are required in CI: a missing one fails, never skips.

Locally (no `CI=true`) a test module that needs a part you have not installed is skipped with the
install command (`require` at module level: a real skip, not a collection error); under CI the same
module fails to collect, so a green CI run proves the real part ran (tests/test_real_parts.py).
"""

import importlib.util
import os

import pytest


def require(module: str, install: str) -> None:
    """Skip (locally) or fail (CI=true) unless `module` is importable: at a test module's top level
    (the whole module), or inside a test or fixture."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{module!r} is not installed ({install})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true requires every real part: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)
