"""Guardian mode through a real server: rules over the ingest stream and the stored figures,
one alert and one recovery per episode, alert events read back through the analytics API,
and a block rule that denies the host's pre-request check until the episode ends."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, prompt_call
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from stores import EVERY_STORE

from watchllm_ext import hookimpl
from watchllm_ext.auth import Principal
from watchllm_ext.guardian import Alert, GuardianRule
from watchllm_ext.guardian.engine import MAX_SUBJECTS_PER_PROJECT, Engine
from watchllm_ext.guardian.plugin import alert_event
from watchllm_ext.quota import QuotaDecision
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.settings import Settings

GUARDIAN_ON = {"guardian": {"projects": {"acme": True}}}


def iso(seconds_ago: float = 0.0) -> str:
    stamp = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def call(**fields: Any) -> dict[str, Any]:
    fields.setdefault("timestamp", iso())
    return prompt_call(f"c-{uuid.uuid4().hex[:12]}", **fields)


class Recorder:
    """Keeps every alert it is told of; also the host-like route that asks the quota check
    before "calling the LLM", as the host middleware does (n_events=0, the user, the route)."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.lock = threading.Lock()

    @hookimpl
    async def on_alert(self, alert: Alert) -> None:
        with self.lock:
            self.alerts.append(alert)

    @hookimpl
    def register_routes(self, settings: Settings) -> list[Route]:
        async def llm_call(request: Request) -> JSONResponse:
            wl = request.app.state.watchllm
            user = request.query_params.get("user")
            await wl.check_quota(Principal("acme", frozenset({"ingest"})), 0, user, "/-/llm")
            return JSONResponse({"called": True})

        return [Route("/-/llm", llm_call)]

    def states(self) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [(a.state, a.rule.name, a.subject) for a in self.alerts]

    def wait(self, n: int, within_s: float = 20.0) -> list[Alert]:
        deadline = time.monotonic() + within_s
        while len(self.alerts) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.alerts)} alerts, not {n}: {self.states()}")
            time.sleep(0.02)
        return list(self.alerts)


def start(
    server_factory: Any, rules: list[dict[str, Any]], **extra: Any
) -> tuple[Running, Recorder]:
    recorder = Recorder()
    settings: dict[str, Any] = {
        "flags": GUARDIAN_ON,
        "guardian_rules": rules,
        "guardian_interval_s": 0.2,
        **extra,
    }
    return server_factory(plugin_objects=(recorder,), **settings), recorder


def write_flags(path: Path, flags: dict[str, Any]) -> None:
    """Write a flags file with a new modification time, whatever the clock's tick."""
    stamp = max(time.time_ns(), path.stat().st_mtime_ns + 10_000_000)
    path.write_text(json.dumps(flags))
    os.utime(path, ns=(stamp, stamp))


def send(server: Running, events: list[dict[str, Any]]) -> None:
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202, r.text
    server.flush()


@EVERY_STORE
def test_cost_episode_fires_once_recovers_once_and_is_queryable(server_factory: Any) -> None:
    rule = {"name": "spend", "metric": "cost_usd", "threshold": 1.0, "window_s": 3}
    server, recorder = start(server_factory, [rule])
    send(server, [call(cost_estimate_usd=0.6)])
    time.sleep(0.5)
    assert recorder.alerts == []  # 0.6 is under the threshold
    send(server, [call(cost_estimate_usd=0.6)])  # 1.2: over
    send(server, [call(cost_estimate_usd=0.6)])  # 1.8: the same episode, no second alert
    fired = recorder.wait(1)[0]
    assert (fired.state, fired.rule.name, fired.project_id) == ("firing", "spend", "acme")
    assert fired.value == pytest.approx(1.2)
    # Recovery once the window has slid past the spend (3 s), and only one.
    (_, recovered) = recorder.wait(2, within_s=30)
    assert recovered.state == "recovered" and recovered.episode_id == fired.episode_id
    time.sleep(0.6)
    assert recorder.states() == [("firing", "spend", None), ("recovered", "spend", None)]

    # The alert event, through the analytics API.
    server.flush()
    logs = server.client.get(
        "/v1/analytics/logs",
        params={"event_type": "cost_threshold_exceeded", "period": "1h"},
        headers=server.headers(),
    )
    assert logs.status_code == 200, logs.text
    (row,) = logs.json()["events"]
    assert row["event_id"] == recorder.alerts[0].event_id == f"guardian-{fired.episode_id}"
    detail = server.client.get(f"/v1/analytics/event/{row['event_id']}", headers=server.headers())
    assert detail.status_code == 200, detail.text
    event = detail.json()["event"]
    assert event["threshold_usd"] == 1.0 and event["actual_usd"] == pytest.approx(1.2)
    assert event["alert_window"] == "3s"  # the stored column's name (docs/EVENTS.md)
    assert event["metadata"]["guardian_rule"] == "spend"
    assert "guardian" in event["tags"]
    # /metrics counts both ends of the episode.
    metrics = server.client.get("/metrics").text
    assert 'watchllm_alerts_total{rule="spend",state="firing"} 1.0' in metrics
    assert 'watchllm_alerts_total{rule="spend",state="recovered"} 1.0' in metrics
    assert 'watchllm_alerts_firing{rule="spend"} 0.0' in metrics


