"""Loaders of the shipped benchmarks/training sets and of user files."""

from __future__ import annotations

import json

import dspy
import pytest

from dspy_p2o import data
from dspy_p2o.data import (
    BENCHMARKS,
    DataError,
    find_data_root,
    load_benchmark,
    load_trainset,
    validate_examples,
)

ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva_math": 272, "olympiadbench": 675}


def _nonempty(value) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) and v.strip() for v in value)
    return isinstance(value, str) and bool(value.strip())


# --- data root --------------------------------------------------------------------


def test_find_data_root_walks_up_to_shared_data():
    root = find_data_root()
    assert root.name == "data" and root.parent.name == "shared"
    assert (root / "benchmarks").is_dir() and (root / "train").is_dir()


def test_find_data_root_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    assert find_data_root() == tmp_path
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="DSPY_P2O_DATA"):
        find_data_root()


def test_find_data_root_from_a_checkout_layout(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data" / "benchmarks").mkdir(parents=True)
    (tmp_path / "main" / "dspy_p2o").mkdir(parents=True)
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(data, "_search_starts", lambda: [tmp_path / "main" / "dspy_p2o"])
    assert find_data_root() == tmp_path / "shared" / "data"


def test_find_data_root_explains_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(data, "_search_starts", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match="set DSPY_P2O_DATA="):
        find_data_root()


# --- benchmarks ------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_loads_every_row(name):
    examples = load_benchmark(name)
    assert len(examples) == ROWS[name]
    assert [ex.index for ex in examples] == list(range(ROWS[name]))
    assert len({ex.id for ex in examples}) == len(examples)
    assert examples[3].id == f"{name}/3"
    for ex in examples:
        assert _nonempty(ex.question), ex.id
        assert _nonempty(ex.answer), ex.id
        assert set(ex.inputs().keys()) == {"question"}


def test_benchmark_gold_conventions():
    amc = load_benchmark("amc23")
    assert amc[0].answer == "27" and amc[0].raw_answer == 27.0
    assert all(isinstance(ex.answer, str) and "." not in ex.answer for ex in amc if ex.raw_answer.is_integer())
    olympiad = load_benchmark("olympiadbench")
    assert all(isinstance(ex.answer, list) for ex in olympiad)
    minerva = load_benchmark("minerva_math")
    assert minerva[0].answer == "1.6"  # the last \boxed{} of the solution
    assert "raw_answer" not in load_benchmark("math500")[0]


def test_benchmark_limit_and_unknown_name():
    assert [ex.id for ex in load_benchmark("aime24", limit=2)] == ["aime24/0", "aime24/1"]
    with pytest.raises(ValueError, match="choose one of"):
        load_benchmark("gsm8k")
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("aime24", limit=-1)


def test_benchmark_from_local_file_with_shipped_field_names(tmp_path):
    path = tmp_path / "mini.jsonl"
    rows = [{"question": "1+1?", "final_answer": ["2"]}, {"question": "2+2?", "final_answer": ["4"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_benchmark("olympiadbench", path=path)
    assert [ex.answer for ex in examples] == [["2"], ["4"]]
    assert examples[1].id == "olympiadbench/1"


def test_benchmark_row_without_gold_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n" + json.dumps({"problem": "q", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match=r"'aime24/1'.*'answer'"):
        load_benchmark("aime24", path=path)


def test_hub_name_offline_gives_a_clear_error():
    # conftest sets HF_DATASETS_OFFLINE=1: no network is attempted.
    with pytest.raises(RuntimeError, match="could not load 'no-such-org/no-such-dataset'.*local"):
        load_benchmark("math500", path="no-such-org/no-such-dataset")


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_trainset(tmp_path / "nothere.jsonl")


# --- training sets ---------------------------------------------------------------


def test_math_train_loads_and_drops_rows_without_gold(caplog):
    examples = load_trainset("math_train")
    assert len(examples) == 7474 - 4  # 2 rows with answer null, 2 with ""
    assert "math_train/886" in caplog.text
    assert all(_nonempty(ex.question) and _nonempty(ex.answer) for ex in examples)
    assert examples[0].id == "math_train/0" and examples[0].difficulty == 5.0
    with pytest.raises(ValueError, match="math_train/886"):
        load_trainset("math_train", drop_invalid=False)


def test_aime_train_loads():
    examples = load_trainset("aime")
    assert len(examples) == 975
    assert examples[0].answer == "60" and examples[0].id == "aime/0"
    assert len({ex.id for ex in examples}) == 975


def test_trainset_shuffle_limit_and_difficulty():
    a = load_trainset("aime", seed=1, limit=20, max_difficulty=4)
    b = load_trainset("aime", seed=1, limit=20, max_difficulty=4)
    assert [ex.id for ex in a] == [ex.id for ex in b] and len(a) == 20
    assert all(ex.difficulty <= 4 for ex in a)
    assert [ex.id for ex in a] != [ex.id for ex in load_trainset("aime", limit=20, max_difficulty=4)]
    hard = load_trainset("aime", min_difficulty=6)
    assert len(hard) > 100 and all(ex.difficulty >= 6 for ex in hard)
    with pytest.raises(ValueError, match="difficulty"):
        load_trainset("aime", min_difficulty=100)


def test_trainset_from_jsonl_with_custom_fields(tmp_path):
    path = tmp_path / "my_problems.jsonl"
    rows = [{"task": "What is 2+3?", "target_value": 5, "level": "Level 2"},
            {"task": "What is 7*6?", "target_value": 42.0, "level": "Level 4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_trainset(path, question_field="task", answer_field="target_value")
    assert [(ex.id, ex.question, ex.answer) for ex in examples] == [
        ("my_problems/0", "What is 2+3?", "5"), ("my_problems/1", "What is 7*6?", "42")]
    assert load_trainset(path, question_field="task", answer_field="target_value", min_difficulty=3)[0].index == 1
    with pytest.raises(ValueError, match="no question field 'prompt'"):
        load_trainset(path, question_field="prompt", answer_field="target_value")
    with pytest.raises(ValueError, match="answer_field"):
        load_trainset(path, question_field="task")


def test_trainset_from_parquet_with_solution_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "sols.parquet"
    table = pa.table({
        "prompt": [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "Compute 1/2+1/2."}],
                   [{"role": "user", "content": "Compute 2^3."}]],
        "solution": [r"It is \boxed{1}.", r"First \boxed{6}, no: \boxed{\frac{16}{2}}"],
    })
    pq.write_table(table, path)
    examples = load_trainset(path)
    assert [(ex.question, ex.answer) for ex in examples] == [("Compute 1/2+1/2.", "1"), ("Compute 2^3.", r"\frac{16}{2}")]
    assert examples[1].id == "sols/1"


def test_trainset_from_json_list(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]))
    assert [ex.answer for ex in load_trainset(path, limit=1)] == ["1"]


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_trainset(path)


# --- validate_examples -------------------------------------------------------------


def test_validate_examples_names_the_item():
    good = dspy.Example(question="q", answer="1", id="s/0").with_inputs("question")
    assert validate_examples([good], ["question"]) == [good]
    with pytest.raises(ValueError, match=r"'s/1'.*no field 'answer'"):
        validate_examples([good, dspy.Example(question="q", id="s/1")], ["question"])
    with pytest.raises(ValueError, match=r"'s/2'.*empty field 'question'"):
        validate_examples([dspy.Example(question="  ", answer="1", id="s/2")], ["question"])
    with pytest.raises(ValueError, match=r"position 1.*empty field 'answer'"):
        validate_examples([good, dspy.Example(question="q", answer=[""])], ["question"])
    with pytest.raises(ValueError, match=r"position 1.*same id"):
        validate_examples([good, good], "question")
    with pytest.raises(ValueError, match=r"'s/0'.*'context'"):
        validate_examples([good], ["question", "context"])
    with pytest.raises(TypeError, match="position 0"):
        validate_examples(["not an example"], ["question"])


@pytest.mark.parametrize("content, message", [
    (b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "3"}\n',
     r"bad.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column 17\)"),
    (b"", r"bad.jsonl: no rows \(the file is empty\)"),
    (b'{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2", "answer": 4\n', r"bad.jsonl:3: invalid JSON"),
    (b'{"problem": "1+1", "answer": "2"}\n["2+2", "4"]\n', r"bad.jsonl:2: expected a JSON object per row"),
])
def test_bad_jsonl_is_one_line_naming_the_file_and_line(tmp_path, capsys, content, message):
    from dspy_p2o.cli import main
    from dspy_p2o.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_trainset(bad)
    assert main(["train", "--config", "benchmarks/configs/grpo_baseline.yaml", f"data.train={bad}", "data.val=null",
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("dspy-p2o train: error: ") and str(bad) in err
    assert not (tmp_path / "run").exists()


def test_a_non_utf8_json_file_is_named(tmp_path):
    from dspy_p2o.data import DataError

    bad = tmp_path / "rows.json"
    bad.write_bytes(b'[{"problem": "\xff", "answer": "1"}]')
    with pytest.raises(DataError, match=r"rows.json: not UTF-8 text"):
        load_trainset(bad)


def test_a_rows_own_id_is_kept_and_rows_without_one_are_numbered(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"id": "q-17", "problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"},
            {"id": 42, "problem": "3+3", "answer": "6"}, {"id": None, "problem": "4+4", "answer": "8"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [ex.id for ex in load_trainset(path)] == ["q-17", "mine/1", "42", "mine/3"]
    assert [ex.id for ex in load_trainset(path, seed=3)] != ["q-17", "mine/1", "42", "mine/3"]  # shuffled...
    assert sorted(ex.id for ex in load_trainset(path, seed=3)) == sorted(["q-17", "mine/1", "42", "mine/3"])  # ...same ids


def test_duplicate_row_ids_are_a_clear_error(tmp_path):
    from dspy_p2o.data import DataError

    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps({"id": i, "problem": f"{n}+1", "answer": str(n + 1)}) + "\n"
                            for n, i in enumerate(["a", "b", "a"])))
    with pytest.raises(DataError, match=r"dup.jsonl: rows 1 and 3 have the same id 'a'; ids must be unique"):
        load_trainset(path)
    clash = tmp_path / "clash.jsonl"  # an own id equal to a generated one
    clash.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n" +
                     json.dumps({"id": "clash/0", "problem": "2+2", "answer": "4"}) + "\n")
    with pytest.raises(DataError, match="same id 'clash/0'"):
        load_trainset(clash)


def test_kept_fields_are_labels_that_labelled_demos_show(tmp_path):
    """`keep_fields` keeps a row's worked solution on its example (a label, not an input); DSPy's
    LabeledFewShot demos of the few-shot prompt phase then show it as the predictor's `reasoning`."""
    from dspy_p2o.programs import MathCoT
    from dspy_p2o.prompt_phase.fewshot import propose_demo_sets

    path = tmp_path / "sums.jsonl"
    rows = [{"question": f"What is {a} + 1?", "answer": str(a + 1), "reasoning": f"{a} + 1 = {a + 1}.", "level": a % 2}
            for a in range(10, 16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_trainset(path, keep_fields=["reasoning"], min_difficulty=1)
    assert [ex.reasoning for ex in examples] == ["11 + 1 = 12.", "13 + 1 = 14.", "15 + 1 = 16."]
    assert all(set(ex.inputs().keys()) == {"question"} for ex in examples)
    assert "reasoning" not in load_trainset(path)[0]
    (template,) = propose_demo_sets(MathCoT(), [examples], k=2, n=1, seed=0)
    demos = template["cot.predict"].demos
    assert len(demos) == 2 and all(d["reasoning"] == f"{d['question'][8:10]} + 1 = {d['answer']}." for d in demos)
    with pytest.raises(DataError, match="'solution', which no row has"):
        load_trainset(path, keep_fields=["solution"])
    with pytest.raises(DataError, match="cannot name 'answer'"):
        load_trainset(path, keep_fields=["answer"])


def test_the_cli_config_filters_training_rows_and_keeps_their_labels(monkeypatch):
    from pathlib import Path

    from dspy_p2o.config import P2OConfig, parse_overrides
    from dspy_p2o.train_cli import datasets

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config's data paths are the repository's
    cfg = P2OConfig.load("benchmarks/configs/smollm2_fewshot.yaml")
    train, val = datasets(cfg)
    assert len(train) == 40 and all(ex.difficulty == 5 and ex.reasoning.endswith(f"= {ex.answer}.") for ex in train)
    assert sorted(ex.difficulty for ex in val) == [0] * 16 + [5] * 16  # validation is not filtered
    mixed = P2OConfig.load(cfg, parse_overrides(["data.train_min_difficulty=null", "data.keep_fields=[]",
                                                 "data.train_limit=48"]))
    train, _ = datasets(mixed)
    assert len(train) == 48 and {ex.difficulty for ex in train} == {0, 5} and "reasoning" not in train[0]
