"""The lifecycle of a managed `vllm serve` process: start, wait until healthy, stop.

The server binds to 127.0.0.1 on a free port with a generated API key: weight reload
needs vLLM's dev mode (`VLLM_SERVER_DEV_MODE=1`), which exposes `/collective_rpc`, so
the server must not be reachable from outside the node. It runs in its own process
group (vLLM forks engine-core and TP worker processes) and the whole group is stopped
on `stop()`, on interpreter exit (atexit), on SIGTERM and when the context manager
exits -- a crashed trainer must not leave a GPU-holding server behind. Its output goes
to a log file whose tail is put into every startup error.

The launch command is configurable (`server_command`, default `vllm serve`) so the same
lifecycle runs offline against `python -m dspy_p2o.testing.fake_vllm`.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx

DEFAULT_SERVER_COMMAND = ("vllm", "serve")
HOST = "127.0.0.1"


class VLLMServerError(RuntimeError):
    """The vLLM server could not start, died, or did not become healthy."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_arguments(
    model: str,
    *,
    port: int,
    api_key: str,
    served_model_name: str,
    gpu_memory_utilization: float = 0.45,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    dtype: str = "auto",
    weight_transfer_backend: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The arguments after `vllm serve`: the model, then flags that make rollouts trainable.

    `--logprobs-mode processed_logprobs` returns log-probs of the distribution actually
    sampled from (after temperature / top-k / top-p), which is what the trainer's
    importance ratios need; `--generation-config vllm` stops the model's
    generation_config.json from silently changing our sampling defaults.
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    args = [
        str(model),
        "--host", HOST,
        "--port", str(port),
        "--api-key", api_key,
        "--served-model-name", served_model_name,
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--dtype", str(dtype),
    ]
    if max_model_len is not None:
        args += ["--max-model-len", str(int(max_model_len))]
    if weight_transfer_backend is not None:
        args += ["--weight-transfer-config", '{"backend": "%s"}' % weight_transfer_backend]
    return args + [str(a) for a in extra_args]


def read_tail(path: str | os.PathLike, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# Servers alive in this interpreter, stopped at exit even if nobody called stop().
_LIVE: "weakref.WeakSet[VLLMServer]" = weakref.WeakSet()
_HOOKS_INSTALLED = False
_HOOKS_LOCK = threading.Lock()


def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def _install_exit_hooks() -> None:
    """atexit for every exit path Python controls; SIGTERM turned into SystemExit so it is one of them.

    The SIGTERM handler is installed only from the main thread and only when nobody
    else owns SIGTERM (accelerate / torchrun may install their own; we chain nothing).
    """
    global _HOOKS_INSTALLED
    with _HOOKS_LOCK:
        if _HOOKS_INSTALLED:
            return
        atexit.register(_stop_all)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            def _on_sigterm(signum, frame):  # noqa: ARG001
                _stop_all()
                raise SystemExit(128 + signum)

            signal.signal(signal.SIGTERM, _on_sigterm)
        _HOOKS_INSTALLED = True


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: have the kernel SIGTERM the server if this Python process is SIGKILLed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class VLLMServer:
    """One managed `vllm serve` process.

    Args:
        model: model dir or hub id, passed to the server as is.
        server_command: the launch prefix; default `vllm serve`. Tests use
            `[sys.executable, "-m", "dspy_p2o.testing.fake_vllm"]`.
        port, api_key: default to a free port and a random key.
        served_model_name: the `model` field clients send (default "policy").
        startup_timeout_s: how long to wait for `/health` (loading + CUDA graphs take minutes).
        log_path: the server's stdout+stderr; default a temp file kept for post-mortems.
        env: extra environment variables (e.g. CUDA_VISIBLE_DEVICES).
        dev_mode: set VLLM_SERVER_DEV_MODE=1 (needed for /collective_rpc weight reload).
        Other knobs map to `vllm serve` flags (see `serve_arguments`).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        server_command: Sequence[str] = DEFAULT_SERVER_COMMAND,
        port: int | None = None,
        api_key: str | None = None,
        served_model_name: str = "policy",
        gpu_memory_utilization: float = 0.45,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        weight_transfer_backend: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 600.0,
        log_path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        dev_mode: bool = True,
    ) -> None:
        self.model = str(model)
        self.port = int(port) if port else free_port()
        # hex, not urlsafe: a urlsafe key may start with '-', and the server's argparse then reads
        # `--api-key -x...` as a missing value (a 1-in-64 start failure, seen as a flaky test)
        self.api_key = api_key or secrets.token_hex(24)
        self.served_model_name = served_model_name
        self.startup_timeout_s = float(startup_timeout_s)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.command = [*server_command, *serve_arguments(
            self.model, port=self.port, api_key=self.api_key, served_model_name=served_model_name,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, dtype=dtype, weight_transfer_backend=weight_transfer_backend,
            extra_args=extra_args,
        )]
        self.env = dict(env or {})
        if dev_mode:
            self.env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"VLLMServer({self.model!r}, url={self.url!r}, {state}, log={str(self.log_path)!r})"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "VLLMServer":
        """Launch the server and block until `/health` answers 200 (or raise VLLMServerError)."""
        with self._lock:
            if self.alive():
                return self
            _install_exit_hooks()
            self._log_file = open(self.log_path, "ab", buffering=0)
            self._log_file.write(f"$ {' '.join(self._redacted_command())}\n".encode())
            try:
                self.process = subprocess.Popen(
                    self.command, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env}, start_new_session=True,  # own process group
                    # only from the main thread: PDEATHSIG fires when the *forking thread* exits
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux")
                    and threading.current_thread() is threading.main_thread() else None,
                )
            except OSError as exc:
                self._close_log()
                raise VLLMServerError(
                    f"cannot launch the vLLM server {self.command[0]!r}: {exc}. Is vLLM installed "
                    "(pip install 'dspy_p2o[vllm]') on this GPU node?") from exc
            _LIVE.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.1
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise VLLMServerError(
                        f"the vLLM server for {self.model!r} exited with code {code} before becoming healthy.\n"
                        f"Last lines of {self.log_path}:\n{read_tail(self.log_path)}")
                try:
                    # alive check after the answer too: a port race could let another process answer
                    if client.get(f"{self.url}/health").status_code == 200 and self.process.poll() is None:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise VLLMServerError(
                        f"the vLLM server for {self.model!r} did not become healthy within "
                        f"{self.startup_timeout_s:.0f} s (raise startup_timeout_s for big models).\n"
                        f"Last lines of {self.log_path}:\n{read_tail(self.log_path)}")
                time.sleep(delay)
                delay = min(delay * 1.5, 2.0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace_s`. Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
        # children of a dead leader may linger (vLLM engine-core): make sure the group is gone
        self._signal_group(process, signal.SIGKILL)
        _LIVE.discard(self)
        self._close_log()

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)  # pgid == pid: started with start_new_session
        except (ProcessLookupError, PermissionError):
            pass

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _redacted_command(self) -> list[str]:
        return ["***" if a == self.api_key else a for a in self.command]

    def log_tail(self, lines: int = 40) -> str:
        return read_tail(self.log_path, lines)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
