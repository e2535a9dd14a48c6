"""No secret leaves the process: a run whose engine and teacher keys are in the config never
writes them anywhere in its run directory (trackers included) nor to its logs."""

import logging

import dspy

import dspy_p2o
from loop_fixtures import closeness_metric, sum_examples, tiny_overrides

POLICY_KEY = "sk-policy-0123456789abcdef"
TEACHER_KEY = "sk-teacher-fedcba9876543210"


def test_api_keys_in_engine_and_reflection_kwargs_reach_no_run_file_nor_tracker(tmp_path, format_model_dir, caplog,
                                                                                capsys):
    from dspy_p2o.testing.fake_vllm import FakeVLLMServer

    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO)
    with FakeVLLMServer(format_model_dir, api_key=POLICY_KEY) as policy, \
            FakeVLLMServer(format_model_dir, api_key=TEACHER_KEY, served_model_name="teacher") as teacher:
        result = dspy_p2o.compile(
            dspy.ChainOfThought("question -> answer"), sum_examples(8, 0, "train"), metric=closeness_metric,
            policy=format_model_dir, engine="vllm", run_dir=run_dir, reflection="teacher:openai/teacher",
            vllm={"url": policy.url, "api_key": POLICY_KEY},
            reflection_kwargs={"api_base": f"{teacher.url}/v1", "api_key": TEACHER_KEY},
            trackers=["tensorboard"], **tiny_overrides(tau=0.5, near_hard=False, stop_at_score=2.0))
        teacher_calls = [path for _, path in teacher.request_log if path == "/v1/chat/completions"]
    assert len(result.history) == 2 and teacher_calls  # the keys were used: GEPA asked the teacher
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    tracker_files = [p for p in files if "trackers" in p.parts]
    assert any(p.name == "hparams.yml" for p in tracker_files) and any("tfevents" in p.name for p in tracker_files)
    leaks = [str(p.relative_to(run_dir)) for p in files
             if any(key.encode() in p.read_bytes() for key in (POLICY_KEY, TEACHER_KEY))]
    assert leaks == []
    out = capsys.readouterr()
    for text in (caplog.text, out.out, out.err):
        assert POLICY_KEY not in text and TEACHER_KEY not in text
    hparams = next(p for p in tracker_files if p.name == "hparams.yml").read_text()
    assert "***" in hparams  # redacted, not dropped: a reader sees a key was set
