"""The vLLM engine over real HTTP against the fake vLLM server (a real tiny model on CPU).

Covers the managed lifecycle (start, auth, death, stop), startup failures with the
server's log tail, health timeout, connection loss mid-rollout, log-probs equal to a
forward pass of the served weights, weight reload, and the DSPy LM sending a real n.
"""

import dataclasses
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would try the network at import

import signal
import sys

import httpx
import pytest
import torch

from dspy_p2o.config import VLLMOptions, VLLMServerOptions
from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.engines.local import process_logits
from dspy_p2o.engines.vllm import VLLMEngine, VLLMRequestError
from dspy_p2o.engines.vllm_server import VLLMServer, VLLMServerError
from dspy_p2o.testing.fake_vllm import FakeVLLMServer

FAKE_VLLM = [sys.executable, "-m", "dspy_p2o.testing.fake_vllm"]
MESSAGES = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Say hi."}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small tiny model (small BPE corpus: seconds to build, not the session model's half minute)."""
    from dspy_p2o.tiny import build_tiny_model, default_corpus

    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "model", texts=default_corpus(60), vocab_size=512,
                            hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def fake(model_dir):
    with FakeVLLMServer(model_dir, api_key="secret-key") as server:
        yield server


@pytest.fixture()
def engine(fake, model_dir):
    eng = VLLMEngine(model_dir, VLLMOptions(url=fake.url, api_key="secret-key", max_concurrency=4))
    yield eng
    eng.close()


def _prompts(engine):
    return [engine.chat_prompt_ids(m) for m in MESSAGES]


