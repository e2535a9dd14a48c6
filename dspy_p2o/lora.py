"""LoRA adapters with `peft`: wrap the policy, save the adapter, merge it, say what vLLM can serve.

A LoRA run (`trainer.lora`, config.LoraConfig) trains a low-rank update B A of chosen weight
matrices, W' = W + (alpha / r) B A, and leaves W frozen:

- `wrap` turns the policy into a `peft.PeftModel` (B = 0 at the start: the adapted model is
  the base model). Only A and B get gradients and optimiser state.
- pi_init -- the KL reference and Self-Ref's reflection -- is the same module under
  `model.disable_adapter()`: the base weights, never a second copy of them.
- `save_pretrained` writes the adapter alone (adapter_config.json + adapter_model.safetensors):
  what a checkpoint's `model/` holds, what `PeftModel.from_pretrained(base, dir)` and vLLM's
  `--lora-modules name=dir` load, and what a vLLM engine loads after every optimiser step.
- `vllm_unservable` names what keeps vLLM from serving an adapter at run time (DoRA,
  modules_to_save, trained biases, an adapter on the embeddings or the output head); the
  engine then syncs the merged full weights (`merged_state_dict`) instead.
- `merge_adapter` (the `dspy-p2o merge` command) writes base + adapter as one plain
  `save_pretrained` model.

A tied-embedding model (input embeddings = output head) whose head or embeddings are targeted
keeps them tied (peft's `ensure_weight_tying`): one update to the one matrix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

    from dspy_p2o.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a peft adapter


def wrap(module: Any, config: "LoraConfig") -> Any:
    """`module` (a transformers causal LM) with a fresh LoRA adapter: a `peft.PeftModel` whose only
    trainable parameters are the adapter's."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    text_config = getattr(module.config, "text_config", None) or module.config
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    embeddings = {id(module.get_input_embeddings()), id(module.get_output_embeddings())}
    tied_targeted = getattr(text_config, "tie_word_embeddings", False) and not isinstance(targets, str) and any(
        name.rsplit(".", 1)[-1] in targets for name, layer in module.named_modules() if id(layer) in embeddings)
    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM", ensure_weight_tying=tied_targeted)
    return get_peft_model(module, peft_config)


def is_adapted(module: Any) -> bool:
    """Whether `module` is a peft model (a LoRA run's policy)."""
    try:
        from peft import PeftModel
    except ImportError:  # no peft installed: nothing is adapted
        return False
    return isinstance(module, PeftModel)


def trainable_names(module: "torch.nn.Module") -> set[str]:
    """The names of the parameters that train (with an adapter: the adapter's)."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def save_pretrained(module: Any, directory: str | os.PathLike, state_dict: Mapping[str, Any] | None = None) -> int:
    """`module.save_pretrained(directory)`; for a peft model the adapter alone, never the base
    weights (peft would add the embedding matrices when they are targeted). Returns the bytes written."""
    directory = Path(directory)
    if is_adapted(module):
        module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)
    else:
        module.save_pretrained(directory, state_dict=state_dict)
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def load_adapter(module: Any, directory: str | os.PathLike) -> None:
    """The adapter weights `save_pretrained` wrote in `directory` into the live adapter of `module`;
    a checkpoint that lacks any of its trainable weights is refused (another adapter's, another rank)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{directory} is not a checkpoint of this LoRA adapter: it holds no {ADAPTER_CONFIG} "
                         f"(a full fine-tuning checkpoint?)")
    result = set_peft_model_state_dict(module, load_peft_weights(str(directory), device="cpu"))
    missing = sorted(trainable_names(module) & set(result.missing_keys))
    if missing:
        raise ValueError(f"{directory} is not a checkpoint of this LoRA adapter: it lacks {len(missing)} of its "
                         f"weights, e.g. {missing[0]!r}")


def vllm_unservable(module: Any) -> str | None:
    """Why vLLM cannot serve this adapter as a runtime-loaded LoRA, or None when it can (TRL
    falls back to merged weights for the same cases)."""
    config = module.peft_config[module.active_adapter]
    reasons = []
    if getattr(config, "use_dora", False):
        reasons.append("DoRA")
    if getattr(config, "modules_to_save", None):
        reasons.append(f"modules_to_save {sorted(config.modules_to_save)}")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        reasons.append("trained biases")
    base = module.get_base_model()
    heads = {id(base.get_input_embeddings()), id(base.get_output_embeddings())}
    adapted = sorted(name.rsplit(".", 1)[-1] for name, layer in base.named_modules()
                     if _is_tuner_layer(layer) and id(layer) in heads)
    if adapted:
        reasons.append(f"an adapter on {', '.join(adapted)}")
    return "; ".join(reasons) or None


def merged_state_dict(module: Any) -> dict[str, "torch.Tensor"]:
    """The adapted model's weights as a plain model's state dict (CPU tensors): W + (alpha / r) B A
    for every adapted layer (peft's own merge, DoRA's included), every other weight as it is. The
    live module is left exactly as it was: each layer is merged into a fresh tensor
    (`safe_merge`), copied out, and its original tensor put back."""
    base = module.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, layer in base.named_modules():
        if not _is_tuner_layer(layer) or layer.merged:
            continue
        params = layer.get_base_layer()._parameters
        original = {key: p.data for key, p in params.items() if p is not None}
        layer.merge(safe_merge=True)
        try:
            for key in original:
                merged[f"{name}.{key}"] = params[key].detach().to("cpu", copy=True)
        finally:
            for key, data in original.items():
                params[key].data = data
            layer.merged_adapters.clear()
    state = {}
    for key, value in base.state_dict().items():
        plain = _plain_key(key, module.active_adapter)
        if plain is not None:
            state[plain] = merged.get(plain, value)
    return state


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None) -> Path:
    """Write base + adapter as one plain `save_pretrained` model (float32, as full fine-tuning's
    checkpoints are) with its tokenizer, for `dspy-p2o eval --model` and anything that loads a
    model directory. `base`: the base model (default: the adapter's `base_model_name_or_path`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspy_p2o.engines.hf import check_model_path

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    base = base or recorded
    if not base:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass the base model (--base)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {str(out_dir)!r} is not empty")
    try:
        source = check_model_path(base)
    except FileNotFoundError as exc:
        hint = "" if base != recorded else "; pass --base"
        raise FileNotFoundError(f"{exc} (the adapter's base model{hint})") from None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32),
                                      str(adapter_dir))
    state = merged_state_dict(model)
    plain = model.unload()  # the base model without adapter layers (weights unchanged)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"merging {adapter_dir}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.save_pretrained(out_dir)
    has_tokenizer = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    AutoTokenizer.from_pretrained(str(adapter_dir if has_tokenizer else source)).save_pretrained(out_dir)
    return out_dir


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """A peft adapter directory's adapter_config.json; FileNotFoundError naming the directory when it has none."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    return json.loads(path.read_text())


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


# ---------------------------------------------------------------------- helpers
def _is_tuner_layer(layer: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(layer, BaseTunerLayer)


def _plain_key(key: str, adapter: str) -> str | None:
    """A peft base model's state-dict key as the plain model's (None: an adapter tensor or the
    frozen original of a modules_to_save copy): `q_proj.base_layer.weight` -> `q_proj.weight`,
    `lm_head.modules_to_save.<adapter>.weight` -> `lm_head.weight`."""
    parts = key.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    return key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
