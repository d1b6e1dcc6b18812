"""Settings come from flags, then LOWBIT_* variables, then defaults."""

from __future__ import annotations

import pytest

from app.cli import build_parser, settings_from_args
from app.settings import EngineSpec, Settings


def parse_serve(argv: list[str]) -> Settings:
    args = vars(build_parser().parse_args(["serve", *argv]))
    args.pop("command")
    return settings_from_args(args)


def test_defaults_prefer_the_npu_then_the_cpu():
    settings = Settings()
    assert settings.device == ("NPU", "CPU")
    assert (settings.host, settings.port, settings.engine) == ("127.0.0.1", 8000, "openvino")


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("LOWBIT_DEVICE", "GPU, CPU")
    monkeypatch.setenv("LOWBIT_PORT", "9001")
    monkeypatch.setenv("LOWBIT_MODEL", "/models/x.gguf")
    settings = Settings()
    assert settings.device == ("GPU", "CPU")
    assert settings.port == 9001 and settings.model == "/models/x.gguf"


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_PORT", "9001")
    monkeypatch.setenv("LOWBIT_DEVICE", "NPU")
    settings = parse_serve(["--port", "9002", "--device", "CPU", "--log-prompts"])
    assert settings.port == 9002 and settings.device == ("CPU",) and settings.log_prompts


def test_every_setting_has_a_flag():
    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve_parser._actions for option in action.option_strings}
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in flags


def test_several_engines_from_json(monkeypatch):
    monkeypatch.setenv("LOWBIT_ENGINES", '[{"device": "NPU"}, {"device": "CPU", "model_id": "b"}]')
    specs = Settings().engine_specs()
    assert specs == (EngineSpec(device=("NPU",)), EngineSpec(device=("CPU",), model_id="b"))


def test_single_engine_spec_from_model_engine_device():
    specs = Settings(model="/m.gguf", device="CPU").engine_specs()
    assert specs == (EngineSpec(model="/m.gguf", device=("CPU",)),)


def test_invalid_values_are_refused():
    with pytest.raises(ValueError):
        Settings(port=70000)
    with pytest.raises(ValueError):
        Settings(engine="nonsense")


def test_serve_with_a_missing_model_exits_2_with_a_clear_message(capsys):
    from app.cli import main

    assert main(["serve", "--model", "/nowhere/model.gguf"]) == 2
    assert "model not found: /nowhere/model.gguf" in capsys.readouterr().err


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`LOWBIT_{name.upper()}` / `--{name.replace('_', '-')}`" in readme, name


def test_several_model_flags_serve_side_by_side():
    settings = parse_serve(["--model", "/a.gguf", "--model", "/artifacts/b"])
    assert [spec.model for spec in settings.engine_specs()] == ["/a.gguf", "/artifacts/b"]
    single = parse_serve(["--model", "/a.gguf"])
    assert single.model == "/a.gguf" and len(single.engine_specs()) == 1
