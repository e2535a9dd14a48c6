"""Weight sync into a vLLM server: how `VLLMEngine.sync_weights` makes the server serve the
trainer's weights, and checks that it does.

- **reload** (`weight_sync="reload"`): save the FULL state dict as safetensors to a local
  dir (the tied `lm_head.weight` included: `save_pretrained` of a tied model omits it, and
  vLLM's in-place `reload_weights` then keeps the launch-time head, so the server would run
  the new body with the old head), then `POST /pause?mode=wait` -> `POST /collective_rpc`
  `reload_weights` -> `POST /reset_prefix_cache` -> `POST /resume` (needs
  VLLM_SERVER_DEV_MODE=1, which the managed server sets). The dir (`WeightDir`) lives in
  /dev/shm when it can, and is removed on close, at exit, and by the next run when a killed
  process left it behind.
- **nccl** (`weight_sync="nccl"`): vLLM's NCCL weight-transfer API (see `NCCLWeightSync`);
  it needs GPUs, so here only its API surface is tested against the installed vLLM.
- **adapter** (a LoRA policy, a peft module): only the adapter moves. It is saved (safetensors,
  a few MB) and loaded under a NEW name each sync (`POST /v1/load_lora_adapter`; the server runs
  with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING, see `VLLMServerOptions.max_lora_rank`),
  rollouts go to that name (`engine.served_model_name`) and the previous name is unloaded. A name
  never names other weights: vLLM keys its prefix cache by adapter name. An adapter vLLM cannot
  serve at run time (`lora.vllm_unservable`: DoRA, modules_to_save, biases, the embeddings or the
  head) is synced as merged full weights by reload instead, said once in the log.
- **Verified**: after a sync from a module, a fixed probe completion is sampled from the
  server and its served log-probs are compared with the module's own log-probs of the same
  tokens (one forward pass). "The output changed" is not "the output is right": a stale head
  changes the output too. Above `sync_tolerance` the transfer is retried once, then
  `WeightSyncError`; the difference is `SyncReport.logprob_diff` (a training metric).
- **Several trainer ranks** share one server: rank 0 syncs (its `source` must hold the FULL
  weights), the others wait at a torch.distributed barrier and then take the name rank 0 serves
  the weights under (a new adapter's).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from dspy_p2o import lora
from dspy_p2o.config import VLLMOptions
from dspy_p2o.engines.base import SyncReport
from dspy_p2o.engines.vllm_http import VLLMClient, VLLMRequestError

if TYPE_CHECKING:
    from dspy_p2o.engines.vllm import VLLMEngine

logger = logging.getLogger(__name__)

_PROBE_MESSAGES = [{"role": "user", "content": "Probe: say something."}]
_PROBE_TOKENS = 8
_WEIGHTS_PREFIX = "dspy-p2o-vllm-weights-"


class WeightSyncError(RuntimeError):
    """After a weight sync the server's log-probs still differ from the trainer's."""


class WeightSync:
    """The weight sync of one vLLM engine (`VLLMOptions`' weight_sync, verify_sync,
    sync_tolerance, sync_dir and reload_kwargs); `served_dtype` sets the default tolerance
    (1e-3 for a float32 server, 0.15 otherwise: bf16 serving differs by ~1e-2 legitimately)."""

    def __init__(self, engine: VLLMEngine, options: VLLMOptions, served_dtype: str) -> None:
        self.engine, self.client = engine, engine.client
        self.mode, self.verify = options.weight_sync, options.verify_sync
        self.tolerance = float(options.sync_tolerance) if options.sync_tolerance is not None else (
            1e-3 if str(served_dtype) in ("float32", "float") else 0.15)
        self.reload_kwargs = dict(options.reload_kwargs)
        self.weights_dir = WeightDir(options.sync_dir)
        self._nccl: NCCLWeightSync | None = None
        # LoRA: adapters are loaded as <served name>-lora-<random>-v<n>, unique to this engine
        self._adapter_prefix = f"{engine.served_model_name}-lora-{secrets.token_hex(3)}"
        self._adapter_saves = self._adapter_loads = 0
        self._live_adapter: tuple[str, str] | None = None  # (name, directory) the server serves now
        self._merged_said = False

    def sync(self, source: Any) -> SyncReport:
        """Serve `source` (a module, a state dict or a saved model dir); under torch.distributed
        rank 0 syncs and every rank waits for it at a barrier."""
        rank, world = _dist_rank_world()
        if world == 1:
            return self._sync(source)
        report = self._sync(source) if rank == 0 else SyncReport(weights_path="<rank 0>")
        import torch.distributed as dist

        dist.barrier()
        served = [self.engine.served_model_name]
        dist.broadcast_object_list(served, src=0)  # every rank's rollouts go where rank 0 synced to
        self.engine.served_model_name = served[0]
        return report

    def _sync(self, source: Any) -> SyncReport:
        start = time.perf_counter()
        how = self._how(_unwrap(source))
        written = 0
        if how == "adapter":
            path, written = self._save_adapter(_unwrap(source))
        elif how == "nccl":
            path = "<nccl>"
        else:
            path = self.materialise(source)
            if self.weights_dir.holds(path):
                written = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
        save_s = time.perf_counter() - start
        self._transfer(source, path, how)
        reload_s = time.perf_counter() - start - save_s
        diff, attempts = self._verify(source, path, how)
        report = SyncReport(seconds=time.perf_counter() - start, logprob_diff=diff, save_seconds=save_s,
                            reload_seconds=reload_s, attempts=attempts, weights_path=str(path), bytes_written=written)
        logger.info("vLLM weight sync (%s): %.2f s (save %.2f s, %.1f MB; load %.2f s), log-prob diff %s", how,
                    report.seconds, save_s, written / 1e6, reload_s, "n/a" if diff is None else f"{diff:.2e}")
        return report

    def _how(self, module: Any) -> str:
        """"adapter" (a LoRA adapter vLLM serves), else the configured weight_sync ("reload" or
        "nccl"); a LoRA adapter vLLM cannot serve goes as merged weights by "reload"."""
        if not lora.is_adapted(module):
            return self.mode
        reason = lora.vllm_unservable(module)
        if reason is None:
            return "adapter"
        if not self._merged_said:
            logger.warning("vLLM cannot serve this LoRA adapter at run time (%s): every weight sync sends the merged "
                           "full weights instead (reload)", reason)
            self._merged_said = True
        return "reload"

    def _transfer(self, source: Any, path: str, how: str) -> None:
        if how == "adapter":
            self._load_adapter(path)
            return
        self._drop_adapter()  # full weights are served under the base name
        if how == "nccl":
            self._nccl_sync(source)
        else:
            self._reload_from_disk(path)

    def _save_adapter(self, module: Any) -> tuple[str, int]:
        """The adapter alone, saved to a fresh directory of its own: (directory, bytes written)."""
        self._adapter_saves += 1
        target = self.weights_dir.fresh() / f"adapter-{self._adapter_saves}"
        shutil.rmtree(target, ignore_errors=True)
        return str(target), lora.save_pretrained(module, target)

    def _load_adapter(self, path: str) -> None:
        """Load the adapter at `path` under a new name, route requests to it, unload the previous one."""
        self._adapter_loads += 1
        name = f"{self._adapter_prefix}-v{self._adapter_loads}"
        self._lora_request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        previous, self._live_adapter = self._live_adapter, (name, path)
        self.engine.served_model_name = name
        if previous is not None:
            self._lora_request("/v1/unload_lora_adapter", {"lora_name": previous[0]})
            if previous[1] != path:
                shutil.rmtree(previous[1], ignore_errors=True)

    def _drop_adapter(self) -> None:
        """Requests go to the base name again; the adapter loaded last is unloaded."""
        if self._live_adapter is not None:
            name, path = self._live_adapter
            self._live_adapter, self.engine.served_model_name = None, self.engine.base_model_name
            self._lora_request("/v1/unload_lora_adapter", {"lora_name": name})
            shutil.rmtree(path, ignore_errors=True)

    def _lora_request(self, route: str, body: dict) -> None:
        try:
            self.client.request("POST", route, json=body, retries=0)
        except VLLMRequestError as exc:
            if exc.status not in (404, 405):
                raise
            raise VLLMRequestError(
                f"the vLLM server at {self.client.url} does not load LoRA adapters at run time ({route}: HTTP "
                f"{exc.status}); start it with --enable-lora --max-lora-rank <at least trainer.lora.r> and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (a managed server of a LoRA run is)",
                status=exc.status) from None

    def _verify(self, source: Any, path: str, how: str) -> tuple[float | None, int]:
        """(max log-prob difference, transfers made): one more transfer when the first is off."""
        module = _unwrap(source)
        if not (self.verify and _verifiable(source, module)):
            return None, 1
        diff, attempts = self.served_logprob_diff(module), 1
        if diff > self.tolerance:  # one more transfer: a transient failure must not end a run
            attempts = 2
            logger.warning("weight sync: served log-probs differ from the trainer's by %.3g; syncing again", diff)
            self._transfer(source, path, how)
            diff = self.served_logprob_diff(module)
        if diff > self.tolerance:
            raise WeightSyncError(
                f"after syncing weights into {self.engine!r} the served log-probs differ from the trainer's by "
                f"{diff:.3g} (> sync_tolerance {self.tolerance:g}): the server does not serve the trained weights")
        return diff, attempts

    def _reload_from_disk(self, path: str) -> None:
        if not (Path(path) / "config.json").is_file():  # vLLM's worker dies on a missing dir (500, then dead)
            raise FileNotFoundError(f"cannot reload weights from {path!r}: no config.json there")
        with paused(self.client):
            self.client.request("POST", "/collective_rpc", retries=0, json={
                "method": "reload_weights", "kwargs": {"weights_path": str(path), **self.reload_kwargs}})
            reset_prefix_cache(self.client)

    def _nccl_sync(self, source: Any) -> None:
        import torch

        module = _unwrap(source)
        if not isinstance(module, torch.nn.Module):
            raise TypeError("weight_sync='nccl' sends a module's parameters: pass the torch module, not a path "
                            "or a state dict")
        if self._nccl is None or self._nccl.module is not module:
            self._nccl = NCCLWeightSync(self.client, module)
        self._nccl.sync()

    def materialise(self, source: Any) -> str:
        """A local dir holding `source` as a loadable checkpoint (config + safetensors, every tensor)."""
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"cannot sync weights from {str(source)!r}: not a model directory")
            if not _lacks_tied_head(path):
                return str(path.resolve())
            source = _load_for_sync(path)  # tied and saved without lm_head.weight: write the full state dict
        target = self.weights_dir.fresh()
        module = _unwrap(source)
        if lora.is_adapted(module):  # base + adapter, merged: what a plain model of the adapted weights holds
            _save_state_dict(lora.merged_state_dict(module), target, config=module.get_base_model().config)
        elif hasattr(module, "state_dict") and hasattr(module, "config"):
            # the full state dict, NOT save_pretrained: a tied model's save omits lm_head.weight
            _save_state_dict(module.state_dict(), target, config=module.config)
        elif isinstance(source, Mapping):
            _save_state_dict(source, target, config=None, model=self.engine.model)
        else:
            raise TypeError(f"cannot sync weights from a {type(source).__name__}: pass a transformers module, "
                            "a state dict or a saved model directory")
        return str(target)

    def served_logprob_diff(self, module: Any) -> float:
        """max |served - trainer| log-prob over a fixed, seeded probe completion (T = 1, no filters)."""
        import torch

        prompt = self.engine.chat_prompt_ids(_PROBE_MESSAGES)
        completion = self.engine.generate([prompt], n=1, temperature=1.0, max_tokens=_PROBE_TOKENS,
                                          seed=1234)[0].completions[0]
        if not completion.token_ids:
            return 0.0
        ids = torch.tensor([prompt + completion.token_ids], device=next(module.parameters()).device)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                logits = module(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        finally:
            module.train(was_training)
        mine = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1).cpu()
        served = torch.tensor(completion.logprobs, dtype=torch.float32)
        return float((mine - served).abs().max())

    def close(self) -> None:
        try:
            if self._nccl is not None:
                self._nccl.close()
        finally:
            self.weights_dir.remove()


@contextlib.contextmanager
def paused(client: VLLMClient) -> Iterator[None]:
    """The server paused (in-flight requests finish first) while new weights go in."""
    client.request("POST", "/pause", params={"mode": "wait"})
    try:
        yield
    finally:  # never leave the server paused: every later request would hang
        client.request("POST", "/resume")


def reset_prefix_cache(client: VLLMClient, attempts: int = 5) -> None:
    """Drop the KV cache computed with the old weights."""
    for attempt in range(attempts):
        if client.request("POST", "/reset_prefix_cache").get("success", True):  # older vLLM answers an empty 200
            return
        time.sleep(0.2 * (attempt + 1))  # blocks still held by finishing requests
    raise VLLMRequestError("vLLM could not reset its prefix cache; stale KV from old weights may be reused")


class WeightDir:
    """Where weights are written for the server to reload: `path` when given (kept), else a
    private dir in /dev/shm (RAM: a 4B model saves in seconds) or the temp dir, named after
    this process so that a later process removes it if this one is killed; removed on
    `remove()` and at interpreter exit."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.owned = path is None
        _LIVE_DIRS.add(self)

    def fresh(self) -> Path:
        """The dir, created when needed, without the shards of a previous save."""
        if self.path is None:
            shm = Path("/dev/shm")
            root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
            _sweep_dead_weight_dirs(root)
            self.path = Path(tempfile.mkdtemp(prefix=f"{_WEIGHTS_PREFIX}{os.getpid()}-", dir=str(root)))
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.safetensors*"):  # a smaller save must not leave old shards behind
            stale.unlink()
        return self.path

    def holds(self, path: str | os.PathLike) -> bool:
        """Whether `path` is (inside) this dir: written by a sync, not a model dir synced from."""
        return self.path is not None and Path(path).resolve().is_relative_to(self.path.resolve())

    def remove(self) -> None:
        if self.owned and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


