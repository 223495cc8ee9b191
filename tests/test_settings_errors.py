"""A bad setting is reported in one line naming where its value came from (the settings file
and key, the variable, the command-line option), for JSON values too, and also when another
source overrides it (docs/SETTINGS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import clear_watchllm_env
from hypothesis import given
from hypothesis import strategies as st
from pydantic_settings import SettingsError as PydanticSettingsError

from watchllm_ext import cli
from watchllm_ext import settings as watchllm_settings
from watchllm_ext.settings import Settings, SettingsError, load_settings
from watchllm_ext.store import StoreError
from watchllm_plugins import clickhouse_store

DOCS = Path(__file__).resolve().parents[1] / "docs" / "SETTINGS.md"
NOT_A_NUMBER = "Input should be a valid number, unable to parse string as a number"
NOT_AN_INTEGER = "Input should be a valid integer, unable to parse string as an integer"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No WATCHLLM_* variable of the machine, and a settings file of the test's own."""
    clear_watchllm_env(monkeypatch, tmp_path)
    toml = tmp_path / "watchllm.toml"
    toml.write_text("")  # a file named by WATCHLLM_CONFIG must exist
    monkeypatch.setenv("WATCHLLM_CONFIG", str(toml))
    return toml


def error_of(**overrides: object) -> str:
    with pytest.raises(SettingsError) as raised:
        load_settings(**overrides)
    return str(raised.value)


# --- 1. the source of a bad value -------------------------------------------------------------


def test_a_bad_value_in_the_file_names_the_file_and_key(clean_env: Path) -> None:
    clean_env.write_text('flush_interval_s = "soon"\n')
    assert error_of() == (
        f"invalid setting flush_interval_s (file {clean_env}, key flush_interval_s):"
        f" {NOT_A_NUMBER} (got 'soon')"
    )  # not "(env WATCHLLM_FLUSH_INTERVAL_S)": no such variable is set


