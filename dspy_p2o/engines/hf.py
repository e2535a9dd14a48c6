"""Hugging Face utilities every engine and the trainer share: where a model is, how it loads, when it stops.

Light at import (torch and transformers load inside the functions), so the vLLM server
lifecycle can check a model path without pulling torch into a launcher process.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from dspy_p2o.config import DTYPES


def check_model_path(path: str | os.PathLike) -> str:
    """A local model directory (user-expanded), a hub id as given, or the cached directory of a
    packaged model named by its `dspy_p2o.models.PACKAGED_MODELS` key. A path that looks local
    but is not a directory is a FileNotFoundError naming it -- not Hugging Face's misleading
    "Repo id must be in the form ..." (nor vLLM's). A hub id is "org/name"; anything absolute,
    dotted, tilde'd, deeper or existing is a path. A hub id must be in the local hub cache or,
    when the hub can be reached, on the hub (`check_hub_model`)."""
    path = str(path)
    from dspy_p2o.models import PACKAGED_MODELS, materialize

    if path in PACKAGED_MODELS and not Path(path).exists():  # e.g. "smollm2-135m-instruct": converted once, cached
        return str(materialize(path))
    looks_local = path.startswith((".", "/", "~")) or path.strip("/").count("/") > 1 or Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if looks_local and (Path(path).expanduser() / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path!r} is a LoRA adapter, not a model directory; merge it into its base model "
                                f"first: dspy-p2o merge --adapter {path} --out MERGED_DIR")
    if looks_local:
        return str(Path(path).expanduser())
    check_hub_model(path)
    return path


@functools.lru_cache(maxsize=None)  # a model found once is not asked for again (a failure is not cached)
def check_hub_model(repo_id: str) -> None:
    """A FileNotFoundError at once, in one line naming the packaged models with a "did you mean",
    when `repo_id` is neither in the local hub cache nor on the hub -- when the hub is offline
    (HF_HUB_OFFLINE=1), cannot be reached, or has no such model -- instead of transformers' retries
    and chained connection errors. A gated or private model is left to transformers (a token may open it)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    from dspy_p2o.models import unknown_model_hint

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: loads offline
    offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()
    if offline:
        why = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and its cache has no such model"
    else:
        try:
            huggingface_hub.model_info(repo_id, timeout=HUB_CHECK_TIMEOUT_S)
            return
        except errors.GatedRepoError:
            return
        except (errors.RepositoryNotFoundError, errors.HFValidationError):
            why = "the Hugging Face hub has no such model"
        except Exception as exc:  # connection refused, no DNS, timeout, proxy: the hub cannot be reached
            why = f"the Hugging Face hub cannot be reached ({type(exc).__name__}) and its cache has no such model"
    raise FileNotFoundError(f"model {repo_id!r} is neither a model directory nor a packaged model"
                            f"{unknown_model_hint(repo_id)}, and {why}")


HUB_CHECK_TIMEOUT_S = 10.0  # one request to the hub's model API; transformers retries for ~30 s unreachable


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
