"""Feature flags: the built-in provider (settings and the flags file), OpenFeature's in-memory
provider, ConfigCat's local-override file, and the per-request cache, through a real server."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagResolutionDetails
from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchllm_ext import hookimpl
from watchllm_ext.auth import Principal
from watchllm_ext.flags import feature_enabled, request_flags
from watchllm_ext.plugins import get_plugin_manager
from watchllm_ext.settings import Settings, SettingsError, load_settings

ACME = Principal("acme", frozenset({"ingest"}))
OTHER = Principal("other", frozenset({"ingest"}))


def wait_for(check: Any, within_s: float) -> float:
    """Poll `check` until true; the seconds it took (fails past `within_s`)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within_s:
            raise AssertionError(f"not true within {within_s} s")
        time.sleep(0.01)
    return time.monotonic() - started


def write_json(path: Path, data: Any) -> None:
    """Write and move the modification time on: two writes in one clock tick of a coarse
    file system would otherwise look like one."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(json.dumps(data))
    after = max(time.time_ns(), before + 10_000_000)
    os.utime(path, ns=(after, after))


def test_settings_flags_per_project_and_user(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        flags={
            "guardian": {"default": False, "projects": {"acme": True}, "users": {"bob": False}},
            "beta": True,
        },
    )
    pm = get_plugin_manager(settings, entry_points=False)
    assert feature_enabled(pm, "guardian", ACME)
    assert not feature_enabled(pm, "guardian", OTHER)
    assert not feature_enabled(pm, "guardian", ACME, user_id="bob")  # the user beats the project
    assert feature_enabled(pm, "guardian", ACME, user_id="alice")
    assert feature_enabled(pm, "beta", OTHER)
    assert feature_enabled(pm, "unknown", ACME, default=True)
    assert not feature_enabled(pm, "unknown", ACME)


def test_flags_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WATCHLLM_FLAGS", '{"guardian": {"projects": {"acme": true}}}')
    pm = get_plugin_manager(load_settings(data_dir=tmp_path), entry_points=False)
    assert feature_enabled(pm, "guardian", ACME) and not feature_enabled(pm, "guardian", OTHER)
    monkeypatch.setenv("WATCHLLM_FLAGS", '{"guardian": {"projects": {"acme": "maybe"}}}')
    with pytest.raises(SettingsError, match="flags"):
        load_settings(data_dir=tmp_path)


def test_flags_file_flip_within_refresh(tmp_path: Path) -> None:
    flags = tmp_path / "flags.json"
    write_json(flags, {"guardian": False})
    settings = Settings(data_dir=tmp_path, flags_file=flags, flags_refresh_s=0.2, flags={"x": True})
    pm = get_plugin_manager(settings, entry_points=False)
    assert not feature_enabled(pm, "guardian", ACME)
    assert feature_enabled(pm, "x", ACME)  # the settings answer for what the file lacks
    write_json(flags, {"guardian": {"projects": {"acme": True}}})
    took = wait_for(lambda: feature_enabled(pm, "guardian", ACME), within_s=1.0)
    assert took <= 0.2 + 0.1  # the documented delay: flags_refresh_s
    assert not feature_enabled(pm, "guardian", OTHER)
    # A broken file keeps the flags read before it.
    flags.write_text("{not json")
    os.utime(flags, ns=(time.time_ns() + 50_000_000,) * 2)
    time.sleep(0.25)
    assert feature_enabled(pm, "guardian", ACME)


def by_project(flag: InMemoryFlag[Any], context: EvaluationContext) -> FlagResolutionDetails[Any]:
    variant = "on" if context.attributes.get("project_id") == "acme" else "off"
    return FlagResolutionDetails(value=flag.variants[variant], variant=variant)


def test_openfeature_in_memory_provider_flip(tmp_path: Path) -> None:
    domain = f"watchllm-{uuid.uuid4().hex}"
    settings = Settings(
        data_dir=tmp_path,
        plugins=["watchllm_ext.flags.openfeature_provider"],
        openfeature_domain=domain,
        flags={"guardian": True, "only_builtin": True},
    )
    pm = get_plugin_manager(settings, entry_points=False)
    flag = InMemoryFlag("off", {"on": True, "off": False}, context_evaluator=by_project)
    api.set_provider(InMemoryProvider({"guardian": flag}), domain=domain)
    try:
        assert feature_enabled(pm, "guardian", ACME)
        assert not feature_enabled(pm, "guardian", OTHER)  # OpenFeature beats the settings
        assert feature_enabled(pm, "only_builtin", OTHER)  # unknown to OpenFeature
        # The flip: a new flag set, seen at the very next evaluation (no delay).
        off = InMemoryFlag("off", {"on": True, "off": False})
        api.set_provider(InMemoryProvider({"guardian": off}), domain=domain)
        assert not feature_enabled(pm, "guardian", ACME)
    finally:
        api.set_provider(InMemoryProvider({}), domain=domain)


def test_configcat_local_override_file_flip(tmp_path: Path) -> None:
    override = tmp_path / "configcat.json"
    write_json(override, {"flags": {"guardian": False, "rate": 3}})
    settings = Settings(
        data_dir=tmp_path,
        plugins=["watchllm_ext.flags.configcat_provider"],
        configcat_override_file=override,
        flags={"rate": True},
    )
    pm = get_plugin_manager(settings, entry_points=False)
    assert not feature_enabled(pm, "guardian", ACME, default=True)
    # A setting that is not a bool in ConfigCat is no answer: the built-in one speaks.
    assert feature_enabled(pm, "rate", ACME)
    write_json(override, {"flags": {"guardian": True}})
    # The documented delay for the override file: the next evaluation.
    assert feature_enabled(pm, "guardian", ACME)


def configcat_plugins(tmp_path: Path, flags: dict[str, Any]) -> pluggy.PluginManager:
    """The ConfigCat provider on a full config JSON (these flags) in its local-override file."""
    override = tmp_path / "configcat.json"
    write_json(
        override, {"p": {"u": "https://cdn-global.configcat.com", "r": 0, "s": "salt"}, "f": flags}
    )
    settings = Settings(
        data_dir=tmp_path,
        plugins=["watchllm_ext.flags.configcat_provider"],
        configcat_override_file=override,
    )
    return get_plugin_manager(settings, entry_points=False)


def test_configcat_targeting_per_project(tmp_path: Path) -> None:
    """A full ConfigCat config JSON in the override file: a rule on the project_id attribute."""
    on_for_acme = [
        {"c": [{"u": {"a": "project_id", "c": 0, "l": ["acme"]}}], "s": {"v": {"b": True}}}
    ]
    pm = configcat_plugins(tmp_path, {"guardian": {"t": 0, "v": {"b": False}, "r": on_for_acme}})
    assert feature_enabled(pm, "guardian", ACME)
    assert not feature_enabled(pm, "guardian", OTHER, default=True)


@pytest.fixture
def fresh_configcat_logger() -> Iterator[logging.Logger]:
    """ConfigCat's logger as a new process has it (no level of its own), restored after."""
    logger = logging.getLogger("configcat")
    level = logger.level
    logger.setLevel(logging.NOTSET)
    yield logger
    logger.setLevel(level)


