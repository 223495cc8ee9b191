"""Settings an operator gets wrong without an error: a settings file named but missing, a
misspelled WATCHLLM_* variable, a disable_plugins name that is no plugin's, an upper-case
log level (docs/SETTINGS.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import clear_watchllm_env

from watchllm_ext import plugins as watchllm_plugins
from watchllm_ext import settings as watchllm_settings
from watchllm_ext.plugins import get_plugin_manager
from watchllm_ext.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_watchllm_env(monkeypatch, tmp_path)
    monkeypatch.setattr(watchllm_settings, "_WARNED", set())
    monkeypatch.setattr(watchllm_plugins, "_WARNED", set())


def test_a_named_settings_file_that_is_missing_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_settings()  # the default ./watchllm.toml stays optional
    monkeypatch.setenv("WATCHLLM_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert str(raised.value) == (
        f"the settings file {tmp_path / 'nope.toml'} (env WATCHLLM_CONFIG) does not exist"
    )


def test_a_misspelled_variable_is_warned_about_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WATCHLLM_FLUSH_INTERVALL_S", "2")
    # Read on purpose by the SDK and `watchllm demo`, and the settings file's name.
    monkeypatch.setenv("WATCHLLM_API_KEY", "k")
    monkeypatch.setenv("WATCHLLM_BASE_URL", "http://x")
    monkeypatch.setenv("WATCHLLM_PORT", "9000")
    with caplog.at_level(logging.WARNING, logger="watchllm.settings"):
        load_settings()
        load_settings()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "environment variable WATCHLLM_FLUSH_INTERVALL_S is not a setting's and is"
            " ignored; did you mean WATCHLLM_FLUSH_INTERVAL_S?",
        )
    ]


def test_every_variable_watchllm_reads_elsewhere_is_listed() -> None:
    source = Path(watchllm_settings.__file__).parent
    read = set()
    for path in source.rglob("*.py"):
        for word in path.read_text().split('"'):
            if word.startswith("WATCHLLM_") and word != "WATCHLLM_" and word.isidentifier():
                read.add(word)
    settings = {f"WATCHLLM_{name.upper()}" for name in Settings.model_fields}
    assert read - settings <= watchllm_settings.READ_ELSEWHERE


def test_a_disabled_plugin_that_does_not_exist_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(disable_plugins=["cots", "dashboard"])
    with caplog.at_level(logging.WARNING, logger="watchllm.plugins"):
        get_plugin_manager(settings, entry_points=False)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "disable_plugins names 'cots', which is no plugin's name; did you mean 'cost'?"
    ]


def test_the_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHLLM_LOG_LEVEL", "WARNING")
    assert load_settings().log_level == "warning"
