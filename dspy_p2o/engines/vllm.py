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
- **Weight sync** (`weight_sync="reload"`): save the weights as safetensors to a local
  dir, then `POST /pause?mode=wait` -> `POST /collective_rpc` `reload_weights` ->
  `POST /reset_prefix_cache` -> `POST /resume` (needs VLLM_SERVER_DEV_MODE=1, which the
  managed server sets). A fixed probe prompt is sampled before and after (fixed seed),
  and the sync is reported as not taking effect if nothing moved.
  `weight_sync="nccl"`: vLLM's NCCL weight-transfer API (see `NCCLWeightSync`);
  UNTESTED HERE (no GPU, no vLLM on our machines).
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx
from tqdm.auto import tqdm

from dspy_p2o.engines.base import Completion, Engine, GenerationOutput, sampling_params
from dspy_p2o.engines.vllm_server import DEFAULT_SERVER_COMMAND, VLLMServer, VLLMServerError

logger = logging.getLogger(__name__)

WEIGHT_SYNC_MODES = ("reload", "nccl")
# Transient failures worth retrying: the connection broke, or a proxy/server said "try again".
_RETRY_STATUS = {502, 503, 504}
_PROBE_MESSAGES = [{"role": "user", "content": "Probe: say something."}]


class VLLMRequestError(RuntimeError):
    """The vLLM server rejected a request or could not be reached after retries."""


@dataclass
class SyncReport:
    """What one weight sync did and cost."""

    weights_path: str
    seconds: float  # total wall time, save included
    save_seconds: float
    reload_seconds: float  # pause -> reload -> reset cache -> resume
    changed: bool | None  # did the probe's tokens/log-probs move? None when not verified


