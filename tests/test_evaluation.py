"""`dspy-p2o eval` end to end on a tiny offline model: protocol, outputs, resume, compare."""

from __future__ import annotations

import json

import dspy
import pytest

from dspy_p2o.cli import main
from dspy_p2o.data import BENCHMARKS
from dspy_p2o.engines.local import LocalEngine
from dspy_p2o.evaluation import AnswerExtractor, Protocol, protocol_for, results_table, summarize
from dspy_p2o.evaluation.prompting import RAW_INSTRUCTION, make_prompting
from dspy_p2o.evaluation.runner import read_samples

SAMPLED = {"aime24", "aime25", "amc23"}  # fewer than 100 problems: the paper samples these


# ----------------------------------------------------------------------------- protocol


def test_protocol_follows_the_paper_and_its_overrides():
    assert protocol_for(30) == Protocol(samples=16, temperature=0.6, max_tokens=4096)
    assert protocol_for(500) == Protocol(samples=1, temperature=0.0, max_tokens=4096)
    assert protocol_for(99, samples=4, temperature=1.0).samples == 4
    assert protocol_for(500, samples=4).greedy  # overrides are for the sampled benchmarks
    assert protocol_for(30, temperature=0) == Protocol(samples=1, temperature=0.0, max_tokens=4096)
    assert protocol_for(30, sampled_below=0).greedy
    assert protocol_for(500, sampled_below=10**9).samples == 16
    with pytest.raises(ValueError, match="identical samples"):
        protocol_for(30, samples=4, temperature=0)


def test_summary_is_mean_over_problems_of_per_problem_accuracy():
    records = [{"index": 0, "correct": c, "answer": "1"} for c in (True, False, False, False)]
    records += [{"index": 1, "correct": True, "answer": "2"} for _ in range(4)]
    summary = summarize(records)
    assert summary["accuracy"] == pytest.approx((0.25 + 1.0) / 2)
    assert summary["pass@4"] == 1.0 and summary["samples_per_problem"] == 4


# ----------------------------------------------------------------------------- extraction


def test_extractor_prefers_the_program_answer_field(tiny_model_dir):
    engine = LocalEngine(tiny_model_dir)
    prompting = make_prompting("program", engine.tokenizer)
    renderer_text = dspy.ChatAdapter().format_assistant_message_content(
        prompting_signature(), {"reasoning": "It is \\boxed{3}?", "answer": "\\boxed{\\frac{1}{2}}"})
    assert prompting.extractor(renderer_text).answer == "\\frac{1}{2}"
    assert prompting.extractor(renderer_text).source == "field"
    assert prompting.extractor("no format, but \\boxed{7} then \\boxed{8}").answer == "8"
    assert prompting.extractor("an unfinished \\boxed{12").answer is None
    raw = make_prompting("raw", engine.tokenizer)
    assert raw.extractor(renderer_text).answer == "\\frac{1}{2}"  # the last box of the whole text
    assert isinstance(raw.extractor, AnswerExtractor) and raw.extractor.parse is None
    prompt = engine.tokenizer.decode(raw.render(dspy.Example(question="What is 1+1?")))
    assert f"What is 1+1?\n{RAW_INSTRUCTION}" in prompt


def test_a_prompt_mode_given_as_the_program_is_named_as_such(tiny_model_dir):
    """`raw` is the eval's prompt mode, handled here: the program registry knows nothing of it."""
    with pytest.raises(ValueError, match="'raw' is a prompt mode, not a program: use --prompt raw"):
        make_prompting("program", LocalEngine(tiny_model_dir).tokenizer, program="raw")


def prompting_signature():
    from dspy_p2o.programs import get_program
    from dspy_p2o.renderer import single_predictor

    return single_predictor(get_program("math_cot")).signature


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def count_generate(monkeypatch):
    """Record the number of prompts of every real LocalEngine.generate call."""
    calls: list[int] = []
    original = LocalEngine.generate

    def counting(self, prompt_token_ids, *args, **kwargs):
        calls.append(len(prompt_token_ids))
        return original(self, prompt_token_ids, *args, **kwargs)

    monkeypatch.setattr(LocalEngine, "generate", counting)
    return calls


def run_eval(model, out, *extra):
    return main(["eval", "--model", str(model), "--out", str(out), "--samples", "2", "--max-tokens", "6",
                 "--quiet", *extra])


