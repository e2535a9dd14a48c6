"""Hugging Face helpers every engine and the trainer share: where a model is, how it loads, when it stops.

Light at import (torch and transformers load inside the functions), so the vLLM server
lifecycle can check a model path without pulling torch into a launcher process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dspy_p2o.config import DTYPES


def check_model_path(path: str | os.PathLike) -> str:
    """A local model directory (user-expanded), a hub id as given, or the cached directory of a
    packaged model named by its `dspy_p2o.models.PACKAGED_MODELS` key. A path that looks local
    but is not a directory is a FileNotFoundError naming it -- not Hugging Face's misleading
    "Repo id must be in the form ..." (nor vLLM's). A hub id is "org/name"; anything absolute,
    dotted, tilde'd, deeper or existing is a path."""
    path = str(path)
    from dspy_p2o.models import PACKAGED_MODELS, materialize

    if path in PACKAGED_MODELS and not Path(path).exists():  # e.g. "smollm2-135m-instruct": converted once, cached
        return str(materialize(path))
    looks_local = path.startswith((".", "/", "~")) or path.strip("/").count("/") > 1 or Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    return str(Path(path).expanduser()) if looks_local else path


def resolve_device(device: Any = None) -> Any:
    """A torch.device: the one asked for, else cuda when present, else cpu."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: Any, device: Any) -> Any:
    """bf16 on GPU, fp32 on CPU unless asked otherwise ("float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16")."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return getattr(torch, DTYPES[str(dtype)])


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The policy tokenizer; it must have a chat template (the renderer needs one)."""
    from transformers import AutoTokenizer

    from dspy_p2o.renderer import check_chat_template

    tokenizer = AutoTokenizer.from_pretrained(check_model_path(path))
    check_chat_template(tokenizer)
    return tokenizer


def load_model_and_tokenizer(path: str | os.PathLike, device: Any, dtype: Any) -> tuple[Any, Any]:
    """A causal LM (eval mode, on `device`) and its tokenizer from a local dir (or a hub id when online)."""
    from transformers import AutoModelForCausalLM

    path = check_model_path(path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    return model, tokenizer


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Every token that ends a completion: the tokenizer's EOS and the generation config's EOS ids.
    Raises when there is none: completions could never end."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(generation_config, "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    if not ids:
        raise ValueError("the tokenizer has no eos_token; completions could never end")
    return ids


def saved_generation_config(path: str | os.PathLike) -> Any:
    """generation_config.json of a saved model, or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return None
