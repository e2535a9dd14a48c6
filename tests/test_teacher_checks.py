"""A teacher reflection LM is checked at start -- its config, then one 1-token call to its real
endpoint -- before the policy loads, not after a whole epoch; its retries and timeout are set."""

import dspy
import pytest

import dspy_p2o
from dspy_p2o.config import ConfigError
from dspy_p2o.rewards import math_metric
from loop_fixtures import sum_examples, tiny_overrides

TEACHER_KEY = "sk-teacher-right"


def _compile(tmp_path, reflection, **overrides):
    # The policy dir exists but holds no model: getting past the teacher checks ends in "Unrecognized model".
    policy = tmp_path / "not-a-model"
    policy.mkdir(exist_ok=True)
    return dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sum_examples(4, 0, "train"),
                            metric=math_metric, policy=policy, reflection=reflection, run_dir=tmp_path / "run",
                            **tiny_overrides(**overrides))


def test_teacher_without_model_or_key_fails_at_start(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="reflection 'teacher:' names no model"):
        _compile(tmp_path, "teacher:")
    monkeypatch.delenv("DSPY_P2O_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(ConfigError, match="environment variable 'DSPY_P2O_TEST_TEACHER_KEY'"):
        _compile(tmp_path, "teacher:openai/teacher", reflection_kwargs={"api_key_env": "DSPY_P2O_TEST_TEACHER_KEY"})
    assert not (tmp_path / "run" / "identity.json").exists()


def test_preflight_call_reports_a_wrong_key_before_the_policy_loads(tmp_path, tiny_model_dir, capsys):
    from dspy_p2o.testing.fake_vllm import FakeVLLMServer

    with FakeVLLMServer(tiny_model_dir, api_key=TEACHER_KEY, served_model_name="teacher") as teacher:
        base = {"api_base": f"{teacher.url}/v1"}
        with pytest.raises(ConfigError, match=r"teacher 'openai/teacher' failed its preflight call \(LMAuthError: .*Unauthorized\)"):
            _compile(tmp_path, "teacher:openai/teacher", reflection_kwargs={**base, "api_key": "sk-wrong"},
                     reflection_retries=0, reflection_timeout_s=5)
        calls = len(teacher.request_log)
        with pytest.raises(ValueError, match="Unrecognized model"):  # past the preflight: the policy load fails
            _compile(tmp_path, "teacher:openai/teacher", reflection_kwargs={**base, "api_key": TEACHER_KEY},
                     reflection_retries=0, reflection_timeout_s=5, progress=True)
        assert [path for _, path in teacher.request_log[calls:]] == ["/v1/chat/completions"]
        calls = len(teacher.request_log)
        with pytest.raises(ValueError, match="Unrecognized model"):  # preflight off: no call
            _compile(tmp_path, "teacher:openai/teacher", reflection_kwargs={**base, "api_key": "sk-wrong"},
                     reflection_preflight=False)
        assert len(teacher.request_log) == calls
    out = capsys.readouterr()
    assert "reflection teacher openai/teacher: preflight ok in" in out.err + out.out
    assert "retries 0, timeout 5.0 s per attempt" in out.err + out.out