def test_eval_limit_2_on_all_six_benchmarks(tiny_model_dir, tmp_path, capsys, count_generate):
    out = tmp_path / "run"
    assert run_eval(tiny_model_dir, out, "--limit", "2", "--benchmarks", ",".join(BENCHMARKS)) == 0
    assert count_generate == [2] * 6  # one batched call per benchmark: all its problems in flight

    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    for name, summary in results["benchmarks"].items():
        k = 2 if name in SAMPLED else 1
        assert summary["protocol"]["temperature"] == (0.6 if name in SAMPLED else 0.0)
        assert (summary["n_problems"], summary["samples_per_problem"]) == (2, k)
        assert ("pass@2" in summary) == (name in SAMPLED)
        records = read_samples(out / f"{name}.jsonl")
        assert [(r["index"], r["sample"]) for r in records] == [(i, s) for i in range(2) for s in range(k)]
        for r in records:
            assert set(r) >= {"id", "completion", "answer", "correct", "finish_reason", "gold"}
            assert r["id"] == f"{name}/{r['index']}" and 1 <= r["num_tokens"] <= 6
        assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / len(records))
    assert results["average"] == pytest.approx(sum(b["accuracy"] for b in results["benchmarks"].values()) / 6)

    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| Model | AIME24 | AIME25 | AMC23 | MATH500 | Minerva | Olympiad | AVG |"
    assert "| AIME24 pass@2 | AIME25 pass@2 | AMC23 pass@2 |" in table
    assert table.splitlines()[0] in capsys.readouterr().out


