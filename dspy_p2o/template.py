"""T(x, z)'s z: a template is a candidate program, one `Prompt` per predictor (a leaf module).

The paper's template is one prompt; here it is what GEPA's own candidate is, a program:
`{predictor name: instruction}` for one predictor or many alike, and each predictor's part may
carry demonstrations too (`Prompt.demos`: the few-shot optimizer's candidates). Nothing
downstream branches on the number of predictors. A templated call of predictor p is sampled
from the render of p's inputs under `template[p]` (its instruction and, when given, its demos);
the gradient is taken on the ORIGINAL render (the predictor's own instruction and demos).

JSON (templates/epoch-N.json, state.json): `{"<predictor>": {"instruction": "...", "demos":
[{field: value, ...}, ...]}}`, the "demos" key only where the template sets demos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

__all__ = ["Prompt", "Template"]


@dataclass(frozen=True)
class Prompt:
    """z_p: one predictor's part of a template."""

    instruction: str
    demos: tuple[dict[str, Any], ...] | None = None  # None: the predictor's own demos

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"instruction": self.instruction}
        if self.demos is not None:
            out["demos"] = [dict(d) for d in self.demos]
        return out

    @classmethod
    def from_json(cls, data: "str | Mapping[str, Any] | Prompt") -> "Prompt":
        if isinstance(data, Prompt):
            return data
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping) or not isinstance(data.get("instruction"), str):
            raise ValueError(f"a template's predictor part is an instruction or {{'instruction': ..., 'demos': [...]}}, "
                             f"got {data!r:.200}")
        demos = data.get("demos")
        return cls(data["instruction"], None if demos is None else tuple(dict(d) for d in demos))


class Template(Mapping[str, Prompt]):
    """z: {predictor name: Prompt}, in the program's predictor order. Immutable, hashable, equal by content."""

    __slots__ = ("_prompts", "_key")

    def __init__(self, prompts: Mapping[str, "Prompt | str | Mapping[str, Any]"]) -> None:
        if not prompts:
            raise ValueError("a template names at least one predictor")
        self._prompts = {str(name): Prompt.from_json(part) for name, part in prompts.items()}
        self._key = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, default=str)

    @classmethod
    def from_json(cls, data: "Template | Mapping[str, Any]") -> "Template":
        return data if isinstance(data, Template) else cls(data)

    @classmethod
    def from_candidate(cls, candidate: Mapping[str, str]) -> "Template":
        """GEPA's candidate (`dict[str, str]`: predictor name -> instruction)."""
        return cls({name: Prompt(text) for name, text in candidate.items()})

    def to_json(self) -> dict[str, Any]:
        return {name: part.to_json() for name, part in self._prompts.items()}

    def instructions(self) -> dict[str, str]:
        """GEPA's candidate form: {predictor name: instruction}."""
        return {name: part.instruction for name, part in self._prompts.items()}

    def __getitem__(self, name: str) -> Prompt:
        return self._prompts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prompts)

    def __len__(self) -> int:
        return len(self._prompts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Template({self.to_json()!r:.300})"