def test_alert_events_are_stored_whatever_the_projects_quota(server_factory: Any) -> None:
    """An alert event is the server's own record, not the project's usage: a quota plugin
    whose plan the client's events used up (it denies every later ingest) is not asked about
    it, and the firing is stored as on_alert is told of it."""

    class Plan:
        """Two events of ingestion, then every batch denied."""

        def __init__(self) -> None:
            self.used = 0
            self.asked: list[tuple[str | None, int]] = []

        @hookimpl
        def check_quota(self, principal: Principal, n_events: int) -> QuotaDecision | None:
            if n_events == 0:
                return None
            self.asked.append((principal.key_id, n_events))
            if self.used + n_events > 2:
                return QuotaDecision(False, reason="the plan's events are used up")
            self.used += n_events
            return None

    plan, recorder = Plan(), Recorder()
    rule = {"name": "spend", "metric": "cost_usd", "threshold": 1.0, "window_s": 3600}
    server = server_factory(
        plugin_objects=(plan, recorder),
        flags=GUARDIAN_ON,
        guardian_rules=[rule],
        guardian_interval_s=0.2,
    )
    send(server, [call(cost_estimate_usd=0.6), call(cost_estimate_usd=0.6)])  # the plan: spent
    (fired,) = recorder.wait(1)
    assert fired.state == "firing"
    assert fired.event_id == f"guardian-{fired.episode_id}"  # stored
    server.flush()
    rows = server.query(
        "SELECT event_id FROM events FINAL WHERE event_type = 'cost_threshold_exceeded'"
    )
    assert rows == [{"event_id": fired.event_id}]
    assert [n for _, n in plan.asked] == [2]  # the client's batch only
    # The client's next batch is still denied: only the server's own events pass.
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": [call()]})
    assert r.status_code == 429, r.text


@pytest.mark.parametrize(
    ("rule", "crossing", "recovering"),
    [
        (
            {"name": "slow", "metric": "latency_p95_ms", "threshold": 1000, "min_events": 5},
            [call(latency_ms=2000.0) for _ in range(5)],
            [call(latency_ms=100.0) for _ in range(95)],
        ),
        (
            {"name": "errors", "metric": "error_rate", "threshold": 0.5, "min_events": 4},
            [call(status="error")] * 0
            + [call(status="error") for _ in range(3)]
            + [call(status="success")],
            [call(status="success") for _ in range(4)],
        ),
    ],
    ids=["latency_p95", "error_rate"],
)
def test_performance_rules_fire_and_recover_on_data(
    server_factory: Any, rule: dict[str, Any], crossing: list[Any], recovering: list[Any]
) -> None:
    server, recorder = start(server_factory, [rule])
    send(server, crossing)
    (fired,) = recorder.wait(1)
    assert fired.state == "firing" and fired.value is not None and fired.value > rule["threshold"]
    send(server, recovering)  # the window now holds good figures: recovered without waiting
    alerts = recorder.wait(2)
    assert [a.state for a in alerts] == ["firing", "recovered"]
    server.flush()
    rows = server.query(
        "SELECT metric, metric_threshold, metric_actual, alert_window FROM events"
        " WHERE event_type = 'performance_alert'"
    )
    assert rows == [
        {
            "metric": rule["metric"],
            "metric_threshold": float(rule["threshold"]),
            "metric_actual": pytest.approx(fired.value),
            "alert_window": "1h",
        }
    ]


