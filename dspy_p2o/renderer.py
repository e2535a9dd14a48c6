"""The one place that turns a DSPy predictor call into chat messages and token ids.

Training, GEPA and evaluation all render through here, so what is trained is exactly
what DSPy serves: the messages come from DSPy's own ChatAdapter and the token ids from
the policy tokenizer's chat template. T(x, z) -- the templated input of P^2O -- is the
same render with the predictor's instruction replaced by the template z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import dspy

from dspy_p2o.config import ADAPTERS  # DSPy adapters a run can render (and reward) with, by config name


class ChatTemplateError(ValueError):
    """The tokenizer cannot render chat messages."""


def check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat template; dspy_p2o renders DSPy's chat messages with it. "
            "Set tokenizer.chat_template (e.g. copy the base model's) and save the tokenizer again."
        )


def chat_token_ids(tokenizer: Any, messages: list[dict[str, str]], **template_kwargs: Any) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt."""
    check_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    # The template already wrote any BOS token; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_adapter(name: str) -> dspy.Adapter:
    """DSPy's adapter by name: "chat" (DSPy's default format, here without its JSON fallback, so a
    rollout is rewarded only for what that format parses), "json" or "xml".

    Small models may write one format far more reliably than another (SmolLM2-135M-Instruct:
    JSON, see benchmarks/RESULTS.md); serve the trained program with the same adapter
    (`dspy.context(adapter=result.adapter)`).
    """
    if name == "chat":
        return dspy.ChatAdapter(use_json_adapter_fallback=False)
    if name == "json":
        return dspy.JSONAdapter()
    if name == "xml":
        return dspy.XMLAdapter()
    raise ValueError(f"unknown adapter {name!r}; use one of {', '.join(ADAPTERS)}")


@dataclass(frozen=True)
class RenderedPrompt:
    messages: list[dict[str, str]]
    token_ids: list[int]
    instruction: str


def predictors_of(program: dspy.Module) -> list[tuple[str, dspy.Predict]]:
    """(name, predictor) pairs of a DSPy program, in DSPy's own order."""
    return list(program.named_predictors())


def single_predictor(program: dspy.Module) -> dspy.Predict:
    """The predictor of a one-predictor program, or a clear error naming the limitation."""
    named = predictors_of(program)
    if len(named) != 1:
        names = ", ".join(n for n, _ in named) or "none"
        raise ValueError(
            f"dspy_p2o trains programs with exactly one predictor; {type(program).__name__} has "
            f"{len(named)} ({names}). Compile each predictor's sub-program separately."
        )
    return named[0][1]


class Renderer:
    """Renders one predictor's calls for a policy tokenizer and parses completions back.

    `demos=None` uses the predictor's own demos (as DSPy would); pass [] to drop them.
    `chat_template_kwargs` go to `apply_chat_template` (e.g. {"enable_thinking": False}).
    """

    def __init__(
        self,
        predictor: dspy.Predict,
        tokenizer: Any,
        adapter: dspy.Adapter | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        check_chat_template(tokenizer)
        self.predictor = predictor
        self.tokenizer = tokenizer
        self.adapter = adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    @property
    def signature(self) -> type[dspy.Signature]:
        return self.predictor.signature

    @property
    def instruction(self) -> str:
        return self.signature.instructions

    @property
    def input_fields(self) -> list[str]:
        return list(self.signature.input_fields)

    def inputs_of(self, example: Any) -> dict[str, Any]:
        """The predictor's input fields taken from an example, with a clear error when one is missing."""
        data = example.inputs().toDict() if isinstance(example, dspy.Example) and example._input_keys else dict(example)
        missing = [f for f in self.input_fields if f not in data or data[f] is None]
        if missing:
            ident = data.get("id") or (example.get("id") if hasattr(example, "get") else None)
            where = f"example {ident!r}" if ident else f"example {dict(list(data.items())[:3])!r}"
            raise ValueError(f"{where} lacks the program's input field(s) {missing}; it has {sorted(data)}")
        return {f: data[f] for f in self.input_fields}

    def messages(self, inputs: Mapping[str, Any], instruction: str | None = None, demos: list | None = None) -> list[dict[str, str]]:
        signature = self.signature if instruction is None else self.signature.with_instructions(instruction)
        demos = self.predictor.demos if demos is None else demos
        return self.adapter.format(signature, demos, dict(inputs))

    def render(self, inputs: Mapping[str, Any], instruction: str | None = None, demos: list | None = None) -> RenderedPrompt:
        """x (instruction=None) or T(x, z) (instruction=z) as messages and token ids."""
        messages = self.messages(inputs, instruction, demos)
        ids = chat_token_ids(self.tokenizer, messages, **self.chat_template_kwargs)
        return RenderedPrompt(messages, ids, instruction if instruction is not None else self.instruction)

    def parse(self, completion: str) -> dict[str, Any] | None:
        """The output fields of a completion, or None when it does not follow the adapter's format."""
        try:
            return self.adapter.parse(self.signature, completion)
        except Exception:  # DSPy raises AdapterParseError (and others) for malformed output
            return None

    def prediction(self, completion: str) -> dspy.Prediction:
        """A Prediction for the metric; output fields are None when the completion did not parse."""
        fields = self.parse(completion)
        if fields is None:
            return dspy.Prediction(**{name: None for name in self.signature.output_fields})
        return dspy.Prediction(**fields)
