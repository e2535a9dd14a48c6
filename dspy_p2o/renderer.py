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


def program_input_fields(program: dspy.Module) -> list[str]:
    """The example fields a program is called with: the named parameters of its `forward`; when
    `forward` takes **kwargs, the input fields of the program's own signature (dspy.Predict,
    dspy.ReAct, dspy.ProgramOfThought) or of its only predictor (dspy.ChainOfThought). Otherwise
    a one-line error: the inputs cannot be known."""
    import inspect

    params = list(inspect.signature(type(program).forward).parameters.values())[1:]  # without self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if names or not any(p.kind == p.VAR_KEYWORD for p in params):
        return names
    signature = getattr(program, "signature", None)
    if isinstance(signature, type) and issubclass(signature, dspy.Signature):
        return list(signature.input_fields)
    named = predictors_of(program)
    if len(named) == 1:
        return list(named[0][1].signature.input_fields)
    raise ValueError(f"{type(program).__name__}.forward takes **kwargs and the program has no signature, so its "
                     "inputs cannot be known; give forward named parameters (def forward(self, question): ...)")


_NON_TEXT_TYPES = ("Image", "Audio", "File")  # DSPy types an adapter formats as non-text message parts


def _non_text(annotation: Any) -> str | None:
    """The name of a non-text DSPy type inside a field's annotation (list[dspy.Image] too), else None."""
    import typing

    for name in _NON_TEXT_TYPES:
        kind = getattr(dspy, name, None)
        if isinstance(annotation, type) and kind is not None and issubclass(annotation, kind):
            return name
    return next((found for arg in typing.get_args(annotation) if (found := _non_text(arg))), None)


def servable_predictors(program: dspy.Module) -> list[tuple[str, dspy.Predict]]:
    """The program's (name, predictor) pairs when the one policy LM can serve and train every call:
    no predictor with its own LM, no field the chat template cannot render as text. Otherwise a
    one-line error naming every predictor that cannot be served and why."""
    named = predictors_of(program)
    if not named:
        raise ValueError(f"{type(program).__name__} has no predictor: nothing for dspy_p2o to train")
    problems = []
    for name, predictor in named:
        if getattr(predictor, "lm", None) is not None:
            model = getattr(predictor.lm, "model", type(predictor.lm).__name__)
            problems.append(f"{name!r} has its own LM ({model}; set {name}.lm = None so the policy serves it)")
        fields = {**predictor.signature.input_fields, **predictor.signature.output_fields}
        for field_name, info in fields.items():
            kind = _non_text(info.annotation)
            if kind:
                problems.append(f"{name!r} has a dspy.{kind} field {field_name!r} (the policy is trained on text)")
    if problems:
        raise ValueError(f"dspy_p2o trains one policy LM serving every predictor of {type(program).__name__}; "
                         f"it cannot serve: {'; '.join(problems)}")
    return named


def single_predictor(program: dspy.Module) -> dspy.Predict:
    """The predictor of a one-predictor program, or a clear error naming the limitation."""
    named = predictors_of(program)
    if len(named) != 1:
        names = ", ".join(n for n, _ in named) or "none"
        raise ValueError(
            f"this needs a program with exactly one predictor; {type(program).__name__} has "
            f"{len(named)} ({names})"
        )
    return named[0][1]


class Renderer:
    """Renders one predictor's calls for a policy tokenizer and parses completions back.

    `demos=None` uses the predictor's own demos (as DSPy would); pass [] to drop them.
    `chat_template_kwargs` go to `apply_chat_template` (e.g. {"enable_thinking": False}).
    `name` is the predictor's name in its program (`named_predictors()`), recorded with its calls.
    """

    def __init__(
        self,
        predictor: dspy.Predict,
        tokenizer: Any,
        adapter: dspy.Adapter | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        *,
        name: str = "predict",
    ) -> None:
        check_chat_template(tokenizer)
        self.predictor, self.name = predictor, name
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


def program_renderers(program: dspy.Module, tokenizer: Any, adapter: dspy.Adapter | None = None,
                      chat_template_kwargs: Mapping[str, Any] | None = None) -> dict[str, "Renderer"]:
    """One Renderer per predictor of `program`, by its name (`named_predictors()`)."""
    return {name: Renderer(pred, tokenizer, adapter=adapter, chat_template_kwargs=chat_template_kwargs, name=name)
            for name, pred in predictors_of(program)}
