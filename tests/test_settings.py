"""Settings from the environment and watchllm.toml, clear errors, and docs in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from watchllm_ext.settings import Settings, SettingsError, load_settings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "SETTINGS.md"


def test_env_then_toml_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "w.toml"
    toml.write_text('port = 9000\nflush_interval_s = 0.5\n[model_prices]\n"m1" = [1.5, 2]\n')
    monkeypatch.setenv("WATCHLLM_CONFIG", str(toml))
    monkeypatch.setenv("WATCHLLM_PORT", "9100")
    s = load_settings()
    assert s.port == 9100  # env beats the file
    assert s.flush_interval_s == 0.5  # the file beats the default
    assert s.model_prices == {"m1": (1.5, 2.0)}
    assert s.max_batch_events == 10_000
    assert load_settings(port=9200).port == 9200  # explicit beats env


def test_bad_values_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHLLM_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./watchllm.toml
    monkeypatch.setenv("WATCHLLM_PORT", "70000")
    with pytest.raises(SettingsError, match=r"invalid setting port \(env WATCHLLM_PORT\)"):
        load_settings()
    monkeypatch.delenv("WATCHLLM_PORT")
    monkeypatch.setenv("WATCHLLM_MODEL_PRICES", "{not json")
    with pytest.raises(SettingsError, match="model_prices"):
        load_settings()
    monkeypatch.delenv("WATCHLLM_MODEL_PRICES")
    toml = tmp_path / "bad.toml"
    toml.write_text("flush_intervall_s = 1\n")
    monkeypatch.setenv("WATCHLLM_CONFIG", str(toml))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    # The file and the likely meaning named, not an environment variable that is not read.
    assert str(raised.value) == (
        f"unknown setting 'flush_intervall_s' in {toml}; did you mean 'flush_interval_s'?"
    )
    # An unknown key inside a setting's value is named with its path, not as an unknown setting.
    monkeypatch.delenv("WATCHLLM_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./watchllm.toml
    monkeypatch.setenv("WATCHLLM_QUOTA_PLANS", '{"free": {"bogus_key": 1}}')
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "quota_plans" in str(raised.value) and "bogus_key" in str(raised.value)
    assert "unknown setting" not in str(raised.value)
    monkeypatch.delenv("WATCHLLM_QUOTA_PLANS")
    monkeypatch.setenv("WATCHLLM_CONFIG", str(toml))
    toml.write_text("port = \n")
    with pytest.raises(SettingsError, match="settings file"):
        load_settings()


def test_every_setting_is_documented_with_its_default() -> None:
    docs = DOCS.read_text()
    for name, field in Settings.model_fields.items():
        assert f"`WATCHLLM_{name.upper()}`" in docs, name
        assert field.description, name
        if field.default_factory is None and name != "data_dir":
            assert f"`{field.default}`" in docs, f"default of {name}"
