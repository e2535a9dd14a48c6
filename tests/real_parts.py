"""Real parts (vLLM, the packaged SmolLM2 model) are required in CI: a missing one fails, never skips.

Locally (no `CI=true`) a test that needs a part you have not installed is skipped with the
install command; under CI the same test fails, so a green CI run proves the real part ran.
"""

import importlib.util
import os

import pytest


def require(module: str, install: str) -> None:
    """Skip (locally) or fail (CI=true) unless `module` is importable."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{module!r} is not installed ({install})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true requires every real part: {message}", pytrace=False)
    pytest.skip(message)