def test_configcat_evaluations_are_not_logged_but_its_warnings_are(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fresh_configcat_logger: logging.Logger
) -> None:
    """`watchllm serve` logs at INFO: ConfigCat's "[5000] Evaluating 'guardian' ..." line of
    every evaluation is not written; a warning of its own (a rule on an attribute the
    evaluation lacks) still is."""
    caplog.set_level(logging.INFO)
    on_for_bob = [{"c": [{"u": {"a": "user_id", "c": 0, "l": ["bob"]}}], "s": {"v": {"b": True}}}]
    flags = {
        "guardian": {"t": 0, "v": {"b": True}},
        "per_user": {"t": 0, "v": {"b": False}, "r": on_for_bob},
    }
    pm = configcat_plugins(tmp_path, flags)
    for _ in range(3):
        assert feature_enabled(pm, "guardian", ACME)
    assert feature_enabled(pm, "per_user", ACME, user_id="bob")
    ours = [r for r in caplog.records if r.name == "configcat"]
    assert [r.getMessage() for r in ours if r.levelno < logging.WARNING] == []
    assert not feature_enabled(pm, "per_user", ACME)  # no user_id to match the rule with
    (warning,) = [r for r in caplog.records if r.name == "configcat"]
    assert warning.levelno == logging.WARNING and "user_id" in warning.getMessage()
    # A level the operator gave ConfigCat's logger is theirs.
    fresh_configcat_logger.setLevel(logging.DEBUG)
    configcat_plugins(tmp_path, flags)
    assert fresh_configcat_logger.level == logging.DEBUG


def test_configcat_needs_a_key_or_a_file(tmp_path: Path) -> None:
    from watchllm_ext.plugins import PluginError

    settings = Settings(data_dir=tmp_path, plugins=["watchllm_ext.flags.configcat_provider"])
    with pytest.raises((SettingsError, PluginError), match="configcat_sdk_key"):
        get_plugin_manager(settings, entry_points=False)