class VLLMEngine(Engine):
    """Policy served by vLLM.

    Args:
        model: the model dir or hub id the server loads (its tokenizer is loaded here too).
        url: attach to a running server (e.g. "http://127.0.0.1:8000") instead of starting one.
        api_key: the server's key; generated for a managed server, else `$VLLM_API_KEY`.
        port, gpu_memory_utilization, tensor_parallel_size, max_model_len, dtype, extra_args:
            flags of the managed `vllm serve` (extra_args are appended verbatim).
        startup_timeout_s: how long a managed server may take to become healthy.
        request_timeout_s: per-request read timeout (long generations take minutes).
        max_concurrency: requests in flight at once (vLLM schedules them together).
        max_retries: attempts per request after connection errors / 502-504.
        log_path: the managed server's log file (default: a temp file).
        weight_sync: "reload" (save + `/collective_rpc reload_weights`) or "nccl" (untested here).
        verify_sync: sample a fixed probe before/after each sync and warn when nothing changed.
        server_command: the launch prefix (default `vllm serve`); tests use the fake server module.
        served_model_name: the model id requests carry (managed default "policy"; attach: the server's first).
        sync_dir: where modules / state dicts are saved for reload (default: a temp dir;
            /dev/shm makes saving a 4B model take ~seconds).
        env: extra environment for the managed server (e.g. {"CUDA_VISIBLE_DEVICES": "0"}).
        reload_kwargs: extra kwargs for the worker's `reload_weights` (version-dependent).
        frozen: a reference server (e.g. the initial model for self-reflection): sync_weights refuses.
        reference_*: settings of the self-reflection reference server, kept in the same
            engine_kwargs and ignored here (see `reference_engine_kwargs`).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        url: str | None = None,
        api_key: str | None = None,
        port: int | None = None,
        gpu_memory_utilization: float = 0.45,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 600.0,
        request_timeout_s: float = 3600.0,
        max_concurrency: int = 64,
        max_retries: int = 5,
        log_path: str | os.PathLike | None = None,
        weight_sync: str = "reload",
        verify_sync: bool = True,
        server_command: Sequence[str] = DEFAULT_SERVER_COMMAND,
        served_model_name: str | None = None,
        sync_dir: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        reload_kwargs: Mapping[str, Any] | None = None,
        frozen: bool = False,
        tokenizer: Any = None,
        name: str | None = None,
        **reference_options: Any,
    ) -> None:
        unknown = [k for k in reference_options if not k.startswith("reference_")]
        if unknown:
            raise TypeError(f"VLLMEngine got unexpected keyword arguments {unknown}")
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(
                f"VLLMEngine needs the model dir or hub id the server loads, got {type(model).__name__}; "
                "save the module with save_pretrained and pass the directory")
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNC_MODES}, got {weight_sync!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = str(model)
        self.weight_sync = weight_sync
        self.verify_sync = verify_sync
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.reload_kwargs = dict(reload_kwargs or {})
        self.frozen = bool(frozen)
        self.name = name or Path(self.model.rstrip("/")).name or "policy"
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.model)
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        self.server: VLLMServer | None = None
        self._closed = False
        self._sync_dir = Path(sync_dir) if sync_dir is not None else None
        self._owns_sync_dir = sync_dir is None
        self._nccl: NCCLWeightSync | None = None
        self.last_sync: SyncReport | None = None

        if url is None:
            self.server = VLLMServer(
                self.model, server_command=server_command, port=port, api_key=api_key,
                served_model_name=served_model_name or "policy", gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, dtype=dtype,
                weight_transfer_backend="nccl" if weight_sync == "nccl" else None, extra_args=extra_args,
                startup_timeout_s=startup_timeout_s, log_path=log_path, env=env,
            ).start()
            self.url, self.api_key = self.server.url, self.server.api_key
        else:
            self.url, self.api_key = url.rstrip("/"), api_key or os.environ.get("VLLM_API_KEY")
            if self.url.endswith("/v1"):
                self.url = self.url[:-3]
        self.client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {},
            timeout=httpx.Timeout(request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency),
        )
        try:
            if self.server is None and not self.health():
                raise VLLMRequestError(f"no vLLM server answers at {self.url}/health; is it running (and is the URL "
                                       "the server root, e.g. http://127.0.0.1:8000)?")
            self.served_model_name = served_model_name or self._discover_model_name()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ HTTP
    def _discover_model_name(self) -> str:
        if self.server is not None:
            return self.server.served_model_name
        data = self._request("GET", "/v1/models", retries=2).get("data") or []
        if not data:
            raise VLLMRequestError(f"the vLLM server at {self.url} serves no model")
        return str(data[0]["id"])

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
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int = 1,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 256,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> list[GenerationOutput]:
        params = sampling_params(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                 stop=tuple(stop or ()), stop_token_ids=tuple(stop_token_ids or ()), seed=seed)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
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
            return report if report is not None else SyncReport("<rank 0>", 0.0, 0.0, 0.0, None)
        return self._sync(source)

    def _sync(self, source: Any) -> SyncReport:
        start = time.perf_counter()
        before = self._probe() if self.verify_sync else None
        if self.weight_sync == "nccl":
            path, save_s = "<nccl>", 0.0
            reload_start = time.perf_counter()
            self._nccl_sync(source)
        else:
            save_start = time.perf_counter()  # after the probe: save time is the save alone
            path = self._materialise(source)
            save_s = time.perf_counter() - save_start
            reload_start = time.perf_counter()
            self._reload_from_disk(path)
        reload_s = time.perf_counter() - reload_start
        changed = None
        if before is not None:
            changed = self._probe() != before
            if not changed:
                logger.warning("weight sync from %s did not change the served model's probe output: either the "
                               "weights are unchanged or the reload did not take effect", path)
        self.last_sync = SyncReport(weights_path=str(path), seconds=time.perf_counter() - start,
                                    save_seconds=save_s, reload_seconds=reload_s, changed=changed)
        logger.info("vLLM weight sync: %.2f s (save %.2f s, reload %.2f s), changed=%s", self.last_sync.seconds,
                    save_s, reload_s, changed)
        return self.last_sync

    def _reload_from_disk(self, path: str) -> None:
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
        """A local dir holding `source` as a loadable checkpoint (config + safetensors)."""
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_dir():
                raise FileNotFoundError(f"cannot sync weights from {str(source)!r}: not a model directory")
            return str(path.resolve())
        target = self._weights_dir()
        while not hasattr(source, "save_pretrained") and hasattr(source, "module"):
            source = source.module  # DDP / DeepSpeed wrappers hold the transformers model in .module
        if hasattr(source, "save_pretrained"):
            source.save_pretrained(target)  # safetensors; shards big models
        elif isinstance(source, Mapping):
            _save_state_dict(source, target, self.model)
        else:
            raise TypeError(f"cannot sync weights from a {type(source).__name__}: pass a transformers module, "
                            "a state dict or a saved model directory")
        return str(target)

    def _weights_dir(self) -> Path:
        if self._sync_dir is None:
            shm = Path("/dev/shm")
            self._sync_dir = Path(tempfile.mkdtemp(prefix="dspy-p2o-vllm-weights-",
                                                   dir=str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None))
        self._sync_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._sync_dir.glob("*.safetensors*"):  # a smaller save must not leave old shards behind
            stale.unlink()
        return self._sync_dir

    def _probe(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Tokens and log-probs of a fixed, seeded sample: any weight change moves them."""
        prompt = self.chat_prompt_ids(_PROBE_MESSAGES)
        out = self.generate([prompt], n=1, temperature=1.0, max_tokens=4, seed=1234)[0].completions[0]
        return tuple(out.token_ids), tuple(round(lp, 6) for lp in out.logprobs)

    def _nccl_sync(self, source: Any) -> None:
        if self._nccl is None:
            self._nccl = NCCLWeightSync(self)
        self._nccl.sync(source)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close()
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