def _forward_logprobs(model, prompt, completion, params):
    """Log-probs of `completion` after `prompt` under `params`' processed distribution, by one forward pass."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return process_logits(logits, params).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---------------------------------------------------------------------- rollouts
def test_rollout_logprobs_match_a_forward_pass_of_the_served_weights(engine, model_dir):
    prompts = _prompts(engine)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=12)
    outs = engine.generate(prompts, n=3, temperature=0.8, top_p=0.9, top_k=40, max_tokens=12, seed=7)
    assert [o.prompt_token_ids for o in outs] == prompts  # mapped back in prompt order
    model = _load(model_dir)
    for prompt, out in zip(prompts, outs):
        assert len(out.completions) == 3
        for c in out.completions:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            assert c.finish_reason in ("stop", "length")
            expected = _forward_logprobs(model, prompt, c.token_ids, params)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
    # a seed makes rollouts reproducible; different prompts still get different samples
    again = engine.generate(prompts, n=3, temperature=0.8, top_p=0.9, top_k=40, max_tokens=12, seed=7)
    assert [[c.token_ids for c in o.completions] for o in again] == [[c.token_ids for c in o.completions] for o in outs]


def test_rollouts_survive_dropped_connections(engine, fake):
    prompts = _prompts(engine)
    before = sum(1 for _, path in fake.request_log if path == "/v1/completions")
    fake.drop_connections(2)
    outs = engine.generate(prompts, n=2, max_tokens=4, seed=0)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(len(o.completions) == 2 for o in outs)
    sent = sum(1 for _, path in fake.request_log if path == "/v1/completions") - before
    assert sent == len(prompts) + 2  # the two dropped requests were retried

    fake.drop_connections(10)
    impatient = VLLMEngine(engine.model, VLLMOptions(url=fake.url, api_key="secret-key", max_retries=1),
                           tokenizer=engine.tokenizer)
    try:
        with pytest.raises(VLLMRequestError, match="failed after 2 attempts"):
            impatient.generate(prompts[:1], max_tokens=2)
    finally:
        fake.drop_connections(0)
        impatient.close()


def test_bad_requests_and_auth_give_clear_errors(fake, model_dir, engine):
    with pytest.raises(VLLMRequestError, match="HTTP 401"):
        VLLMEngine(model_dir, VLLMOptions(url=fake.url, api_key="wrong-key"))
    with pytest.raises(VLLMRequestError, match="no vLLM server answers"):
        VLLMEngine(model_dir, VLLMOptions(url="http://127.0.0.1:9"), tokenizer=engine.tokenizer)
    too_long = [engine.tokenizer.eos_token_id] * 10
    with pytest.raises(ValueError, match=r"prompt 0 \(10 tokens\) \+ max_tokens \(1000000\) exceeds the server's context"):
        engine.generate([too_long], max_tokens=10**6)
    engine.max_model_len = None  # a server that does not say its length: its own error comes through
    try:
        with pytest.raises(VLLMRequestError, match="HTTP 400: max_tokens=1000000 cannot be greater than max_model_len"):
            engine.generate([too_long], max_tokens=10**6)
        with pytest.raises(VLLMRequestError, match="maximum context length"):
            engine.generate([too_long], max_tokens=fake.max_model_len - 5)
    finally:
        engine.max_model_len = fake.max_model_len
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([too_long, []])


# ---------------------------------------------------------------------- weight sync
def test_reload_serves_the_new_weights(engine, fake, model_dir):
    prompts = _prompts(engine)[:2]
    params = SamplingParams(temperature=1.0, max_tokens=8)
    original = engine.generate(prompts, n=2, max_tokens=8, seed=3)

    torch.manual_seed(0)
    trained = _load(model_dir)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    report = engine.sync_weights(trained)  # module -> full state dict -> pause/reload/reset/resume -> verified
    assert report.logprob_diff is not None and report.logprob_diff < 1e-4
    assert report.seconds > 0 and report.reload_seconds > 0
    assert [p for _, p in fake.request_log if p in ("/pause", "/collective_rpc", "/reset_prefix_cache",
                                                     "/resume")][-4:] == [
        "/pause", "/collective_rpc", "/reset_prefix_cache", "/resume"]
    assert not fake._paused

    served = engine.generate(prompts, n=2, max_tokens=8, seed=3)
    for prompt, out in zip(prompts, served):
        for c in out.completions:
            torch.testing.assert_close(torch.tensor(c.logprobs), _forward_logprobs(trained, prompt, c.token_ids, params),
                                       atol=1e-4, rtol=0)
    assert [c.logprobs for c in served[0].completions] != [c.logprobs for c in original[0].completions]

    engine.sync_weights(trained.state_dict())  # a state dict (tied embeddings) works too: nothing to verify with
    assert engine.last_sync.logprob_diff is None

    # a saved dir: back to the original weights. It is tied and has no lm_head.weight, so the engine
    # writes the full state dict first (reloaded as it is, the server would keep the trained head)
    engine.sync_weights(model_dir)
    assert engine.last_sync.weights_path != str(model_dir.resolve())
    restored = engine.generate(prompts, n=2, max_tokens=8, seed=3)
    assert [[c.token_ids for c in o.completions] for o in restored] == [[c.token_ids for c in o.completions]
                                                                        for o in original]


def test_sync_check_catches_a_stale_lm_head(engine, fake, model_dir, monkeypatch):
    """The fake reloads like vLLM: a tied checkpoint without lm_head.weight keeps the old head, and the
    verified sync must see it (the real-server twin is in test_vllm_real.py)."""
    import tempfile

    from dspy_p2o.engines.weight_sync import WeightSyncError

    trained = _load(model_dir)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def save_pretrained_only(source):  # the sync as it was: no lm_head.weight for a tied model
        target = tempfile.mkdtemp(prefix="stale-head-")
        source.save_pretrained(target)
        return target

    monkeypatch.setattr(engine.weights, "materialise", save_pretrained_only)
    with pytest.raises(WeightSyncError, match="served log-probs differ"):
        engine.sync_weights(trained)
    monkeypatch.undo()
    assert engine.sync_weights(trained).logprob_diff < 1e-4  # the full state dict fixes the head
    engine.sync_weights(_load(model_dir))


def test_reference_engine_is_frozen_and_never_the_policy_server(fake, model_dir):
    from dspy_p2o.config import P2OConfig
    from dspy_p2o.engines import make_reference_engine

    policy = VLLMOptions(url="http://127.0.0.1:9", api_key="policy-key", gpu_memory_utilization=0.45,
                         max_model_len=4096, verify_sync=False)
    derived = policy.reference_options()  # no reference section: the policy's options minus its own server
    assert derived.url is None and derived.api_key is None and derived.served_model_name == "reference"
    assert derived.gpu_memory_utilization == 0.45 and derived.max_model_len == 4096 and derived.verify_sync
    config = P2OConfig(engine="vllm", vllm=dataclasses.replace(
        policy, reference=VLLMOptions(url=fake.url, api_key="secret-key", gpu_memory_utilization=0.2)))
    assert config.vllm.reference_options() == config.vllm.reference  # a reference section is used as written
    ref = make_reference_engine(config, model_dir)  # what the loop starts for pi_init
    try:
        assert ref.url == fake.url and ref.served_model_name == fake.served_model_name
        with pytest.raises(RuntimeError, match="frozen"):
            ref.sync_weights(model_dir)
        assert len(ref.generate(_prompts(ref)[:1], n=2, max_tokens=2)[0].completions) == 2
    finally:
        ref.close()


def test_several_processes_share_one_attached_policy_server(fake, model_dir):
    """make_engine refuses a managed server per rank (N copies of the policy) before starting any."""
    from dspy_p2o.config import ConfigError, P2OConfig
    from dspy_p2o.engines import make_engine

    with pytest.raises(ConfigError, match=r"engine='vllm' under 2 processes needs a shared server \(vllm.url"):
        make_engine(P2OConfig(engine="vllm"), model_dir, processes=2)
    shared = make_engine(P2OConfig(engine="vllm", vllm=VLLMOptions(url=fake.url, api_key="secret-key")), model_dir,
                         processes=2)
    try:
        assert shared.url == fake.url and shared.server is None
    finally:
        shared.close()


# ---------------------------------------------------------------------- DSPy
def test_dspy_lm_sends_one_request_with_n(engine, fake):
    lm = engine.dspy_lm(max_tokens=6)
    before = len(fake.request_log)
    texts = lm("Say hi.", n=3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert [p for _, p in fake.request_log[before:]] == ["/v1/chat/completions"]  # one request, n=3 inside


# ---------------------------------------------------------------------- managed lifecycle
def test_managed_server_lifecycle(model_dir, tmp_path):
    log = tmp_path / "server.log"
    engine = VLLMEngine(model_dir, VLLMOptions(server_command=FAKE_VLLM, startup_timeout_s=180, log_path=str(log),
                                               gpu_memory_utilization=0.3, max_model_len=512))
    server = engine.server
    try:
        cmd = " ".join(server.command)
        for flag in ("--host 127.0.0.1", "--logprobs-mode processed_logprobs", "--generation-config vllm",
                     "--gpu-memory-utilization 0.3", "--max-model-len 512", "--dtype float32"):
            assert flag in cmd
        assert engine.api_key not in cmd and "--api-key" not in cmd  # argv is visible in `ps`
        assert server.env["VLLM_API_KEY"] == engine.api_key
        assert server.env["VLLM_SERVER_DEV_MODE"] == "1"
        assert engine.api_key not in log.read_text()  # the key is redacted from the log

        out = engine.generate(_prompts(engine)[:2], n=2, max_tokens=4)
        assert all(len(o.completions) == 2 for o in out)
        assert httpx.get(f"{engine.url}/v1/models").status_code == 401  # the key is required
        assert engine.sync_weights(model_dir).seconds > 0  # dev routes are there

        os.killpg(server.process.pid, signal.SIGKILL)  # the server dies under us
        server.process.wait(10)
        with pytest.raises(VLLMServerError, match="died"):
            engine.generate(_prompts(engine)[:1], max_tokens=2)
    finally:
        engine.close()
    assert server.process.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{engine.url}/health", timeout=2)
    engine.close()  # idempotent


def test_generated_api_keys_parse_as_flag_values(tmp_path):
    """A random key starting with '-' made the server's argparse fail (`--api-key -x...`): 1 start in 64.
    (The key now travels in VLLM_API_KEY, but a user may still pass it on a command line.)"""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--api-key")
    for n in range(300):
        server = VLLMServer(tmp_path, VLLMServerOptions(server_command=["true"], log_path=str(tmp_path / f"{n}.log")))
        assert parser.parse_args(["--api-key", server.api_key]).api_key == server.api_key


def test_start_failure_shows_the_server_log_tail(tmp_path, engine):
    with pytest.raises(FileNotFoundError, match="model directory .*no-such-model.* does not exist"):
        VLLMEngine(tmp_path / "no-such-model", VLLMOptions(server_command=FAKE_VLLM),
                   tokenizer=engine.tokenizer)  # before launch
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a directory the server cannot load
    with pytest.raises(VLLMServerError) as err:
        VLLMEngine(broken, VLLMOptions(server_command=FAKE_VLLM, startup_timeout_s=120), tokenizer=engine.tokenizer)
    message = str(err.value)
    assert "exited with code 1" in message, message
    assert "failed to load model" in message and "Last lines of" in message, message


def test_health_timeout_stops_the_server(tmp_path):
    never_healthy = [sys.executable, "-c", "import time; print('loading forever', flush=True); time.sleep(600)"]
    server = VLLMServer(tmp_path, VLLMServerOptions(server_command=never_healthy, startup_timeout_s=3,
                                                    log_path=str(tmp_path / "s.log")))
    with pytest.raises(VLLMServerError, match=r"did not become healthy within 3 s(.|\n)*loading forever"):
        server.start()
    assert server.process.poll() is not None  # not left running


# A server that is healthy at once, so exit-path tests cost no model load.
INSTANT_SERVER = r"""
import sys, http.server as hs
port = int(sys.argv[sys.argv.index('--port') + 1])
class H(hs.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()
    def log_message(self, *a):
        pass
hs.HTTPServer(('127.0.0.1', port), H).serve_forever()
"""

# The parent loads vllm_server.py by path: importing the engines package would pull torch and dspy.
PARENT = r"""
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("vllm_server", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
options = mod.VLLMServerOptions(server_command=[sys.executable, "-c", sys.argv[2]], startup_timeout_s=60)
server = mod.VLLMServer(os.path.dirname(sys.argv[1]), options).start()  # any directory: the server loads nothing
print(server.process.pid, flush=True)
how = sys.argv[3]
if how == "exception":
    raise RuntimeError("trainer crashed")
if how in ("sigint", "sigterm", "sigkill"):
    os.kill(os.getpid(), {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[how])
    time.sleep(30)
"""


def _gone(pid, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_managed_server_is_stopped_on_every_exit_path():
    import subprocess

    import dspy_p2o.engines.vllm_server as vllm_server

    parents = {how: subprocess.Popen([sys.executable, "-c", PARENT, vllm_server.__file__, INSTANT_SERVER, how],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for how in ("normal", "exception", "sigint", "sigterm", "sigkill")}
    for how, parent in parents.items():
        out, err = parent.communicate(timeout=120)
        pid = int(out.split()[0]) if out.strip() else None
        assert pid is not None, f"{how}: the server did not start: {err[-2000:]}"
        assert _gone(pid), f"the server outlived its parent ({how} exit)"