def test_rerun_generates_only_what_is_missing(tiny_model_dir, tmp_path, count_generate):
    out = tmp_path / "run"
    args = ("--benchmarks", "aime24,math500", "--limit", "3")
    assert run_eval(tiny_model_dir, out, *args) == 0
    assert count_generate == [3, 3]
    before = {p.name: p.read_text() for p in out.glob("*.jsonl")}

    count_generate.clear()
    assert run_eval(tiny_model_dir, out, *args) == 0
    assert count_generate == []  # everything was finished: nothing generated again
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == before

    # A crash mid-write: problem 2 lost one sample and the file ends in a torn line.
    lines = before["aime24.jsonl"].splitlines(keepends=True)
    (out / "aime24.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    assert run_eval(tiny_model_dir, out, *args, "--limit", "4") == 0
    assert count_generate == [2, 1]  # aime24: problems 2 and 3; math500: problem 3
    records = read_samples(out / "aime24.jsonl")
    assert sorted((r["index"], r["sample"]) for r in records) == [(i, s) for i in range(4) for s in range(2)]
    assert records[:4] == [json.loads(line) for line in lines[:4]]  # finished work kept as it was
    assert json.loads((out / "results.json").read_text())["benchmarks"]["aime24"]["n_problems"] == 4


def test_rerun_with_another_protocol_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_eval(tiny_model_dir, out, "--benchmarks", "aime24", "--limit", "1") == 0
    assert run_eval(tiny_model_dir, out, "--benchmarks", "aime24", "--limit", "1", "--temperature", "1.0") == 2
    assert "aime24 samples made with" in capsys.readouterr().err


def test_raw_prompt_and_compare(tiny_model_dir, tmp_path, capsys):
    program, raw = tmp_path / "program", tmp_path / "raw"
    assert run_eval(tiny_model_dir, program, "--benchmarks", "amc23", "--limit", "1") == 0
    assert run_eval(tiny_model_dir, raw, "--benchmarks", "amc23,math500", "--limit", "1", "--prompt", "raw",
                    "--name", "tiny raw") == 0
    assert json.loads((raw / "config.json").read_text())["prompting"]["prompt"] == "raw"
    capsys.readouterr()
    assert main(["eval", "--compare", str(program / "results.json"), str(raw)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| Model | AMC23 | MATH500 | AVG |"
    assert table[2].startswith("| model (program) |") and table[2].endswith("| – | 0.0* |")
    assert table[3].startswith("| tiny raw |")


def test_bad_input_is_named(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", "aime24,gsm8k"]) == 2
    assert "gsm8k" in capsys.readouterr().err
    # Settings are checked before any model loads (tmp_path is no model: that would fail differently).
    assert main(["eval", "--model", str(tmp_path), "--program", "no_such_program"]) == 2
    assert "no_such_program" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--samples", "4", "--temperature", "0"]) == 2
    assert "identical samples" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path / "nowhere.json")]) == 2
    assert "no results file" in capsys.readouterr().err


def test_results_table_marks_partial_rows():
    full = {"label": "a", "benchmarks": {b: {"accuracy": 0.5} for b in BENCHMARKS}}
    part = {"label": "b", "benchmarks": {"aime24": {"accuracy": 0.25, "pass@16": 0.75}}}
    lines = results_table([full, part]).splitlines()
    assert lines[2] == "| a | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |"
    assert lines[3] == "| b | 25.0 | – | – | – | – | – | 25.0* |"
    assert "| Model | AIME24 pass@16 |" in lines and "| b | 75.0 |" in lines


def test_engine_args_are_parsed_as_json_when_they_can_be():
    from dspy_p2o.evaluation.cli import parse_engine_args

    assert parse_engine_args(["tensor_parallel_size=2", "dtype=bfloat16", "url=http://h:8000", "x=1.5"]) == {
        "tensor_parallel_size": 2, "dtype": "bfloat16", "url": "http://h:8000", "x": 1.5}
    with pytest.raises(ValueError, match="'oops' is not KEY=VALUE"):
        parse_engine_args(["oops"])


# ----------------------------------------------------------------------------- lock, torn lines, CPU runs


def test_a_second_eval_on_the_same_out_dir_is_refused_naming_the_holder(tiny_model_dir, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from dspy_p2o.run_dir import RunDir; "
                               f"lock = RunDir({str(out)!r}).lock(); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_eval(tiny_model_dir, out, "--benchmarks", "aime24", "--limit", "1") == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and f"is in use by pid {holder.pid}" in err
        assert not (out / "aime24.jsonl").exists()
    finally:
        holder.communicate("")  # the holder exits: its lock goes with it
    assert run_eval(tiny_model_dir, out, "--benchmarks", "aime24", "--limit", "1") == 0


def test_a_torn_last_line_is_cut_before_appending(tiny_model_dir, tmp_path, count_generate):
    out = tmp_path / "run"
    assert run_eval(tiny_model_dir, out, "--benchmarks", "aime24", "--limit", "2") == 0
    path = out / "aime24.jsonl"
    finished = path.read_text()
    path.write_text(finished + '{"id": "aime24/2", "index": 2, "sam')  # killed while writing problem 2
    count_generate.clear()
    assert run_eval(tiny_model_dir, out, "--benchmarks", "aime24", "--limit", "3") == 0
    assert count_generate == [1]
    text = path.read_text()
    assert text.startswith(finished) and len(text.splitlines()) == 6
    assert [(r["index"], r["sample"]) for r in read_samples(path)] == [(i, s) for i in range(3) for s in range(2)]


def test_the_local_engine_reports_each_decode_step_to_the_evaluation_line(tiny_model_dir):
    from dspy_p2o import display

    engine = LocalEngine(tiny_model_dir)
    prompts = [engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in ("What is 1+1?", "Name a prime.")]
    line = display.DecodeProgress(2, done=0, samples=6, desc="test", enabled=False)
    seen = []
    line.REFRESH_S = 0.0
    original = line.step
    line.step = lambda tokens, finished: (seen.append((tokens, finished)), original(tokens, finished))
    with line.active():
        outputs = engine.generate(prompts, n=3, temperature=1.0, max_tokens=12, seed=0)
    completions = [c for o in outputs for c in o.completions]
    assert len(seen) == max(len(c.token_ids) for c in completions) > 1  # one report per decode step
    assert line.tokens == sum(len(c.token_ids) for c in completions) and line.samples == 6
    engine.generate(prompts, n=1, max_tokens=4)  # outside `active()`: nothing reported
    assert line.samples == 6


def test_eval_on_cpu_says_what_it_will_cost_and_defaults_to_cpu_max_tokens(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    import torch

    from dspy_p2o.config import LocalOptions, VLLMOptions
    from dspy_p2o.evaluation.cli import CPU_MAX_TOKENS, on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(out), "--benchmarks", "math500,aime24",
                 "--limit", "1", "--samples", "2"]) == 0
    err = capsys.readouterr().err
    assert (f"dspy-p2o eval: on CPU: max_tokens {CPU_MAX_TOKENS} (the CPU default; 12288, the paper's, on GPU: set "
            f"it with --max-tokens); this run decodes 3 sequences (problems x samples: math500 1 x 1, aime24 1 x 2) "
            f"of up to {CPU_MAX_TOKENS} tokens: at most {3 * CPU_MAX_TOKENS:,} tokens") in err.splitlines()
    assert "math500 problems" in err and "samples 1/1" in err and "tok/s" in err  # the live line
    protocols = json.loads((out / "config.json").read_text())["protocols"]
    assert protocols["math500"]["max_tokens"] == protocols["aime24"]["max_tokens"] == CPU_MAX_TOKENS
    assert on_cpu("local", LocalOptions()) and on_cpu("local", LocalOptions(device="cpu"))
    assert on_cpu("vllm", VLLMOptions())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not on_cpu("local", LocalOptions()) and on_cpu("local", LocalOptions(device="cpu"))
    assert not on_cpu("vllm", VLLMOptions()) and not on_cpu("vllm", VLLMOptions(url="http://h"))