# Weight dirs of this interpreter: removed at exit, so a forgotten engine leaves nothing in /dev/shm.
_LIVE_DIRS: "weakref.WeakSet[WeightDir]" = weakref.WeakSet()


@atexit.register
def _remove_all() -> None:
    for weights in list(_LIVE_DIRS):
        weights.remove()


def _sweep_dead_weight_dirs(root: Path) -> None:
    """Remove weight dirs left by dead processes (a SIGKILLed trainer cannot clean /dev/shm itself)."""
    for path in root.glob(f"{_WEIGHTS_PREFIX}*"):
        pid = path.name[len(_WEIGHTS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NCCLWeightSync:
    """vLLM's NCCL weight transfer (server started with `--weight-transfer-config {"backend": "nccl"}`).

    Built on vLLM's own trainer-side API (vLLM >= 0.30: `vllm.distributed.weight_transfer`),
    as its RL examples use it:
      once:      `NCCLTrainerWeightTransferEngine.trainer_init(NCCLTrainerInitInfo(master_address,
                 master_port, world_size = 1 + server world size, rank=0), client=HTTPVLLMWeightSyncClient(url),
                 source=ModuleSource(module))` -- the trainer opens NCCL rank 0 while the client's
                 POST /init_weight_transfer_engine makes the vLLM workers join;
      each sync: POST /pause?mode=wait -> `send_weights()` (POST /start_weight_update, POST /update_weights
                 concurrently with the broadcast, POST /finish_weight_update) -> POST /reset_prefix_cache
                 -> POST /resume.
    It needs GPUs on both sides; tests/test_vllm_real.py checks every class, method and route
    used here against the installed vLLM. `ModuleSource` gathers FSDP DTensors itself.
    vLLM's HTTP client sends no API key: the RL routes are dev routes, unguarded by the key
    (the server binds to loopback).
    """

    def __init__(self, client: VLLMClient, module: Any, *, master_address: str = "127.0.0.1",
                 master_port: int | None = None, packed: bool = True) -> None:
        from dspy_p2o.engines.vllm_server import free_port

        self.client, self.module = client, module
        workers = int(client.request("GET", "/get_world_size", params={"include_dp": "true"}).get("world_size", 1))
        self.transfer = nccl_trainer_engine(client.url, module, master_address=master_address,
                                            master_port=master_port or free_port(master_address),
                                            world_size=1 + workers, packed=packed)

    def sync(self) -> None:
        with paused(self.client):
            self.transfer.send_weights()
            reset_prefix_cache(self.client)

    def close(self) -> None:
        self.transfer.shutdown()


def nccl_trainer_engine(url: str, module: Any, *, master_address: str, master_port: int, world_size: int,
                        packed: bool = True, connect: bool = True) -> Any:
    """vLLM's trainer-side NCCL engine for `module`, rank 0 of a group with the server's workers.

    `connect=False` returns the pieces unconnected ((init_info, client, source)) -- what a
    test can build without GPUs to check the API we call against the installed vLLM.
    """
    try:
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
    except ImportError as exc:
        raise ImportError("weight_sync='nccl' needs vLLM >= 0.30 importable in the trainer process "
                          "(pip install 'dspy_p2o[vllm]'); use weight_sync='reload' otherwise") from exc
    info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size,
                               packed=packed, rank=0)
    client, source = HTTPVLLMWeightSyncClient(url), ModuleSource(module)
    if not connect:
        return info, client, source
    return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)


