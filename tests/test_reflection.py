"""Reflection LM construction: "self" (lazy pi_init engine) and "teacher:<litellm model>" over real HTTP."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dspy
import pytest

from dspy_p2o.prompt_phase.reflection import close_reflection_lm, make_reflection_lm

SECRET = "sk-very-secret-987"


class _Teacher(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that fails `fail_first` times with 503."""

    fail_first = 0
    calls: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"auth": self.headers.get("Authorization"), "body": body})
        if len(type(self).calls) <= type(self).fail_first:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "overloaded"}}')
            return
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Double the number."}}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher_server():
    _Teacher.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_teacher_retries_then_answers_and_never_leaks_the_key(teacher_server, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    _Teacher.fail_first = 2
    lm = make_reflection_lm("teacher:openai/kimi-test", api_base=teacher_server, api_key_env="TEACHER_KEY",
                            num_retries=3)
    assert lm("Propose an instruction.") == ["Double the number."]
    assert len(_Teacher.calls) == 3  # two 503s, retried with back-off, then the answer
    assert _Teacher.calls[-1]["auth"] == f"Bearer {SECRET}"  # the key does reach the endpoint...
    visible = json.dumps(lm.dump_state()) + repr(lm)
    visible += json.dumps([{k: str(v) for k, v in h.items()} for h in lm.history])
    assert SECRET not in visible  # ...and nothing we log or save


def test_teacher_gives_up_after_retries(teacher_server, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    _Teacher.fail_first = 10
    lm = make_reflection_lm("teacher:openai/kimi-test", api_base=teacher_server, api_key_env="TEACHER_KEY",
                            num_retries=1)
    with pytest.raises(Exception):
        lm("Propose an instruction.")
    assert len(_Teacher.calls) == 2


def test_bad_specs_are_clear():
    with pytest.raises(ValueError, match="reflection must be one of"):
        make_reflection_lm("policy")
    with pytest.raises(ValueError, match="names no model"):
        make_reflection_lm("teacher:")
    with pytest.raises(ValueError, match="self_engine_factory"):
        make_reflection_lm("self")
    with pytest.raises(ValueError, match="'NO_SUCH_KEY_VAR'"):
        make_reflection_lm("teacher:openai/x", api_key_env="NO_SUCH_KEY_VAR")


def test_self_reflection_builds_pi_init_engine_lazily(tiny_model_dir):
    from dspy_p2o.engines import LocalEngine

    built = []

    def factory():
        built.append(LocalEngine(tiny_model_dir))
        return built[-1]

    lm = make_reflection_lm("self", self_engine_factory=factory, max_tokens=8)
    assert built == []  # nothing loaded until GEPA reflects
    out = lm("Propose an instruction.")
    assert len(built) == 1 and isinstance(out[0], str)
    lm("Again.")
    assert len(built) == 1  # one engine, reused
    close_reflection_lm(lm)


def test_the_loop_releases_the_pi_init_engine_when_it_ends(tmp_path, tiny_model_dir, monkeypatch):
    """Self-reflection's frozen pi_init engine (a second model, or a second vLLM server) lives only
    as long as the loop: run_loop closes it however it ends."""
    from dspy_p2o.config import P2OConfig
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.loop import P2OLoop
    from loop_fixtures import closeness_metric, sum_examples, tiny_overrides

    closed = []
    monkeypatch.setattr(LocalEngine, "close", lambda self: closed.append(self))
    config = P2OConfig.load(None, {"policy": str(tiny_model_dir), "reflection": "self",
                                   **tiny_overrides(epochs=1, method="grpo")})
    loop = P2OLoop(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"), metric=closeness_metric,
                   policy=str(tiny_model_dir), config=config, run_dir=tmp_path / "run")
    lm = loop.resources.reflection_lm()
    lm("Propose an instruction.")  # GEPA's first reflection builds pi_init
    pi_init = lm._engine_spec.engine
    assert pi_init is not None
    loop.run_loop()
    assert pi_init in closed and lm._engine_spec.engine is None
