"""The trained program, served as it was trained: with the run's DSPy adapter when called plainly.

DSPy picks a predictor's adapter from its settings (`dspy.configure` / `dspy.context`), not from
the predictor. A program trained with `adapter: json` would be served with DSPy's default chat
format unless every call were wrapped in `dspy.context(adapter=...)`. `serve_with_adapter` gives
the program's own class a thin subclass whose calls enter that context, unless the caller set
an adapter themselves; everything else (isinstance, named_predictors, save/load, deepcopy) is the
program's own.
"""

from __future__ import annotations

import functools
from typing import Any

import dspy

__all__ = ["serve_with_adapter"]


class _ServedWithAdapter:
    """Mixin: `__call__` / `acall` run under the program's serving adapter (`_dspy_p2o_adapter`)."""

    _dspy_p2o_adapter: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if dspy.settings.adapter is not None or self._dspy_p2o_adapter is None:
            return super().__call__(*args, **kwargs)
        with dspy.context(adapter=self._dspy_p2o_adapter):
            return super().__call__(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        if dspy.settings.adapter is not None or self._dspy_p2o_adapter is None:
            return await super().acall(*args, **kwargs)
        with dspy.context(adapter=self._dspy_p2o_adapter):
            return await super().acall(*args, **kwargs)


@functools.cache
def _served_class(cls: type) -> type:
    return type(cls)(cls.__name__, (_ServedWithAdapter, cls), {"__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__})


def serve_with_adapter(program: dspy.Module, adapter: Any) -> dspy.Module:
    """`program` (in place, and returned) answering with `adapter` when no adapter is set by the caller."""
    if not isinstance(program, _ServedWithAdapter):
        program.__class__ = _served_class(type(program))
    program._dspy_p2o_adapter = adapter
    return program
