"""The GPU engine: the policy served by vLLM, spoken to over its OpenAI-compatible HTTP API.

- **Server**: a managed `vllm serve` subprocess (see `vllm_server.VLLMServer`), or an
  already running server when `options.url` is set (attach mode; we never stop it).
- **Rollouts**: one `POST /v1/completions` per prompt with the prompt as token ids and
  `n` samples (vLLM prefills once and forks), every sampling parameter explicit
  (`max_tokens` above all: vLLM's default is 16), `logprobs: 0` and
  `return_token_ids: true`. The server runs with `--logprobs-mode processed_logprobs`,
  so `choices[i].logprobs.token_logprobs` are the log-probs of the distribution each
  token was sampled from -- the behaviour log-probs the trainer needs. Requests run
  concurrently over a pooled HTTP client with retries (`vllm_http.VLLMClient`; vLLM batches
  them continuously), and outputs come back in prompt order.
- **DSPy LM**: litellm's `hosted_vllm/` provider on `/v1/chat/completions`, which sends
  a real `n` (DSPy's default route sends n separate requests), cache off.
- **Weight sync**: `weight_sync.WeightSync` (reload from safetensors, tied head included, or
  NCCL; verified against the trainer's own log-probs). A LoRA policy is synced adapter-only:
  each sync loads the adapter under a new name and rollouts go to that name
  (`served_model_name`); the base model stays served under its own name (`base_model_name`),
  which is pi_init (`without_adapter()`).
"""

from __future__ import annotations

import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dspy_p2o.config import VLLMOptions
from dspy_p2o.engines.base import Completion, Engine, GenerationOutput, SamplingParams, SyncReport
from dspy_p2o.engines.hf import eos_token_ids, load_tokenizer, saved_generation_config
from dspy_p2o.engines.vllm_http import VLLMClient, VLLMRequestError
from dspy_p2o.engines.vllm_server import VLLMServer
from dspy_p2o.engines.weight_sync import WeightSync, WeightSyncError

__all__ = ["VLLMEngine", "VLLMRequestError", "WeightSyncError"]


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
        self.options = options = options if options is not None else VLLMOptions()
        self.model, self.frozen = str(model), bool(frozen)
        self.name = name or Path(self.model.rstrip("/")).name or "policy"
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model)
        self.eos_ids = self._eos_ids()
        self.max_concurrency = int(options.max_concurrency)
        self.last_sync: SyncReport | None = None
        self._closed, self.server, self.client, self.weights = False, None, None, None
        self._view = False  # a `without_adapter()` view: it shares the server and client, and closes nothing
        self.server = self._start_server() if options.url is None else None
        self.url, self.api_key = self._address()
        self.client = VLLMClient(self.url, self.api_key, timeout_s=options.request_timeout_s,
                                 max_connections=self.max_concurrency, max_retries=options.max_retries,
                                 server=self.server)
        try:
            # requests name `served_model_name`: the base model's name, or the newest LoRA adapter's after a sync
            self.served_model_name, self.max_model_len = self._discover_model()
            self.base_model_name = self.served_model_name
            self.context_length = self.max_model_len
        except BaseException:
            self.close()
            raise
        self.weights = WeightSync(self, options, self.server.dtype if self.server is not None else options.dtype)

    # ------------------------------------------------------------------ wiring
    def _eos_ids(self) -> set[int]:
        try:
            return eos_token_ids(self.tokenizer, saved_generation_config(self.model))
        except ValueError as exc:
            raise ValueError(f"{self.model!r}: {exc}") from None

    def _start_server(self) -> VLLMServer:
        nccl = "nccl" if self.options.weight_sync == "nccl" else None
        return VLLMServer(self.model, self.options, weight_transfer_backend=nccl).start()

    def _address(self) -> tuple[str, str | None]:
        """(server root URL, API key): the managed server's, or the attached one's (`$VLLM_API_KEY` by default)."""
        if self.server is not None:
            return self.server.url, self.server.api_key
        url = self.options.url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url, self.options.api_key or os.environ.get("VLLM_API_KEY")

    def _discover_model(self) -> tuple[str, int | None]:
        """The served model's name and context length (`max_model_len`, None if the server does not say)."""
        if self.server is None and not self.health():
            raise VLLMRequestError(f"no vLLM server answers at {self.url}/health; is it running (and is the URL "
                                   "the server root, e.g. http://127.0.0.1:8000)?")
        data = self.client.request("GET", "/v1/models", retries=2).get("data") or []
        if not data:
            raise VLLMRequestError(f"the vLLM server at {self.url} serves no model")
        wanted = self.server.served_model_name if self.server is not None else None
        entry = next((d for d in data if d.get("id") == wanted), data[0])
        length = entry.get("max_model_len")
        return str(wanted or entry["id"]), int(length) if length else None

    def health(self) -> bool:
        return self.client.health()

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
            return i, self._parse_completion(self.client.request("POST", "/v1/completions", json=body), prompts[i], n)

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
            num_retries=kwargs.pop("num_retries", self.options.max_retries), **kwargs,
        )

    # ------------------------------------------------------------------ weights
    def sync_weights(self, source: Any) -> SyncReport:
        """Serve new weights: a module / state dict (saved as safetensors first) or a saved model dir.

        Returns (and keeps in `last_sync`) a SyncReport with the time it took and the checked
        log-prob difference (see `weight_sync`). Under torch.distributed every rank calls this;
        rank 0 does the sync (its `source` must hold the FULL weights: gather FSDP / ZeRO-3 state
        first) and the others wait at a barrier.
        """
        if self.frozen:
            raise RuntimeError(f"{self!r} is frozen (a reference model): it never takes new weights")
        self.last_sync = self.weights.sync(source)
        return self.last_sync

    def without_adapter(self) -> "VLLMEngine":
        """pi_init of a LoRA run: the base model, which the server serves under its own name beside
        the adapter -- the same server and client, no second server. Frozen; closing it closes nothing."""
        view = copy.copy(self)
        view.served_model_name, view.frozen, view._view = self.base_model_name, True, True
        return view

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed or self._view:
            return
        self._closed = True
        try:
            if self.client is not None:
                self.client.close()
            if self.weights is not None:
                self.weights.close()
        except Exception:
            pass
        if self.server is not None:
            self.server.stop()

    def __del__(self) -> None:  # a forgotten engine must not keep a GPU server alive
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        mode = "managed" if self.server is not None else "attached"
        return f"VLLMEngine({self.model!r}, url={self.url!r}, {mode}, weight_sync={self.options.weight_sync!r})"
