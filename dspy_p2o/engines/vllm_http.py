"""One vLLM server's HTTP API, spoken with retries: what `VLLMEngine` and its weight sync send.

A pooled `httpx` client (requests run concurrently; vLLM batches them continuously).
Connection failures and HTTP 502/503/504 are retried with jittered exponential back-off;
any other error status, a timeout, or a managed server that died is one `VLLMRequestError`
(`VLLMServerError` for the dead server, with its log tail) naming the request.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Mapping

import httpx

from dspy_p2o.engines.vllm_server import VLLMServer, VLLMServerError

logger = logging.getLogger(__name__)

# Transient failures worth retrying: the connection broke, or a proxy/server said "try again".
_RETRY_STATUS = {502, 503, 504}


class VLLMRequestError(RuntimeError):
    """The vLLM server rejected a request (`status`: its HTTP status) or could not be reached after retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VLLMClient:
    """HTTP to one vLLM server at `url` (its root, e.g. http://127.0.0.1:8000).

    Args:
        api_key: sent as a bearer token when given.
        timeout_s: per-request read timeout (connecting: 10 s).
        max_connections: requests in flight at once.
        max_retries: extra attempts after connection errors / 502-504.
        server: the managed server behind `url`, if any: a request to a dead one says so.
    """

    def __init__(self, url: str, api_key: str | None, *, timeout_s: float, max_connections: int, max_retries: int,
                 server: VLLMServer | None = None) -> None:
        self.url, self.max_retries, self.server = url, int(max_retries), server
        self._closed = False
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                retries: int | None = None) -> dict:
        """One HTTP call with retries on connection failures and 502/503/504; JSON body back ({} if empty,
        {"text": ...} for a plain-text body)."""
        attempts = 1 + (self.max_retries if retries is None else retries)
        for attempt in range(attempts):
            self.check_server()
            try:
                response = self.http.request(method, path, json=json, params=params)
            except httpx.TimeoutException as exc:
                raise VLLMRequestError(
                    f"{method} {self.url}{path} timed out ({type(exc).__name__}); raise request_timeout_s "
                    "for long generations") from exc
            except httpx.TransportError as exc:  # refused, reset, closed without a response
                if attempt == attempts - 1:
                    self.check_server()
                    raise VLLMRequestError(
                        f"{method} {self.url}{path} failed after {attempts} attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                self._backoff(attempt, attempts, f"{type(exc).__name__}: {exc}", path)
                continue
            if response.status_code in _RETRY_STATUS and attempt < attempts - 1:
                self._backoff(attempt, attempts, f"HTTP {response.status_code}", path)
                continue
            if response.status_code >= 400:
                raise VLLMRequestError(
                    f"{method} {self.url}{path} -> HTTP {response.status_code}: {_error_message(response)}",
                    status=response.status_code)
            if not response.content:
                return {}
            try:
                return response.json()
            except ValueError:  # a plain-text answer (vLLM's LoRA routes: "Success: LoRA adapter ...")
                return {"text": response.text}
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, attempts: int, why: str, path: str) -> None:
        delay = min(30.0, 0.25 * 2 ** attempt) * (0.5 + random.random())  # jitter: don't retry in lockstep
        logger.warning("vLLM %s: %s; retrying in %.1f s (attempt %d/%d)", path, why, delay, attempt + 1, attempts)
        time.sleep(delay)

    def check_server(self) -> None:
        """A managed server that died makes every request fail: say so, with its log."""
        if self.server is not None and not self.server.alive() and not self._closed:
            raise VLLMServerError(
                f"the managed vLLM server died (exit code {self.server.process.poll()}).\n"
                f"Last lines of {self.server.log_path}:\n{self.server.log_tail()}")

    def health(self) -> bool:
        try:
            return self.http.get("/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._closed = True
        self.http.close()


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)[:500]