def test_repeated_failures_per_run(server_factory: Any) -> None:
    rule = {"name": "flaky", "metric": "failures", "per": "run", "threshold": 2, "window_s": 2}

    def failure(run: str) -> dict[str, Any]:
        return {
            "event_id": f"f-{uuid.uuid4().hex[:12]}",
            "event_type": "assertion_failed",
            "run_id": run,
            "timestamp": iso(),
            "assertion_name": "is_json",
        }

    server, recorder = start(server_factory, [rule])
    send(server, [failure("run-a"), failure("run-a"), failure("run-b")])
    time.sleep(0.5)
    assert recorder.alerts == []  # two in run-a: not over 2
    send(server, [failure("run-a"), failure("run-b")])
    (fired,) = recorder.wait(1)
    assert (fired.subject, fired.value) == ("run-a", 3.0)
    alerts = recorder.wait(2, within_s=30)  # the window slides past them
    assert [(a.state, a.subject) for a in alerts] == [("firing", "run-a"), ("recovered", "run-a")]
    server.flush()
    (row,) = server.query(
        "SELECT run_id, metric FROM events WHERE event_type = 'performance_alert'"
    )
    assert row == {"run_id": "run-a", "metric": "failures"}


def test_block_rule_denies_the_user_until_recovery(server_factory: Any) -> None:
    rule = {
        "name": "user-budget",
        "metric": "cost_usd",
        "per": "user",
        "threshold": 1.0,
        "window_s": 2,
        "block": True,
    }
    server, recorder = start(server_factory, [rule])
    assert server.client.get("/-/llm", params={"user": "alice"}).status_code == 200
    send(server, [call(user_id="alice", cost_estimate_usd=1.5), call(user_id="bob")])
    recorder.wait(1)
    denied = server.client.get("/-/llm", params={"user": "alice"})
    assert denied.status_code == 429, denied.text
    assert 'watchllm_alerts_firing{rule="user-budget"} 1.0' in server.client.get("/metrics").text
    assert "user-budget" in denied.json()["message"] and "alice" in denied.json()["message"]
    assert int(denied.headers["Retry-After"]) >= 1
    assert server.client.get("/-/llm", params={"user": "bob"}).status_code == 200
    # The blocked user's telemetry is still taken (the episode's end is seen in it).
    send(server, [call(user_id="alice", cost_estimate_usd=0.1)])
    recorder.wait(2, within_s=30)
    assert server.client.get("/-/llm", params={"user": "alice"}).status_code == 200
    metrics = server.client.get("/metrics").text
    assert 'watchllm_quota_denials_total{check="host"} 1.0' in metrics


def test_one_projects_users_never_push_out_another_projects(server_factory: Any) -> None:
    """The subject bound is per project: project beta's 10,050 users evict 50 of beta's own
    (counted in /metrics), never acme's user, whose 6 + 6 USD still fires the rule."""
    rule = {"name": "user-spend", "metric": "cost_usd", "per": "user", "threshold": 10}
    flags = {"guardian": {"projects": {"acme": True, "beta": True}}}
    server, recorder = start(server_factory, [rule], flags=flags)
    beta = server.keys.create("beta", scope="ingest")
    time.sleep(0.5)  # the key file is reread every 0.2 s in tests
    send(server, [call(user_id="alice", cost_estimate_usd=6.0)])
    users = MAX_SUBJECTS_PER_PROJECT + 50
    for first in range(0, users, 1_000):
        batch = [
            call(project_id="beta", user_id=f"u{i}", cost_estimate_usd=0.01)
            for i in range(first, min(users, first + 1_000))
        ]
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(beta), json={"events": batch}
        )
        assert r.status_code == 202, r.text
    server.flush()
    send(server, [call(user_id="alice", cost_estimate_usd=6.0)])
    (fired,) = recorder.wait(1)
    assert (fired.project_id, fired.subject, fired.value) == ("acme", "alice", 12.0)
    metrics = server.client.get("/metrics").text
    assert 'watchllm_guardian_evictions_total{rule="user-spend"} 50.0' in metrics


def test_guardian_flag_off_means_no_alerts(server_factory: Any, tmp_path: Path) -> None:
    rule = {"name": "spend", "metric": "cost_usd", "threshold": 0.1, "window_s": 60}
    server, recorder = start(server_factory, [rule], flags={})
    send(server, [call(cost_estimate_usd=5.0)])
    time.sleep(0.6)  # three checks
    assert recorder.alerts == []
    assert server.query("SELECT count() AS n FROM events")[0]["n"] == 1


