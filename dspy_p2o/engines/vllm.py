"""The GPU engine: the policy served by vLLM, spoken to over its OpenAI-compatible HTTP API.

- **Server**: a managed `vllm serve` subprocess (see `vllm_server.VLLMServer`), or an
  already running server when `url=` is given (attach mode; we never stop it).
- **Rollouts**: one `POST /v1/completions` per prompt with the prompt as token ids and
  `n` samples (vLLM prefills once and forks), every sampling parameter explicit
  (`max_tokens` above all: vLLM's default is 16), `logprobs: 0` and
  `return_token_ids: true`. The server runs with `--logprobs-mode processed_logprobs`,
  so `choices[i].logprobs.token_logprobs` are the log-probs of the distribution each
  token was sampled from -- the behaviour log-probs the trainer needs. Requests run
  concurrently over a pooled HTTP client (vLLM batches them continuously); connection
  failures are retried with back-off, and outputs come back in prompt order.
- **DSPy LM**: litellm's `hosted_vllm/` provider on `/v1/chat/completions`, which sends
  a real `n` (DSPy's default route sends n separate requests), cache off.
- **Weight sync** (`weight_sync="reload"`): save the FULL state dict as safetensors to a
  local dir (the tied `lm_head.weight` included: `save_pretrained` of a tied model omits
  it, and vLLM's in-place `reload_weights` then keeps the launch-time head, so the server
  would run the new body with the old head), then `POST /pause?mode=wait` ->
  `POST /collective_rpc` `reload_weights` -> `POST /reset_prefix_cache` -> `POST /resume`
  (needs VLLM_SERVER_DEV_MODE=1, which the managed server sets).
  **Verified**: after a sync from a module, a fixed probe completion is sampled from the
  server and its served log-probs are compared with the module's own log-probs of the same
  tokens (one forward pass). "The output changed" is not "the output is right": a stale
  head changes the output too. Above `sync_tolerance` the reload is retried once, then
  `WeightSyncError`; the difference is `SyncReport.logprob_diff` (a training metric).
  `weight_sync="nccl"`: vLLM's NCCL weight-transfer API (see `NCCLWeightSync`); it needs
  GPUs, so here only its API surface is tested against the installed vLLM.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import httpx
from tqdm.auto import tqdm

from dspy_p2o.config import VLLMOptions
from dspy_p2o.engines.base import Completion, Engine, GenerationOutput, SamplingParams
from dspy_p2o.engines.hf import eos_token_ids, load_tokenizer, saved_generation_config
from dspy_p2o.engines.vllm_server import VLLMServer, VLLMServerError

logger = logging.getLogger(__name__)

# Transient failures worth retrying: the connection broke, or a proxy/server said "try again".
_RETRY_STATUS = {502, 503, 504}
_PROBE_MESSAGES = [{"role": "user", "content": "Probe: say something."}]
_PROBE_TOKENS = 8
_WEIGHTS_PREFIX = "dspy-p2o-vllm-weights-"


class VLLMRequestError(RuntimeError):
    """The vLLM server rejected a request or could not be reached after retries."""


class WeightSyncError(RuntimeError):
    """After a weight sync the server's log-probs still differ from the trainer's."""


@dataclass
class SyncReport:
    """What one weight sync did and cost."""

    weights_path: str
    seconds: float  # total wall time, save and verification included
    save_seconds: float
    reload_seconds: float  # pause -> reload -> reset cache -> resume
    #: max |served log-prob - trainer log-prob| over the probe's tokens; None when not verified
    #: (sync from a path or a state dict, verify_sync=False, or a rank that did not sync)
    logprob_diff: float | None = None
    attempts: int = 1


class VLLMEngine(Engine):
    """Policy served by vLLM.

    Args:
        model: the model dir or hub id the server loads (its tokenizer is loaded here too).
        options: `config.VLLMOptions` -- attach to `url` or launch a managed server (its
            `VLLMServerOptions` part), the HTTP client's timeouts, concurrency and retries, and
            the weight sync (`weight_sync`, `verify_sync`, `sync_tolerance`, `sync_dir`,
            `reload_kwargs`). Its `reference` is read by `engines.make_reference_engine`, not here.
        frozen: a reference server (e.g. the initial model for self-reflection): sync_weights refuses.
        tokenizer: the model's tokenizer when already loaded.
    """

    def __init__(self, model: str | os.PathLike, options: VLLMOptions | None = None, *, frozen: bool = False,
                 tokenizer: Any = None, name: str | None = None) -> None:
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(
                f"VLLMEngine needs the model dir or hub id the server loads, got {type(model).__name__}; "
                "save the module with save_pretrained and pass the directory")
        options = options if options is not None else VLLMOptions()
        self.options = options
        self.model = str(model)
        self.weight_sync = options.weight_sync
        self.verify_sync = options.verify_sync
        self.sync_tolerance = options.sync_tolerance
        self.max_concurrency = int(options.max_concurrency)
        self.max_retries = int(options.max_retries)
        self.reload_kwargs = dict(options.reload_kwargs)
        self.frozen = bool(frozen)
        self.name = name or Path(self.model.rstrip("/")).name or "policy"
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model)
        try:
            self.eos_ids = eos_token_ids(self.tokenizer, saved_generation_config(self.model))
        except ValueError as exc:
            raise ValueError(f"{self.model!r}: {exc}") from None
        self.server: VLLMServer | None = None
        self._closed = False
        self._sync_dir = Path(options.sync_dir) if options.sync_dir is not None else None
        self._owns_sync_dir = options.sync_dir is None
        self._nccl: NCCLWeightSync | None = None
        self.last_sync: SyncReport | None = None

        self.served_dtype = options.dtype
        if options.url is None:
            self.server = VLLMServer(self.model, options,
                                     weight_transfer_backend="nccl" if options.weight_sync == "nccl" else None)
            self.served_dtype = self.server.dtype
            self.server.start()
            self.url, self.api_key = self.server.url, self.server.api_key
        else:
            self.url, self.api_key = options.url.rstrip("/"), options.api_key or os.environ.get("VLLM_API_KEY")
            if self.url.endswith("/v1"):
                self.url = self.url[:-3]
        self.client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {},
            timeout=httpx.Timeout(options.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency),
        )
        try:
            if self.server is None and not self.health():
                raise VLLMRequestError(f"no vLLM server answers at {self.url}/health; is it running (and is the URL "
                                       "the server root, e.g. http://127.0.0.1:8000)?")
            self.served_model_name, self.max_model_len = self._discover_model()
        except BaseException:
            self.close()
            raise
        _LIVE_ENGINES.add(self)

    # ------------------------------------------------------------------ HTTP
    def _discover_model(self) -> tuple[str, int | None]:
        """The served model's name and context length (`max_model_len`, None if the server does not say)."""
        data = self._request("GET", "/v1/models", retries=2).get("data") or []
        if not data:
            raise VLLMRequestError(f"the vLLM server at {self.url} serves no model")
        wanted = self.server.served_model_name if self.server is not None else None
        entry = next((d for d in data if d.get("id") == wanted), data[0])
        length = entry.get("max_model_len")
        return str(wanted or entry["id"]), int(length) if length else None

    def _request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                 retries: int | None = None) -> dict:
        """One HTTP call with retries on connection failures and 502/503/504; JSON body back ({} if empty)."""
        attempts = 1 + (self.max_retries if retries is None else retries)
        for attempt in range(attempts):
            self._check_server()
            try:
                response = self.client.request(method, path, json=json, params=params)
            except httpx.TimeoutException as exc:
                raise VLLMRequestError(
                    f"{method} {self.url}{path} timed out ({type(exc).__name__}); raise request_timeout_s "
                    "for long generations") from exc
            except httpx.TransportError as exc:  # refused, reset, closed without a response
                if attempt == attempts - 1:
                    self._check_server()
                    raise VLLMRequestError(
                        f"{method} {self.url}{path} failed after {attempts} attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                self._backoff(attempt, f"{type(exc).__name__}: {exc}", path)
                continue
            if response.status_code in _RETRY_STATUS and attempt < attempts - 1:
                self._backoff(attempt, f"HTTP {response.status_code}", path)
                continue
            if response.status_code >= 400:
                raise VLLMRequestError(
                    f"{method} {self.url}{path} -> HTTP {response.status_code}: {_error_message(response)}")
            return response.json() if response.content else {}
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, why: str, path: str) -> None:
        delay = min(30.0, 0.25 * 2 ** attempt) * (0.5 + random.random())  # jitter: don't retry in lockstep
        logger.warning("vLLM %s: %s; retrying in %.1f s (attempt %d/%d)", path, why, delay, attempt + 1,
                       self.max_retries)
        time.sleep(delay)

    def _check_server(self) -> None:
        """A managed server that died makes every request fail: say so, with its log."""
        if self.server is not None and not self.server.alive() and not self._closed:
            raise VLLMServerError(
                f"the managed vLLM server died (exit code {self.server.process.poll()}).\n"
                f"Last lines of {self.server.log_path}:\n{self.server.log_tail()}")

    def health(self) -> bool:
        try:
            return self.client.get("/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    # ------------------------------------------------------------------ generation
    def _check_prompt(self, index: int, prompt: list[int], params: SamplingParams) -> None:
        if self.max_model_len and len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt {index} ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the server's "
                f"context length (max_model_len {self.max_model_len}); lower max_tokens or serve a longer max_model_len")

    def _generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                  progress: bool) -> list[GenerationOutput]:
        base = {
            "model": self.served_model_name,
            "n": n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else 0,  # 0 disables top-k in vLLM
            "max_tokens": params.max_tokens,  # never leave vLLM's default of 16
            "stop": list(params.stop),
            # the model's EOS ids explicitly: with --generation-config vllm the server ignores
            # generation_config.json's extra EOS tokens (e.g. Qwen's <|endoftext|>)
            "stop_token_ids": sorted(self.eos_ids | set(params.stop_token_ids)),
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,  # same text as the local engine
        }
        outputs: list[GenerationOutput | None] = [None] * len(prompts)

        def run(i: int) -> tuple[int, GenerationOutput]:
            body = {**base, "prompt": prompts[i]}
            if params.seed is not None:  # distinct but reproducible streams per prompt
                body["seed"] = params.seed + i
            return i, self._parse_completion(self._request("POST", "/v1/completions", json=body), prompts[i], n)

        bar = tqdm(total=len(prompts), desc="vllm generate", unit="prompt", leave=False, disable=not progress)
        workers = min(self.max_concurrency, len(prompts)) or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vllm-rollout") as pool:
            futures = [pool.submit(run, i) for i in range(len(prompts))]
            try:
                for future in as_completed(futures):
                    i, out = future.result()
                    outputs[i] = out
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            finally:
                bar.close()
        return outputs  # type: ignore[return-value]

    def _parse_completion(self, response: dict, prompt: list[int], n: int) -> GenerationOutput:
        choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise VLLMRequestError(f"asked vLLM for n={n} samples, got {len(choices)} choices")
        completions = []
        for choice in choices:
            token_ids = choice.get("token_ids")
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if token_ids is None or logprobs is None:
                raise VLLMRequestError(
                    "the vLLM response lacks token_ids or logprobs.token_logprobs; the server must support "
                    "`return_token_ids` (vLLM >= 0.10.2) and `logprobs`")
            if len(token_ids) != len(logprobs):
                raise VLLMRequestError(f"vLLM returned {len(token_ids)} tokens but {len(logprobs)} log-probs")
            reason = choice.get("finish_reason")
            if reason not in ("stop", "length"):
                raise VLLMRequestError(
                    f"vLLM finished a sample with finish_reason={reason!r} (aborted?); was the server paused "
                    "with mode=abort during generation?")
            completions.append(Completion(
                token_ids=[int(t) for t in token_ids],
                text=choice.get("text") or "",
                logprobs=[float(x) if x is not None else -math.inf for x in logprobs],
                finish_reason=reason,
            ))
        return GenerationOutput(prompt_token_ids=list(prompt), completions=completions)

    # ------------------------------------------------------------------ DSPy
    def dspy_lm(self, *, temperature: float = 1.0, max_tokens: int = 512, **kwargs: Any):
        """A cache-free `dspy.LM` on the server's chat endpoint that sends a real `n` (litellm's hosted_vllm)."""
        import dspy

        return dspy.LM(
            f"hosted_vllm/{self.served_model_name}", api_base=f"{self.url}/v1", api_key=self.api_key or "EMPTY",
            engine="litellm", cache=False, temperature=temperature, max_tokens=max_tokens,
            num_retries=kwargs.pop("num_retries", self.max_retries), **kwargs,
        )

    # ------------------------------------------------------------------ weights
    def sync_weights(self, source: Any) -> SyncReport:
        """Serve new weights: a module / state dict (saved as safetensors first) or a saved model dir.

        Returns (and keeps in `last_sync`) a SyncReport with the time it took and whether
        the served model changed. Under torch.distributed every rank calls this; rank 0
        does the sync (its `source` must hold the FULL weights: gather FSDP / ZeRO-3 state
        first) and the others wait at a barrier.
        """
        if self.frozen:
            raise RuntimeError(f"{self!r} is frozen (a reference model): it never takes new weights")
        rank, world = _dist_rank_world()
        if world > 1:  # several trainer ranks share one server: rank 0 syncs, the others wait for it
            report = self._sync(source) if rank == 0 else None
            import torch.distributed as dist

            dist.barrier()
            return report if report is not None else SyncReport("<rank 0>", 0.0, 0.0, 0.0)
        return self._sync(source)

    def _sync(self, source: Any) -> SyncReport:
        start = time.perf_counter()
        module = _unwrap(source)
        if self.weight_sync == "nccl":
            path, save_s = "<nccl>", 0.0
            reload_start = time.perf_counter()
            self._nccl_sync(source)
        else:
            save_start = time.perf_counter()
            path = self._materialise(source)
            save_s = time.perf_counter() - save_start
            reload_start = time.perf_counter()
            self._reload_from_disk(path)
        reload_s = time.perf_counter() - reload_start
        diff, attempts = None, 1
        if self.verify_sync and _verifiable(source, module):
            diff = self._served_logprob_diff(module)
            if diff > self._tolerance():  # one more reload: a transient failure must not end a run
                attempts = 2
                logger.warning("weight sync: served log-probs differ from the trainer's by %.3g; reloading again",
                               diff)
                if self.weight_sync == "nccl":
                    self._nccl_sync(source)
                else:
                    self._reload_from_disk(path)
                diff = self._served_logprob_diff(module)
            if diff > self._tolerance():
                raise WeightSyncError(
                    f"after syncing weights into {self!r} the served log-probs differ from the trainer's by {diff:.3g} "
                    f"(> sync_tolerance {self._tolerance():g}): the server does not serve the trained weights")
        self.last_sync = SyncReport(weights_path=str(path), seconds=time.perf_counter() - start, save_seconds=save_s,
                                    reload_seconds=reload_s, logprob_diff=diff, attempts=attempts)
        logger.info("vLLM weight sync: %.2f s (save %.2f s, reload %.2f s), log-prob diff %s", self.last_sync.seconds,
                    save_s, reload_s, "n/a" if diff is None else f"{diff:.2e}")
        return self.last_sync

    def _tolerance(self) -> float:
        if self.sync_tolerance is not None:
            return float(self.sync_tolerance)
        return 1e-3 if str(self.served_dtype) in ("float32", "float") else 0.15

    def _reload_from_disk(self, path: str) -> None:
        if not (Path(path) / "config.json").is_file():  # vLLM's worker dies on a missing dir (500, then dead)
            raise FileNotFoundError(f"cannot reload weights from {path!r}: no config.json there")
        self._request("POST", "/pause", params={"mode": "wait"})
        try:
            self._request("POST", "/collective_rpc", retries=0, json={
                "method": "reload_weights", "kwargs": {"weights_path": str(path), **self.reload_kwargs}})
            self._reset_prefix_cache()
        finally:  # never leave the server paused: every later request would hang
            self._request("POST", "/resume")

    def _reset_prefix_cache(self, attempts: int = 5) -> None:
        for attempt in range(attempts):
            result = self._request("POST", "/reset_prefix_cache")
            if result.get("success", True):  # older vLLM answers an empty 200
                return
            time.sleep(0.2 * (attempt + 1))  # blocks still held by finishing requests
        raise VLLMRequestError("vLLM could not reset its prefix cache; stale KV from old weights may be reused")

    def _materialise(self, source: Any) -> str:
        """A local dir holding `source` as a loadable checkpoint (config + safetensors, every tensor)."""
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"cannot sync weights from {str(source)!r}: not a model directory")
            if not _lacks_tied_head(path):
                return str(path.resolve())
            source = _load_for_sync(path)  # tied and saved without lm_head.weight: write the full state dict
        target = self._weights_dir()
        module = _unwrap(source)
        if hasattr(module, "state_dict") and hasattr(module, "config"):
            # the full state dict, NOT save_pretrained: a tied model's save omits lm_head.weight
            _save_state_dict(module.state_dict(), target, config=module.config)
        elif isinstance(source, Mapping):
            _save_state_dict(source, target, config=None, model=self.model)
        else:
            raise TypeError(f"cannot sync weights from a {type(source).__name__}: pass a transformers module, "
                            "a state dict or a saved model directory")
        return str(target)

    def _weights_dir(self) -> Path:
        if self._sync_dir is None:
            shm = Path("/dev/shm")
            root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
            _sweep_dead_weight_dirs(root)
            self._sync_dir = Path(tempfile.mkdtemp(prefix=f"{_WEIGHTS_PREFIX}{os.getpid()}-", dir=str(root)))
        self._sync_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._sync_dir.glob("*.safetensors*"):  # a smaller save must not leave old shards behind
            stale.unlink()
        return self._sync_dir

    def _served_logprob_diff(self, module: Any) -> float:
        """max |served - trainer| log-prob over a fixed, seeded probe completion (T = 1, no filters)."""
        import torch

        prompt = self.chat_prompt_ids(_PROBE_MESSAGES)
        completion = self.generate([prompt], n=1, temperature=1.0, max_tokens=_PROBE_TOKENS,
                                   seed=1234)[0].completions[0]
        if not completion.token_ids:
            return 0.0
        device = next(module.parameters()).device
        ids = torch.tensor([prompt + completion.token_ids], device=device)
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

    def _nccl_sync(self, source: Any) -> None:
        module = _unwrap(source)
        if not isinstance(module, _torch_module_type()):
            raise TypeError("weight_sync='nccl' sends a module's parameters: pass the torch module, not a path "
                            "or a state dict")
        if self._nccl is None or self._nccl.module is not module:
            self._nccl = NCCLWeightSync(self, module)
        self._nccl.sync()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close()
            if self._nccl is not None:
                self._nccl.close()
        except Exception:
            pass
        if self.server is not None:
            self.server.stop()
        if self._owns_sync_dir and self._sync_dir is not None:
            import shutil

            shutil.rmtree(self._sync_dir, ignore_errors=True)

    def __del__(self) -> None:  # a forgotten engine must not keep a GPU server alive
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        mode = "managed" if self.server is not None else "attached"
        return f"VLLMEngine({self.model!r}, url={self.url!r}, {mode}, weight_sync={self.weight_sync!r})"


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

    def __init__(self, engine: VLLMEngine, module: Any, *, master_address: str = "127.0.0.1",
                 master_port: int | None = None, packed: bool = True) -> None:
        from dspy_p2o.engines.vllm_server import free_port

        self.engine, self.module = engine, module
        workers = int(engine._request("GET", "/get_world_size", params={"include_dp": "true"}).get("world_size", 1))
        self.transfer = nccl_trainer_engine(engine.url, module, master_address=master_address,
                                            master_port=master_port or free_port(master_address),
                                            world_size=1 + workers, packed=packed)

    def sync(self) -> None:
        engine = self.engine
        engine._request("POST", "/pause", params={"mode": "wait"})
        try:
            self.transfer.send_weights()
            engine._reset_prefix_cache()
        finally:
            engine._request("POST", "/resume")

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
    import sys

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


def _torch_module_type() -> type:
    import torch

    return torch.nn.Module


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


# Engines alive in this interpreter: closed at exit, so a forgotten engine leaves no weights in /dev/shm.
_LIVE_ENGINES: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close()


def _sweep_dead_weight_dirs(root: Path) -> None:
    """Remove weight dirs left by dead processes (a SIGKILLed trainer cannot clean /dev/shm itself)."""
    import shutil

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


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)[:500]
