"""plugins.call_hook (the per-request hooks' direct call) gives what pluggy's own call gives:
the same results in the same order, the same first result, the same error (as PluginFailed
naming the plugin), and pluggy itself where it has more to do (wrappers, a missing argument)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pluggy
import pytest

from watchllm_ext import hookimpl
from watchllm_ext.auth import Principal
from watchllm_ext.plugins import PluginFailed, call_hook, get_plugin_manager
from watchllm_ext.settings import Settings

ALICE = Principal("acme", frozenset({"ingest"}))


class Says:
    """Answers every per-request hook with its name (or None), and logs each call."""

    def __init__(self, name: str | None, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def _called(self, hook: str) -> str | None:
        self.log.append(f"{self.name}:{hook}")
        if self.fail:
            raise LookupError(f"{self.name} failed")
        return self.name

    @hookimpl
    def authenticate(self, token: str) -> Any:
        return self._called("authenticate")

    @hookimpl
    def check_quota(self, principal: Principal, n_events: int) -> Any:
        return self._called("check_quota")

    @hookimpl
    def validate_event(self, event: Any) -> Any:
        return self._called("validate_event")


class First(Says):
    @hookimpl(tryfirst=True)
    def authenticate(self, token: str) -> Any:
        return self._called("authenticate")

    @hookimpl(tryfirst=True)
    def check_quota(self, principal: Principal, n_events: int) -> Any:
        return self._called("check_quota")


class Last(Says):
    @hookimpl(trylast=True)
    def authenticate(self, token: str) -> Any:
        return self._called("authenticate")

    @hookimpl(trylast=True)
    def check_quota(self, principal: Principal, n_events: int) -> Any:
        return self._called("check_quota")


class Wraps:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    @hookimpl(wrapper=True)
    def check_quota(self, principal: Principal, n_events: int) -> Iterator[None]:
        self.log.append("wrapper:before")
        result = yield
        self.log.append("wrapper:after")
        return [*result, "wrapped"]


KWARGS = {
    "authenticate": {"token": "t", "request": None},
    "check_quota": {"principal": ALICE, "n_events": 3, "user_id": None, "route": None},
    "validate_event": {"event": object(), "principal": ALICE},
}


def managers(make: Any) -> tuple[pluggy.PluginManager, list[str], pluggy.PluginManager, list[str]]:
    """Two plugin managers with the built-ins and the same extra plugins (each with its log)."""
    out: list[Any] = []
    for _ in range(2):
        log: list[str] = []
        pm = get_plugin_manager(Settings(), make(log), entry_points=False)
        out += [pm, log]
    return tuple(out)  # type: ignore[return-value]


SETS = {
    "none": lambda log: [],
    "one answer": lambda log: [Says("a", log)],
    "none answer": lambda log: [Says(None, log), Says(None, log)],
    "ordered": lambda log: [
        Says("a", log),
        Last("last", log),
        First("first", log),
        Says(None, log),
        Says("b", log),
    ],
    "first says nothing": lambda log: [First(None, log), Says("b", log)],
    "a failure": lambda log: [Says("a", log), Says("boom", log, fail=True), Says("c", log)],
    "a wrapper": lambda log: [Says("a", log), Wraps(log), Says("b", log)],
}


@pytest.mark.parametrize("plugins", list(SETS), ids=list(SETS))
@pytest.mark.parametrize("hook", list(KWARGS))
def test_call_hook_is_pluggys_call(plugins: str, hook: str) -> None:
    direct_pm, direct_log, pluggy_pm, pluggy_log = managers(SETS[plugins])
    try:
        want: Any = getattr(pluggy_pm.hook, hook)(**KWARGS[hook])
    except LookupError as exc:
        want = exc.args
    try:
        got: Any = call_hook(getattr(direct_pm.hook, hook), **KWARGS[hook])
    except PluginFailed as exc:
        # pluggy's error, as a 500 that names the plugin and the hook (the client sees no
        # exception text: it may hold data).
        assert isinstance(exc.__cause__, LookupError)
        assert exc.status == 500 and exc.extra == {"hook": hook, "plugin": "test_call_hook.Says#2"}
        assert "boom failed" not in exc.message
        got = exc.__cause__.args
    assert got == want
    assert direct_log == pluggy_log
    if plugins == "a wrapper" and hook == "check_quota":
        assert got[-1] == "wrapped"  # pluggy ran the wrapper


def test_a_missing_argument_is_pluggys_error_and_runs_nothing() -> None:
    log: list[str] = []
    pm = get_plugin_manager(Settings(), [Says("a", log), Says("b", log)], entry_points=False)
    with pytest.warns(UserWarning), pytest.raises(pluggy.HookCallError, match="n_events"):
        call_hook(pm.hook.check_quota, principal=ALICE)
    assert log == []