def guardian_log(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "watchllm.guardian" and text in r.getMessage()
    ]


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, within_s: float = 15.0) -> str:
    deadline = time.monotonic() + within_s
    while not (found := guardian_log(caplog, text)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {text!r}: {caplog.text}")
        time.sleep(0.02)
    return found[0]


@EVERY_STORE
def test_stored_figures_fire_after_the_flag_is_turned_on(
    server_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Events stored while Guardian was off (or before a restart) are never in the stream's
    windows; the periodic check reads them from the store (the hourly rollup and raw rows).
    Turned off (here by a typo in the flag's name), the episode ends without a "recovered"
    notice (the figure never went back under), which is logged once, as is the turning on
    again, after which the breach that still holds is a new episode."""
    caplog.set_level(logging.INFO)
    flags = tmp_path / "flags.json"
    flags.write_text("{}")
    rule = {"name": "hourly", "metric": "cost_usd", "threshold": 2.0, "window_s": 3600}
    server, recorder = start(
        server_factory, [rule], flags={}, flags_file=flags, flags_refresh_s=0.1
    )
    send(server, [call(cost_estimate_usd=1.5, timestamp=iso(600)) for _ in range(2)])
    time.sleep(0.6)
    assert recorder.alerts == []
    write_flags(flags, {"guardian": {"projects": {"acme": True}}})
    (fired,) = recorder.wait(1)
    assert fired.source == "rollup" and fired.value == pytest.approx(3.0)
    time.sleep(0.6)
    assert len(recorder.alerts) == 1  # still one episode, check after check
    write_flags(flags, {"gaurdian": True})  # the typo turns Guardian off
    line = wait_for_log(caplog, "Guardian is off for project acme")
    assert "1 firing episode(s) end without a recovery notice: hourly" in line
    time.sleep(0.6)  # three checks
    assert recorder.states() == [("firing", "hourly", None)]  # no "recovered"
    assert len(guardian_log(caplog, "Guardian is off")) == 1
    assert not guardian_log(caplog, "recovered")
    assert 'watchllm_alerts_firing{rule="hourly"} 0.0' in server.client.get("/metrics").text

    write_flags(flags, {"guardian": True})
    wait_for_log(caplog, "Guardian is on again for project acme")
    (_, again) = recorder.wait(2)
    assert again.state == "firing" and again.episode_id != fired.episode_id
    time.sleep(0.6)
    assert len(guardian_log(caplog, "Guardian is on again")) == 1
    assert len(recorder.alerts) == 2


class Switch:
    """Turns the `guardian` flag of project acme on and off through one flag provider."""

    def __init__(self, provider: str, tmp_path: Path) -> None:
        self.provider = provider
        self.path = tmp_path / "configcat.json"
        self.domain = f"watchllm-{uuid.uuid4().hex}"
        self.set(None)

    def settings(self) -> dict[str, Any]:
        if self.provider == "configcat":
            return {
                "plugins": ["watchllm_ext.flags.configcat_provider"],
                "configcat_override_file": self.path,
            }
        return {
            "plugins": ["watchllm_ext.flags.openfeature_provider"],
            "openfeature_domain": self.domain,
        }

    def set(self, on: bool | None) -> None:
        if self.provider == "configcat":
            flags = {} if on is None else {"guardian": on}
            stamp = time.time_ns() + 50_000_000  # a new modification time, whatever the clock
            # Whole or not at all: ConfigCat reads the file at any evaluation, and a read of a
            # half-written file (no flags: Guardian off) turned it off and on again between
            # two checks, a second "firing" (seen once late in a loaded full run).
            fresh = self.path.with_suffix(".new")
            fresh.write_text(json.dumps({"flags": flags}))
            os.utime(fresh, ns=(stamp, stamp))
            os.replace(fresh, self.path)
            return
        from openfeature import api
        from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider

        variant = "on" if on else "off"
        flags = (
            {} if on is None else {"guardian": InMemoryFlag(variant, {"on": True, "off": False})}
        )
        api.set_provider(InMemoryProvider(flags), domain=self.domain)


@pytest.mark.parametrize("provider", ["configcat", "openfeature"])
def test_guardian_follows_a_flag_provider_flip(
    server_factory: Any, tmp_path: Path, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    switch = Switch(provider, tmp_path)
    rule = {"name": "hourly", "metric": "cost_usd", "threshold": 2.0, "window_s": 3600}
    server, recorder = start(server_factory, [rule], flags={}, **switch.settings())
    send(server, [call(cost_estimate_usd=1.5) for _ in range(2)])
    time.sleep(0.6)
    assert recorder.alerts == []  # the flag is unknown to the provider: off by default
    switch.set(True)
    # ConfigCat's override file and OpenFeature's in-memory provider: seen at the next
    # evaluation, here the next check (guardian_interval_s = 0.2; the bound leaves room for
    # a loaded machine's store queries: 5 s was once too short late in a full CI run).
    (fired,) = recorder.wait(1, within_s=15)
    assert fired.value == pytest.approx(3.0)
    switch.set(False)
    # Turned off: no "recovered" notice (the figure never went back under), a log line.
    wait_for_log(caplog, "Guardian is off for project acme")
    time.sleep(0.6)
    assert recorder.states() == [("firing", "hourly", None)]


def test_alert_events_are_valid_events() -> None:
    now = datetime.now(UTC)
    for metric in ("cost_usd", "latency_p95_ms", "error_rate", "failures"):
        rule = GuardianRule(name="r", metric=metric, per="user", threshold=0.5, window_s=5400)
        alert = Alert("firing", rule, "acme", "u1", 0.75, "ep1", now, now, "stream")
        (event,) = EVENT_LIST_ADAPTER.validate_python([alert_event(alert)])
        assert event.user_id == "u1" and event.window == "90m"


def test_engine_ignores_old_events_and_bounds_its_keys() -> None:
    rule = GuardianRule(name="r", metric="cost_usd", per="run", threshold=1.0, window_s=60)
    engine = Engine([rule])

    class Ev:
        def __init__(self, run: str, ago: float) -> None:
            self.event_type = "prompt_call"
            self.project_id = "acme"
            self.run_id = run
            self.cost_estimate_usd = 5.0
            self.timestamp = datetime.now(UTC) - timedelta(seconds=ago)

    # An import of last hour's data opens nothing.
    assert engine.observe([Ev("old", 3600)], lambda p: True) == set()
    touched = engine.observe(
        [Ev(f"run{i}", 0) for i in range(MAX_SUBJECTS_PER_PROJECT + 5)], lambda p: True
    )
    assert len(touched) == MAX_SUBJECTS_PER_PROJECT + 5
    # The least recently fed runs went first.
    assert len(engine.windows) == MAX_SUBJECTS_PER_PROJECT
    assert ("r", "acme", "run4") not in engine.windows
    assert ("r", "acme", "run5") in engine.windows
    # A firing key is never dropped: its episode must be able to end.
    assert len(engine.evaluate()) == MAX_SUBJECTS_PER_PROJECT
    engine.observe([Ev("one-more", 0)], lambda p: True)
    assert len(engine.windows) == MAX_SUBJECTS_PER_PROJECT + 1
    with pytest.raises(ValueError, match="block needs per"):
        GuardianRule(name="x", metric="cost_usd", per="run", threshold=1, block=True)


def test_rule_names_are_unique(tmp_path: Path) -> None:
    from watchllm_ext.plugins import get_plugin_manager
    from watchllm_ext.settings import SettingsError

    rule = {"name": "same", "metric": "cost_usd", "threshold": 1.0}
    settings = Settings(data_dir=tmp_path, guardian_rules=[rule, rule])
    with pytest.raises(SettingsError, match="'same' is used twice"):
        get_plugin_manager(settings, entry_points=False)


def test_block_rule_stops_the_host_before_its_llm_call(tmp_path: Path) -> None:
    """The whole loop in a host app: its handler's LLM calls (recorded by WatchLLMMiddleware)
    cross a per-user budget rule; the middleware's pre-request check is then denied, so the
    next request of that user is answered 429 before the handler (and its LLM call) runs,
    until the window slides past the spend."""
    import httpx
    from conftest import ServerThread, make_settings
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from watchllm_ext import create_app
    from watchllm_ext.middleware import Recorder as HostRecorder
    from watchllm_ext.middleware import WatchLLMMiddleware

    settings = make_settings(
        tmp_path,
        flags=GUARDIAN_ON,
        host_project_id="acme",
        guardian_interval_s=0.2,
        guardian_rules=[
            {
                "name": "user-spend",
                "metric": "cost_usd",
                "per": "user",
                "threshold": 1.0,
                "window_s": 2,
                "block": True,
            }
        ],
    )
    calls: list[str] = []

    async def chat(request: Request) -> JSONResponse:
        rec: HostRecorder = request.state.watchllm
        calls.append(request.headers["X-User-Id"])
        rec.prompt_call("gpt-4o", tokens_input=10, tokens_output=5, cost_estimate_usd=0.6)
        return JSONResponse({"ok": True})

    wl_app = create_app(settings, plugins=[recorder := Recorder()])
    host = Starlette(
        routes=[Route("/chat", chat, methods=["POST"]), Mount("/watchllm", app=wl_app)],
        middleware=[Middleware(WatchLLMMiddleware, watchllm=wl_app)],
    )
    alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/chat", headers=alice).status_code == 200  # 0.6
        assert client.post("/chat", headers=alice).status_code == 200  # 1.2: over
        (fired,) = recorder.wait(1)
        assert (fired.subject, fired.rule.block) == ("alice", True)
        denied = client.post("/chat", headers=alice)
        assert denied.status_code == 429, denied.text
        assert "user-spend" in denied.json()["message"]
        assert client.post("/chat", headers=bob).status_code == 200  # others go on
        assert calls == ["alice", "alice", "bob"]  # the denied call never ran
        recorder.wait(2, within_s=30)  # the spend left the window
        assert client.post("/chat", headers=alice).status_code == 200
        assert calls[-1] == "alice"


def test_a_big_batch_is_judged_off_the_loop_with_a_one_percent_p95(server_factory: Any) -> None:
    """600 calls (over OFFLOAD_EVENTS: fed on a worker thread) with latencies 1..600 ms: the
    p95 by nearest rank is 570 ms, which the sketch gives within 1%."""
    from watchllm_ext.guardian.plugin import OFFLOAD_EVENTS

    rule = {"name": "p95", "metric": "latency_p95_ms", "threshold": 500, "min_events": 100}
    server, recorder = start(server_factory, [rule])
    events = [call(latency_ms=float(ms)) for ms in range(1, 601)]
    assert len(events) >= OFFLOAD_EVENTS
    send(server, events)
    (fired,) = recorder.wait(1)
    assert fired.value == pytest.approx(570, rel=0.01)


def test_window_sums_and_sketch_follow_expiry() -> None:
    import math
    import random

    from watchllm_ext.guardian.engine import Window

    rng = random.Random(7)
    window = Window(sketch=True)
    values = [rng.lognormvariate(5, 1.5) for _ in range(5000)] + [0.0] * 10
    for ts, value in enumerate(values):
        window.add(float(ts), value)
    for cut in (0, 2500, 4990):
        window.expire(float(cut))
        kept = sorted(values[cut:])
        exact = kept[math.ceil(0.95 * len(kept)) - 1]
        assert window.quantile(0.95) == pytest.approx(exact, rel=0.01)
        assert window.total == pytest.approx(math.fsum(kept))
        assert sum(window.buckets.values()) == len(kept)
    window.expire(1e9)
    assert (window.total, window.buckets) == (0.0, {})


def test_forgetting_a_project_ends_its_episodes_without_recoveries() -> None:
    """Guardian turned off for a project: its firing episodes and blocks go, and no later
    evaluation reports them "recovered" (the other project's episode goes on)."""
    rule = GuardianRule(
        name="budget", metric="cost_usd", per="user", threshold=1.0, window_s=60, block=True
    )
    engine = Engine([rule])

    class Ev:
        def __init__(self, project: str, user: str) -> None:
            self.event_type = "prompt_call"
            self.project_id = project
            self.user_id = user
            self.cost_estimate_usd = 5.0
            self.timestamp = datetime.now(UTC)

    engine.observe([Ev("acme", "alice"), Ev("acme", "bob"), Ev("beta", "carol")], lambda p: True)
    assert [a.state for a in engine.evaluate()] == ["firing"] * 3
    assert engine.blocked("acme", "alice") is not None
    ended = engine.forget_project("acme")
    assert ended == [("budget", "acme", "alice"), ("budget", "acme", "bob")]
    assert engine.blocked("acme", "alice") is None  # the block lifts with it
    assert engine.evaluate() == []  # no "recovered" for acme's episodes, now or later
    assert engine.blocked("beta", "carol") is not None
    assert engine.projects() == {"beta"}
