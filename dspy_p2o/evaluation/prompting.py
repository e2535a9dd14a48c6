"""The two ways a benchmark problem becomes a prompt, each with its matching answer extractor.

- `program`: the DSPy program's own prompt (rendered through `Renderer`, so evaluation
  sees exactly what DSPy serves) and its adapter's parser for the answer field.
- `raw`: the chat prompt of Qwen's maths evaluation -- the problem followed by the
  boxed-answer instruction as the user message -- and the last \\boxed{} as the answer,
  so numbers are comparable with published ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import dspy

from dspy_p2o.evaluation.scoring import AnswerExtractor, answer_field_of
from dspy_p2o.renderer import Renderer, chat_token_ids, make_adapter, single_predictor

PROMPT_MODES = ("program", "raw")
DEFAULT_PROGRAM = "math_cot"
RAW_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def raw_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question}\n{RAW_INSTRUCTION}"}]


@dataclass
class Prompting:
    mode: str
    render: Callable[[dspy.Example], list[int]]  # example -> prompt token ids
    extractor: AnswerExtractor
    description: dict[str, Any] = field(default_factory=dict)  # recorded in config.json / results.json


def load_program(program: str | dspy.Module | tuple[dspy.Module, str]) -> tuple[dspy.Module, str]:
    """A program object and a name for it, from a registry name or saved-program path, an object,
    or an already loaded (object, name) pair."""
    if isinstance(program, tuple):
        return program
    if isinstance(program, dspy.Module):
        return program, type(program).__name__
    if program in PROMPT_MODES:  # e.g. --program raw: the mode asked for in the wrong flag
        raise ValueError(f"{program!r} is a prompt mode, not a program: use --prompt {program}")
    from dspy_p2o.programs import get_program

    return get_program(program), str(program)


def make_prompting(
    mode: str,
    tokenizer: Any,
    *,
    program: str | dspy.Module | tuple[dspy.Module, str] = DEFAULT_PROGRAM,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    adapter: str = "chat",
) -> Prompting:
    kwargs = dict(chat_template_kwargs or {})
    if mode == "raw":
        def render(example: dspy.Example) -> list[int]:
            return chat_token_ids(tokenizer, raw_messages(example.question), **kwargs)

        return Prompting("raw", render, AnswerExtractor(None),
                         {"prompt": "raw", "instruction": RAW_INSTRUCTION, "chat_template_kwargs": kwargs})
    if mode == "program":
        module, name = load_program(program)
        renderer = Renderer(single_predictor(module), tokenizer, adapter=make_adapter(adapter),
                            chat_template_kwargs=kwargs)

        def render(example: dspy.Example) -> list[int]:
            return renderer.render(renderer.inputs_of(example)).token_ids

        extractor = AnswerExtractor(renderer.parse, answer_field_of(renderer.signature))
        description = {"prompt": "program", "program": name, "instruction": renderer.instruction,
                       "chat_template_kwargs": kwargs}
        if adapter != "chat":  # recorded only when set, so results written before the option still resume
            description["adapter"] = adapter
        return Prompting("program", render, extractor, description)
    raise ValueError(f"unknown prompt mode {mode!r}; choose one of {PROMPT_MODES}")