# ---------------------------------------------------------------------- helpers
def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _unwrap(source: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed / accelerate wrappers (their `.module`)."""
    while not hasattr(source, "save_pretrained") and hasattr(source, "module"):
        source = source.module
    return source


def _lacks_tied_head(path: Path) -> bool:
    """A tied-embedding checkpoint without `lm_head.weight` (what `save_pretrained` writes for one)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if not getattr(getattr(config, "text_config", None) or config, "tie_word_embeddings", False):
        return False
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            if any(key.endswith("lm_head.weight") for key in handle.keys()):
                return False
    return True


def _load_for_sync(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")


def _verifiable(source: Any, module: Any) -> bool:
    """A module one rank can run a forward pass of alone (not FSDP-sharded: that forward is a collective)."""
    import torch

    if not isinstance(module, torch.nn.Module) or "FullyShardedDataParallel" in type(source).__name__:
        return False
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for p in module.parameters())


def _save_state_dict(state: Mapping[str, Any], target: Path, *, config: Any = None, model: str | None = None) -> None:
    """config.json (the module's, else the served model's) + model.safetensors with EVERY key.

    Tied tensors (embed_tokens / lm_head) are written once each, by copy: safetensors refuses
    shared storage, and vLLM's reload needs `lm_head.weight` present to update the head.
    """
    from safetensors.torch import save_file

    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    config.save_pretrained(target)
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        tensor = value.detach().contiguous().cpu()
        ptr = tensor.data_ptr()
        tensors[key] = tensor.clone() if ptr in seen else tensor  # safetensors refuses shared storage
        seen.add(ptr)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