class Flipper:
    """A provider whose answer flips at every evaluation, and a route that asks twice."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def feature_enabled(self, name: str) -> bool | None:
        if name != "flippy":
            return None
        self.calls += 1
        return self.calls % 2 == 1

    @hookimpl
    def register_routes(self, settings: Settings) -> list[Route]:
        async def twice(request: Request) -> JSONResponse:
            pm = request.app.state.watchllm.pm
            first = feature_enabled(pm, "flippy", ACME)
            second = feature_enabled(pm, "flippy", ACME)
            return JSONResponse({"first": first, "second": second})

        return [Route("/-/flippy", twice)]


def test_value_is_cached_per_request(server_factory: Any) -> None:
    flipper = Flipper()
    server = server_factory(plugin_objects=(flipper,))
    one = server.client.get("/-/flippy").json()
    assert one == {"first": True, "second": True}  # one evaluation for the request
    two = server.client.get("/-/flippy").json()
    assert two == {"first": False, "second": False}  # the next request asks again
    assert flipper.calls == 2
    # Outside a request nothing is cached.
    pm = server.wl.pm
    assert feature_enabled(pm, "flippy", ACME) != feature_enabled(pm, "flippy", ACME)
    with request_flags():
        assert feature_enabled(pm, "flippy", ACME) == feature_enabled(pm, "flippy", ACME)


def flag_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "watchllm.flags" and r.levelno == logging.WARNING
    ]


def test_unknown_flag_names_are_warned_once_per_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`{"gaurdian": true}` turns nothing on: the warning names it and the flag it resembles,
    once per load of the file (asks in between say nothing), and once for the settings."""
    caplog.set_level(logging.WARNING, logger="watchllm.flags")
    flags = tmp_path / "flags.json"
    write_json(flags, {"gaurdian": True})
    settings = Settings(
        data_dir=tmp_path,
        flags_file=flags,
        flags_refresh_s=0.05,
        flags={"Guardian": True, "guardian": False},
    )
    pm = get_plugin_manager(settings, entry_points=False)
    for _ in range(3):
        assert not feature_enabled(pm, "guardian", ACME)  # the typo is not the flag
        time.sleep(0.06)
    from_file, from_settings = sorted(flag_warnings(caplog))
    assert from_file.startswith(f"flags file {flags}: unknown flag 'gaurdian'")
    assert "'gaurdian' (did you mean 'guardian'?)" in from_file
    assert from_settings.startswith("setting flags (env WATCHLLM_FLAGS): unknown flag 'Guardian'")
    assert "(did you mean 'guardian'?)" in from_settings

    # A change is a new load: warned again, about what is unknown now.
    caplog.clear()
    write_json(flags, {"guardian": True, "zzz\nINFO forged": True, "gaurdian": False})
    wait_for(lambda: feature_enabled(pm, "guardian", ACME), within_s=1.0)
    (changed,) = flag_warnings(caplog)
    assert "unknown flags 'gaurdian' (did you mean 'guardian'?), 'zzz\\nINFO forged'" in changed
    feature_enabled(pm, "guardian", ACME)
    assert len(flag_warnings(caplog)) == 1


def test_a_declared_flag_is_known(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from watchllm_ext.flags import declare_flag, known_flags

    caplog.set_level(logging.WARNING, logger="watchllm.flags")
    name = f"beta_{uuid.uuid4().hex[:8]}"
    assert "guardian" in known_flags()  # Guardian's, known whether or not it is loaded
    settings = Settings(data_dir=tmp_path, flags={name: True})
    pm = get_plugin_manager(settings, entry_points=False)
    # A plugin imported after the built-in provider was made declares in time: the settings
    # are judged at the first ask (or at start), not when the provider is made.
    assert declare_flag(name, "a plugin's beta") == name
    assert feature_enabled(pm, name, ACME)
    assert flag_warnings(caplog) == []
    assert known_flags()[name] == "a plugin's beta"


def test_a_server_warns_at_start_and_when_the_file_changes(
    server_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No flag is asked for (no Guardian rules, no request): the typo in the settings is
    reported at start, one written to the flags file while the server runs when it changes."""
    caplog.set_level(logging.WARNING, logger="watchllm.flags")
    flags = tmp_path / "flags.json"
    write_json(flags, {})
    server_factory(flags={"gaurdian": True}, flags_file=flags, flags_refresh_s=0.05)
    wait_for(lambda: len(flag_warnings(caplog)) == 1, within_s=5.0)
    assert "setting flags (env WATCHLLM_FLAGS): unknown flag 'gaurdian'" in flag_warnings(caplog)[0]
    write_json(flags, {"guardain": True})
    wait_for(lambda: len(flag_warnings(caplog)) == 2, within_s=5.0)
    assert "'guardain' (did you mean 'guardian'?)" in flag_warnings(caplog)[1]
    time.sleep(0.3)
    assert len(flag_warnings(caplog)) == 2  # once per change
