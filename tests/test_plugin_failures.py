"""A plugin's bug is answered as one: a 500 that names the plugin and the hook, nothing of
the request spooled, usage given back, and the other clients' events untouched. Plugins that
cannot work (a sink without an async write, two routes on one path, a module that fails to
load) stop the start with a message naming them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Running, make_settings, prompt_call
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from watchllm_ext import hookimpl
from watchllm_ext.app import create_app
from watchllm_ext.auth import Principal
from watchllm_ext.plugins import PluginError, get_plugin_manager
from watchllm_ext.quota import QuotaDecision
from watchllm_ext.settings import Settings


class Counted:
    """A quota plugin that counts what it allowed and what came back."""

    def __init__(self) -> None:
        self.taken = 0
        self.given_back = 0

    @hookimpl
    def check_quota(self, n_events: int) -> None:
        self.taken += n_events

    @hookimpl
    def refund_quota(self, n_events: int) -> None:
        self.given_back += n_events


class BreaksBad:
    """A transform that leaves the events of model 'bad' invalid (a negative count)."""

    @hookimpl
    def transform_events(self, events: list[Any]) -> None:
        for event in events:
            if event.event_type == "prompt_call" and event.model == "bad":
                event.tokens_input = -5


def _batch(server: Running, *events: dict[str, Any]) -> Any:
    return server.client.post(
        "/v1/events/batch", headers=server.headers(), json={"events": list(events)}
    )


def _stored(server: Running) -> list[str]:
    server.flush()
    return [r["event_id"] for r in server.query("SELECT event_id FROM events ORDER BY event_id")]


def test_an_event_a_transform_made_invalid_refuses_its_request_and_no_other(
    server_factory: Any,
) -> None:
    quota = Counted()
    server = server_factory(plugin_objects=(BreaksBad(), quota))
    good = _batch(server, *[prompt_call(f"g{i}") for i in range(5)])
    bad = _batch(server, prompt_call("b0"), prompt_call("b1", model="bad"))
    assert good.status_code == 202, good.text
    assert bad.status_code == 500, bad.text
    body = bad.json()
    assert body["error"] == "plugin_failed" and body["hook"] == "transform_events"
    assert body["plugin"] == "test_plugin_failures.BreaksBad"
    assert "event 1 (event_id 'b1') invalid: tokens_input:" in body["message"]
    # The store's insert of the good request is not refused for the bad one's sake.
    assert _stored(server) == [f"g{i}" for i in range(5)]
    sinks = server.wl.writer.stats()["sinks"].values()
    assert sum(sink["dead_letter_events_total"] for sink in sinks) == 0
    assert (quota.taken, quota.given_back) == (7, 2)


class MovesProject:
    @hookimpl
    def transform_events(self, events: list[Any]) -> None:
        for event in events:
            event.project_id = "someone-else"


def test_a_transform_that_moves_events_to_another_project_is_refused(
    server_factory: Any,
) -> None:
    server = server_factory(plugin_objects=(MovesProject(),))
    r = _batch(server, prompt_call("m1"))
    assert r.status_code == 500
    assert "project_id: 'someone-else' is not the key's project" in r.json()["message"]
    assert _stored(server) == []


class Raises:
    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hookimpl
    def transform_events(self, events: list[Any]) -> None:
        if self.hook == "transform_events":
            raise RuntimeError("secret detail of the plugin")

    @hookimpl
    def validate_event(self, event: Any) -> Any:
        # A mapping without its message is neither a problem nor None.
        return [{"field": "x"}] if self.hook == "validate_event" else None


@pytest.mark.parametrize("hook", ["transform_events", "validate_event"])
def test_a_hook_that_raises_or_answers_wrongly_is_a_500_naming_the_plugin(
    server_factory: Any, hook: str
) -> None:
    quota = Counted()
    server = server_factory(plugin_objects=(Raises(hook), quota))
    r = _batch(server, prompt_call("r1"), prompt_call("r2"))
    assert r.status_code == 500, r.text
    body = r.json()
    assert (body["error"], body["hook"]) == ("plugin_failed", hook)
    assert "test_plugin_failures.Raises" in body["plugin"]
    assert "secret detail" not in r.text  # the log has it; the client does not
    assert quota.given_back == 2
    assert server.client.get("/healthz").status_code == 200
    assert _stored(server) == []


class Drops:
    """Samples: keeps only the events whose id ends in 'keep'."""

    @hookimpl
    def transform_events(self, events: list[Any]) -> None:
        events[:] = [e for e in events if e.event_id.endswith("keep")]


def test_events_a_transform_drops_are_given_back_and_all_dropped_is_a_202(
    server_factory: Any,
) -> None:
    quota = Counted()
    server = server_factory(plugin_objects=(Drops(), quota))
    some = _batch(server, prompt_call("a-keep"), prompt_call("b"), prompt_call("c"))
    assert some.status_code == 202 and some.json()["event_ids"] == ["a-keep"]
    none = _batch(server, prompt_call("d"), prompt_call("e"))
    assert none.status_code == 202, none.text
    assert none.json() == {"project_id": "acme", "accepted": 0, "event_ids": []}
    assert (quota.taken, quota.given_back) == (5, 4)
    assert _stored(server) == ["a-keep"]


class AuthPlugin:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    @hookimpl(tryfirst=True)
    def authenticate(self, token: str) -> Any:
        return self.answer if token == "plugin-token" else None


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (Principal("acme", {"ingest", "read"}), 202),  # a set of scopes is taken as a frozenset
        (Principal("acme", ["ingest"]), 202),
        ({"project_id": "acme"}, 500),
        (Principal("bad project/../x", frozenset({"ingest"})), 500),
    ],
    ids=["set", "list", "dict", "bad-project"],
)
def test_authenticate_answers(server_factory: Any, answer: Any, status: int) -> None:
    server = server_factory(plugin_objects=(AuthPlugin(answer),))
    r = server.client.post(
        "/v1/events/batch",
        headers={"Authorization": "Bearer plugin-token"},
        json={"events": [prompt_call("a1")]},
    )
    assert r.status_code == status, r.text
    if status == 500:
        assert r.json()["hook"] == "authenticate"
        assert "test_plugin_failures.AuthPlugin" in r.json()["plugin"]


class Denies:
    @hookimpl
    def check_quota(self) -> QuotaDecision:
        return QuotaDecision(False, reason="denied by the test", retry_after_s=1)


def test_check_quota_implementations_after_a_denial_are_not_called(
    server_factory: Any,
) -> None:
    later = Counted()
    # Registered first, so called after the denial (pluggy: the last registered first).
    server = server_factory(plugin_objects=(later, Denies()))
    r = _batch(server, prompt_call("q1"))
    assert r.status_code == 429 and r.json()["message"] == "denied by the test"
    assert later.taken == 0


class EmptiesSpans:
    @hookimpl
    def transform_spans(self, spans: list[Any]) -> None:
        spans.clear()


def test_a_transform_spans_that_takes_rows_out_is_refused_not_stored_half(
    server_factory: Any,
) -> None:
    server = server_factory(plugin_objects=(EmptiesSpans(),))
    now = str(time.time_ns())
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b175",
        "name": "chat gpt-4o",
        "startTimeUnixNano": now,
        "endTimeUnixNano": now,
        "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}],
    }
    body = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
    r = server.client.post("/v1/traces", headers=server.headers(), json=body)
    assert r.status_code == 500, r.text
    assert "plugin 'test_plugin_failures.EmptiesSpans' failed in its transform_spans" in r.text
    assert "changed the list of span rows (1 -> 0)" in r.json()["message"]
    server.flush()
    assert server.query("SELECT count() AS n FROM spans")[0]["n"] == 0
    assert server.query("SELECT count() AS n FROM events")[0]["n"] == 0


class SyncSink:
    name = "sync"

    def write(self, events: Any) -> None:
        pass


class NamelessSink:
    async def write(self, events: Any) -> None:
        pass


class Sinks:
    def __init__(self, sink: Any) -> None:
        self.sink = sink

    @hookimpl
    def register_sinks(self) -> Any:
        return [self.sink]


@pytest.mark.parametrize(
    ("sink", "says"),
    [
        (SyncSink(), "its `write` must be an `async def` method"),
        (NamelessSink(), "has no name"),
    ],
    ids=["sync-write", "no-name"],
)
def test_a_sink_the_writer_cannot_use_stops_the_start(tmp_path: Path, sink: Any, says: str) -> None:
    app = create_app(make_settings(tmp_path), plugins=[Sinks(sink)])

    async def start() -> None:
        async with app.state.watchllm.running():
            pass

    with pytest.raises(PluginError, match=says) as caught:
        anyio.run(start)
    assert "test_plugin_failures." in str(caught.value)


def _route(path: str, method: str = "GET") -> Route:
    return Route(path, lambda request: PlainTextResponse("plugin"), methods=[method])


class Routes:
    def __init__(self, *routes: Route) -> None:
        self.routes = routes

    @hookimpl
    def register_routes(self) -> list[Route]:
        return list(self.routes)


def test_a_plugin_route_on_a_taken_path_stops_the_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(PluginError, match="both have a route POST /v1/traces"):
        create_app(settings, plugins=[Routes(_route("/v1/traces", "POST"))])
    with pytest.raises(PluginError, match="has a route GET /healthz, which is WatchLLM's own"):
        create_app(settings, plugins=[Routes(_route("/healthz"))])
    # Replacing a built-in's route: disable that plugin.
    create_app(
        settings.model_copy(update={"disable_plugins": ["receiver"]}),
        plugins=[Routes(_route("/v1/traces", "POST"))],
    )
    create_app(settings, plugins=[Routes(_route("/mine"), _route("/mine", "POST"))])


def test_plugins_that_fail_to_load_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('import boom')\n")
    (tmp_path / "raises_in_make.py").write_text(
        "def make_plugin(settings):\n    raise RuntimeError('make boom')\n"
    )
    (tmp_path / "wrong_args.py").write_text(
        "from watchllm_ext import hookimpl\n\n@hookimpl\ndef transform_events(evnts):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, says in [
        ("raises_on_import", "'raises_on_import' from settings cannot be imported: import boom"),
        ("raises_in_make", "'raises_in_make' from settings failed to load: make boom"),
        ("wrong_args", "'wrong_args' from settings cannot be registered: .*evnts"),
    ]:
        with pytest.raises(PluginError, match=says):
            get_plugin_manager(Settings(plugins=[module]), entry_points=False)
        sys.modules.pop(module, None)


def test_objects_passed_to_create_app_are_listed_by_class(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(Counted(), Counted()))
    r = server.client.get("/-/plugins", headers=server.headers())
    names = {p["name"] for p in r.json()["plugins"]}
    assert {"test_plugin_failures.Counted", "test_plugin_failures.Counted#2"} <= names


class Unmarked:
    def transform_events(self, events: list[Any]) -> None:  # no @hookimpl: never called
        pass

    @hookimpl
    def validate_event(self) -> None:
        return None


def test_a_hook_named_function_without_hookimpl_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="watchllm.plugins"):
        get_plugin_manager(Settings(), [Unmarked()], entry_points=False)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "plugin 'test_plugin_failures.Unmarked' has a transform_events not marked @hookimpl:"
        " it is never called"
    ]


class SetsAnObject:
    @hookimpl
    def transform_events(self, events: list[Any]) -> None:
        for event in events:
            event.metadata = {"handle": object()}


def test_a_transform_that_sets_a_value_without_json_is_a_500_naming_it(
    server_factory: Any,
) -> None:
    server = server_factory(plugin_objects=(SetsAnObject(),))
    r = _batch(server, prompt_call("o1"))
    assert r.status_code == 500, r.text
    assert r.json()["plugin"] == "test_plugin_failures.SetsAnObject"
    assert "its events have no JSON" in r.json()["message"]
    assert _stored(server) == []


class AnswersItself:
    @hookimpl
    def transform_events(self, events: list[Any]) -> None:
        raise HTTPException(418, "a plugin's own answer")


def test_a_hook_that_chooses_its_answer_is_answered_so_and_its_quota_given_back(
    server_factory: Any,
) -> None:
    quota = Counted()
    server = server_factory(plugin_objects=(AnswersItself(), quota))
    r = _batch(server, prompt_call("h1"), prompt_call("h2"))
    assert r.status_code == 418, r.text
    assert (quota.taken, quota.given_back) == (2, 2)
    assert _stored(server) == []
