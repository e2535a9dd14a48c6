"""The program registry: built-in DSPy programs and loading user programs by name or path.

Example programs to copy live in the repository's top-level `programs/` folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import dspy

__all__ = ["BUILTIN_PROGRAMS", "MathCoT", "MathSignature", "get_program"]


class MathSignature(dspy.Signature):
    """Solve the maths problem step by step, then give the final answer."""

    question: str = dspy.InputField(desc="a maths problem")
    answer: str = dspy.OutputField(
        desc="the final answer only: a number or a LaTeX expression, with no units or words"
    )


class MathCoT(dspy.Module):
    """Chain-of-thought maths solver: ``question -> reasoning, answer``."""

    def __init__(self) -> None:
        super().__init__()
        self.cot = dspy.ChainOfThought(MathSignature)

    def forward(self, question: str) -> dspy.Prediction:
        return self.cot(question=question)


#: Names :func:`get_program` builds itself.
BUILTIN_PROGRAMS = {"math_cot": MathCoT}


def get_program(name_or_path: str) -> dspy.Module:
    """A DSPy program from a built-in name or an import spec.

    - ``"math_cot"``: :class:`MathCoT`;
    - ``"path/to/file.py:attr"`` or ``"package.module:attr"``: ``attr`` (dotted
      names work) is a ``dspy.Module`` instance, or a class/factory called with no
      arguments that returns one.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"program must be a non-empty string, got {name_or_path!r}")
    spec = name_or_path.strip()
    if spec in BUILTIN_PROGRAMS:
        return BUILTIN_PROGRAMS[spec]()
    if ":" not in spec:
        raise ValueError(
            f"unknown program {spec!r}: use one of {', '.join(BUILTIN_PROGRAMS)}, "
            "'path/to/file.py:attr' or 'package.module:attr'"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"program spec {spec!r} must look like 'file.py:attr' or 'module:attr'")
    obj = _resolve_attr(_import_target(target, spec), attr, spec)
    return _as_module(obj, spec)


def _import_target(target: str, spec: str) -> Any:
    """Import a module given as a file path or a dotted module name."""
    path = Path(target).expanduser()
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"program file not found: {path} (from {spec!r})")
        return _import_file(path.resolve())
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ImportError(f"cannot import module {target!r} for program {spec!r}: {exc}") from exc


def _import_file(path: Path) -> Any:
    # A name unique per path, so two files called program.py do not collide.
    name = f"dspy_p2o_user_program_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load a Python module from {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec: dataclasses/pickle look the module up
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _resolve_attr(module: Any, attr: str, spec: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _as_module(obj: Any, spec: str) -> dspy.Module:
    if isinstance(obj, dspy.Module):
        return obj
    if not callable(obj):
        raise TypeError(f"{spec!r} is a {type(obj).__name__}, not a dspy.Module or a factory returning one")
    program = obj()
    if not isinstance(program, dspy.Module):
        raise TypeError(f"{spec!r} returned a {type(program).__name__}, not a dspy.Module")
    return program