# Policy-server settings that must not carry over to the reference server.
_POLICY_ONLY = ("url", "api_key", "port", "log_path", "served_model_name", "sync_dir", "weight_sync", "verify_sync",
                "reload_kwargs", "frozen")


def reference_engine_kwargs(policy_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """VLLMEngine kwargs for a frozen server of the INITIAL weights next to the policy server.

    Self-reflection (reflection="self") must see pi_init, never the policy being trained,
    so the policy's `url` / `port` / sync settings are dropped (a copy of the policy
    kwargs would attach to the policy server). Keys prefixed `reference_` override the
    rest, e.g. {"reference_url": ...} to attach to a separately launched reference
    server, {"reference_gpu_memory_utilization": 0.25} for the memory split, or
    {"reference_env": {"CUDA_VISIBLE_DEVICES": "1"}} to put it on another GPU.
    """
    kwargs = {k: v for k, v in policy_kwargs.items() if k not in _POLICY_ONLY and not k.startswith("reference_")}
    kwargs.update({k[len("reference_"):]: v for k, v in policy_kwargs.items() if k.startswith("reference_")})
    kwargs["frozen"] = True
    kwargs["verify_sync"] = False
    if "url" not in kwargs:  # a managed reference server; an attached one keeps its own name
        kwargs.setdefault("served_model_name", "reference")
    return kwargs


def reference_engine(model: str | os.PathLike, **policy_kwargs: Any) -> VLLMEngine:
    """A frozen VLLMEngine serving `model`'s initial weights (see `reference_engine_kwargs`)."""
    return VLLMEngine(model, **reference_engine_kwargs(policy_kwargs))


class NCCLWeightSync:
    """vLLM's NCCL weight transfer (server started with `--weight-transfer-config {"backend": "nccl"}`).

    UNTESTED HERE: derived from vLLM's dev RL router (/init_weight_transfer_engine,
    /start_weight_update, /update_weights, /finish_weight_update) and
    vllm.distributed.weight_transfer.nccl_engine; needs vLLM importable in the trainer
    process and a GPU. Sequence:
      once:      trainer joins a stateless NCCL group as rank 0 while
                 POST /init_weight_transfer_engine {"init_info": {master_address, master_port,
                 rank_offset: 1, world_size: 1 + TP}} makes the vLLM workers join (both block
                 until the group forms, so they run concurrently);
      each sync: POST /pause?mode=wait -> POST /start_weight_update ->
                 POST /update_weights {"update_info": {names, dtype_names, shapes, packed}}
                 concurrently with the trainer broadcasting the tensors in that order ->
                 POST /finish_weight_update -> POST /reset_prefix_cache -> POST /resume.
    The trainer must hold the full (unsharded) parameters on the sending GPU: with FSDP
    / ZeRO-3 gather them first (or use weight_sync="reload" with a rank-0 state dict).
    """

    def __init__(self, engine: VLLMEngine, *, master_address: str = "127.0.0.1", master_port: int | None = None,
                 packed: bool = True) -> None:
        try:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
        except ImportError as exc:
            raise ImportError("weight_sync='nccl' needs vLLM importable in the trainer process "
                              "(pip install 'dspy_p2o[vllm]'); use weight_sync='reload' otherwise") from exc
        from dspy_p2o.engines.vllm_server import free_port

        self.engine, self.packed = engine, packed
        self._transfer = NCCLWeightTransferEngine
        world = 1 + int(engine._request("GET", "/get_world_size", params={"include_dp": "true"}).get("world_size", 1))
        info = {"master_address": master_address, "master_port": master_port or free_port(master_address),
                "rank_offset": 1, "world_size": world}
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(engine._request, "POST", "/init_weight_transfer_engine", json={"init_info": info},
                                 retries=0)
            self.group = NCCLWeightTransferEngine.trainer_init(info)
            joined.result()

    def sync(self, source: Any) -> None:
        import torch

        if isinstance(source, Mapping):
            named = list(source.items())
        elif isinstance(source, torch.nn.Module):
            named = list(source.state_dict().items())
        else:
            raise TypeError("weight_sync='nccl' sends tensors: pass a module or a state dict, not a path")
        update_info = {"names": [k for k, _ in named], "dtype_names": [str(v.dtype).removeprefix("torch.") for _, v in named],
                       "shapes": [list(v.shape) for _, v in named], "packed": self.packed}
        engine = self.engine
        engine._request("POST", "/pause", params={"mode": "wait"})
        try:
            engine._request("POST", "/start_weight_update", retries=0)
            with ThreadPoolExecutor(1) as pool:
                received = pool.submit(engine._request, "POST", "/update_weights",
                                       json={"update_info": update_info}, retries=0)
                self._transfer.trainer_send_weights(iter(named), {"group": self.group, "packed": self.packed})
                received.result()
            engine._request("POST", "/finish_weight_update", retries=0)
            engine._reset_prefix_cache()
        finally:
            engine._request("POST", "/resume")


# ---------------------------------------------------------------------- helpers
def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _load_tokenizer(model: str):
    from transformers import AutoTokenizer

    from dspy_p2o.renderer import check_chat_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    check_chat_template(tokenizer)
    return tokenizer


def _eos_ids(tokenizer: Any, model: str) -> set[int]:
    """The tokenizer's EOS plus generation_config.json's eos_token_id(s), as the local engine stops on."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model).eos_token_id
        if eos is not None:
            ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    except (OSError, ValueError):
        pass  # no generation_config.json
    if not ids:
        raise ValueError(f"{model!r}: the tokenizer has no eos_token; completions could never end")
    return ids


def _save_state_dict(state: Mapping[str, Any], target: Path, model: str) -> None:
    """config.json (from the served model) + model.safetensors (tied tensors de-duplicated by copy)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    AutoConfig.from_pretrained(model).save_pretrained(target)
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        tensor = value.detach().contiguous().cpu()
        ptr = tensor.data_ptr()
        tensors[key] = tensor.clone() if ptr in seen else tensor  # safetensors refuses shared storage
        seen.add(ptr)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)[:500]