def test_each_source_is_named(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHLLM_FLUSH_INTERVAL_S", "soon")
    assert error_of() == (
        f"invalid setting flush_interval_s (env WATCHLLM_FLUSH_INTERVAL_S): {NOT_A_NUMBER}"
        " (got 'soon')"
    )
    monkeypatch.delenv("WATCHLLM_FLUSH_INTERVAL_S")
    assert error_of(port=0) == (
        "invalid setting port (option --port): Input should be greater than or equal to 1 (got 0)"
    )
    assert error_of(flush_interval_s=-1).startswith(
        "invalid setting flush_interval_s (argument flush_interval_s):"
    )


def test_a_dict_merged_from_two_sources_names_the_one_at_fault(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydantic-settings merges dicts key by key: the env's plan "pro" and the file's "free".
    clean_env.write_text("[quota_plans.free]\nevents_per_day = -3\n")
    monkeypatch.setenv("WATCHLLM_QUOTA_PLANS", '{"pro": {"events_per_day": 5}}')
    assert error_of() == (
        f"invalid setting quota_plans (file {clean_env}, key quota_plans): at"
        " free.events_per_day: Input should be greater than or equal to 1 (got -3)"
    )  # once, although the file's value is also checked as one the env overrides
    monkeypatch.setenv("WATCHLLM_QUOTA_PLANS", '{"free": {"events_per_day": -4}}')
    clean_env.write_text("[quota_plans.free]\nevents_per_day = 3\n")
    assert "(env WATCHLLM_QUOTA_PLANS): at free.events_per_day:" in error_of()


def test_an_unknown_argument_is_not_blamed_on_the_file() -> None:
    assert error_of(flush_intervall_s=1) == (
        "unknown setting 'flush_intervall_s' as an argument; did you mean 'flush_interval_s'?"
    )


# --- 2. JSON values from the environment ---------------------------------------------------


def test_bad_json_in_a_variable_is_one_documented_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHLLM_MODEL_PRICES", "{not json")
    assert error_of() == (
        "invalid setting model_prices (env WATCHLLM_MODEL_PRICES): not valid JSON: Expecting"
        " property name enclosed in double quotes: line 1 column 2 (char 1) (got '{not json')"
    )


def test_every_bad_json_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHLLM_MODEL_PRICES", "{not json")
    monkeypatch.setenv("WATCHLLM_GUARDIAN_RULES", "[{")
    monkeypatch.setenv("WATCHLLM_PLUGINS", "[mycompany.auth")  # a list given as JSON
    monkeypatch.setenv("WATCHLLM_OTLP_EXPORT_HEADERS", '{"Authorization": Bearer xyz}')
    monkeypatch.setenv("WATCHLLM_PORT", "abc")
    lines = error_of().splitlines()
    assert len(lines) == 5, lines
    for name in ("model_prices", "guardian_rules", "plugins", "otlp_export_headers"):
        (line,) = [x for x in lines if x.startswith(f"invalid setting {name} ")]
        assert line.startswith(f"invalid setting {name} (env WATCHLLM_{name.upper()}):"), line
        assert ": not valid JSON: " in line, line
    assert "error parsing value" not in "\n".join(lines)
    # Headers hold API keys: the value is not repeated into a log.
    assert "Bearer" not in "\n".join(lines)
    assert [x for x in lines if x.endswith("(got 29 characters, not shown)")]
    assert [x for x in lines if x.startswith("invalid setting port (env WATCHLLM_PORT)")]


def test_settings_built_directly_say_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHLLM_MODEL_PRICES", "{not json")
    with pytest.raises(PydanticSettingsError) as raised:
        Settings()
    assert str(raised.value).startswith(
        "invalid setting model_prices (env WATCHLLM_MODEL_PRICES): not valid JSON:"
    )


# --- 3. lengths of secrets -------------------------------------------------------------------


def test_a_short_secret_is_counted_in_characters_and_not_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHLLM_DASHBOARD_SECRET", "short")
    assert error_of() == (
        "invalid setting dashboard_secret (env WATCHLLM_DASHBOARD_SECRET): Value should have at"
        " least 32 characters, not 5 (got 5 characters, not shown)"
    )


def test_other_length_limits_speak_of_characters() -> None:
    message = error_of(host_project_id="x" * 65)
    assert "at most 64 characters" in message and "items" not in message
    message = error_of(guardian_rules=[{"name": "r", "project": "", "metric": "cost_usd"}])
    assert "items" not in message


# --- 4. a bad value that another source overrides -------------------------------------------


def test_a_bad_variable_is_refused_under_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHLLM_PORT", "abc")
    assert error_of(port=8824) == (
        f"invalid setting port (env WATCHLLM_PORT): {NOT_AN_INTEGER} (got 'abc')"
    )
    monkeypatch.setenv("WATCHLLM_PORT", "9000")
    assert load_settings(port=8824).port == 8824  # a good one is overridden as before


def test_a_bad_file_value_is_refused_under_a_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_env.write_text('port = "abc"\nspool_max_bytes = 70000\n')
    monkeypatch.setenv("WATCHLLM_PORT", "9000")
    assert error_of() == (
        f"invalid setting port (file {clean_env}, key port): {NOT_AN_INTEGER} (got 'abc')"
    )
    # Each overridden value is checked alone: rules across settings are the merged ones'.
    clean_env.write_text('port = 9001\ncluster_name = "wl"\n')
    monkeypatch.setenv("WATCHLLM_CLUSTER_NAME", "w2")
    with pytest.raises(SettingsError, match="cluster_name needs clickhouse_url") as raised:
        load_settings()
    assert len(str(raised.value).splitlines()) == 1
    monkeypatch.setenv("WATCHLLM_CLICKHOUSE_URL", "http://h/")
    assert load_settings(port=8824).cluster_name == "w2"


def test_serve_stops_on_a_bad_variable_under_its_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def started(host: str, port: int) -> None:
        raise AssertionError(f"serve went on to start on {host}:{port}")

    monkeypatch.setattr(cli, "_check_port", started)
    monkeypatch.setenv("WATCHLLM_PORT", "abc")
    code = cli.main(["serve", "--port", "8824", "--data-dir", str(tmp_path / "data")])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        f"error: invalid setting port (env WATCHLLM_PORT): {NOT_AN_INTEGER} (got 'abc')\n"
    )


def test_the_docs_show_what_is_said(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = DOCS.read_text().split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    monkeypatch.setenv("WATCHLLM_CONFIG", "watchllm.toml")  # as the docs name it
    clean_env.write_text('flush_interval_s = "soon"\n')
    monkeypatch.setenv("WATCHLLM_MODEL_PRICES", '{"my-model": [3 12]}')
    # What the command prints, every line of it.
    assert cli.main(["serve", "--port", "70000"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [line for line in shown if line]


# --- 5. clickhouse_url: refused as the store refuses it, never with its password -------------

# Pieces that URLs are made of, the characters that change how one is read among them.
_URL_PIECES = st.lists(
    st.sampled_from(
        ["u", ":", "@", "/", "?", "#", "&", "=", "%2F", "h", "[::1]", "99999", "8123", "db",
         "compress", "lz4", "snappy", "pool_size", "0", "5", "password", "connect_timeout"]
    ),
    max_size=12,
)  # fmt: skip


@given(st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "//", ""]), _URL_PIECES)
def test_a_clickhouse_url_is_refused_exactly_when_the_store_refuses_it(
    scheme: str, pieces: list[str]
) -> None:
    # Settings check the URL first (to name its source); the store plugin reads it later.
    url = scheme + "".join(pieces)
    try:
        clickhouse_store.parse_url(url)
        refused = False
    except StoreError:
        refused = True
    assert (watchllm_settings.clickhouse_url_problem(url) is not None) == refused, url


@given(
    st.sampled_from(["http://", "clickhouse://", "//", ""]),
    st.text(alphabet="xyz/?#@:&=%", max_size=8),
    st.text(alphabet="hdb:/?#@&=", max_size=12),
)
def test_a_masked_url_never_shows_the_password(scheme: str, middle: str, rest: str) -> None:
    # However the password breaks the URL's form, its first and last characters (P and W,
    # found nowhere else) are not shown.
    masked_clickhouse_url = watchllm_settings.masked_clickhouse_url
    url = f"{scheme}user:P{middle}W@{rest}"
    assert "P" not in masked_clickhouse_url(url) and "W" not in masked_clickhouse_url(url)
    query = f"http://user@h/db?compress=lz4&password=P{middle.replace('&', '')}W"
    assert "compress=lz4" in masked_clickhouse_url(query)
    assert "P" not in masked_clickhouse_url(query) and "W" not in masked_clickhouse_url(query)


def test_a_bad_clickhouse_url_names_its_source_and_hides_its_password(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert error_of(clickhouse_url="watchllm:secret@127.0.0.1:9208/watchllm") == (
        "invalid setting clickhouse_url (option --url): it has no http:// or https:// in front"
        " (the form is http(s)://user:password@host:port/database)"
        " (got 'watchllm:***@127.0.0.1:9208/watchllm')"
    )
    monkeypatch.setenv("WATCHLLM_CLICKHOUSE_URL", "http://u@h/db?password=secret")
    assert error_of() == (
        "invalid setting clickhouse_url (env WATCHLLM_CLICKHOUSE_URL): unknown option"
        " 'password' (known: compress, connect_timeout, send_receive_timeout, pool_size;"
        " the password goes before the @) (got 'http://u@h/db?password=***')"
    )
    monkeypatch.delenv("WATCHLLM_CLICKHOUSE_URL")
    clean_env.write_text('clickhouse_url = "http://u:se/cret@h/db"\n')
    assert error_of() == (
        f"invalid setting clickhouse_url (file {clean_env}, key clickhouse_url): its host and"
        " port cannot be read (write / ? # @ in a password as %2F %3F %23 %40)"
        " (got 'http://u:***@h/db')"
    )
    clean_env.write_text("")
    assert load_settings(clickhouse_url="").clickhouse_url == ""  # none: as unset


def test_settings_built_directly_never_show_a_refused_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host app builds Settings(...) itself and logs what it raises: pydantic's own text
    of the error must not carry the value (a ClickHouse password here)."""
    from pydantic import ValidationError

    monkeypatch.setenv("WATCHLLM_CLICKHOUSE_URL", "ftp://u:S3cretPW@h:1/db")
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert "clickhouse_url" in str(raised.value)
    assert "S3cretPW" not in str(raised.value)


def test_a_setting_names_where_its_value_came_from(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """source_of answers from the sources load_settings read, in their order of precedence."""
    clean_env.write_text('host = "10.0.0.1"\nport = 9000\n')
    monkeypatch.setenv("WATCHLLM_PORT", "9001")
    settings = load_settings(log_level="warning")
    assert settings.source_of("log_level") == "argument log_level"
    assert settings.source_of("port") == "env WATCHLLM_PORT"
    assert settings.source_of("host") == f"file {clean_env}, key host"
    assert settings.source_of("data_dir") == "its default"
    assert load_settings(host="::1").source_of("host") == "option --host"
