"""Numeric extremes (issue 9, finding 1): every numeric field has a range the schema enforces,
every figure the analytics routes compute stays exact at the edges of those ranges (sums over
many events included), rows stored before the ranges existed cannot break a query, and the
hourly rollup refreshes every project even when one of them fails.

The figures are checked against plain Python, on every store (tests/stores.py)."""

from __future__ import annotations

import itertools
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from conftest import Running, make_settings, prompt_call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from stores import CHDB_ONLY, EVERY_STORE

from watchllm_ext.analytics import queries as Q
from watchllm_ext.analytics.rollup import ProjectBackoff, refresh_projects
from watchllm_ext.app import _run_background
from watchllm_ext.builtins.rollup import register_background_tasks
from watchllm_ext.schema import (
    EVENT_ADAPTER,
    MAX_COST_USD,
    MAX_LATENCY_MS,
    MAX_METRIC_ABS,
    MAX_SPEND_USD,
    MAX_STEP_NUMBER,
    MAX_TIMESTAMP,
    MAX_TOKENS,
    MIN_TIMESTAMP,
)
from watchllm_ext.store import Store, StoreError, load_migrations
from watchllm_ext.store.cluster import for_cluster

pytestmark = EVERY_STORE

BATCH = "/v1/events/batch"
ROUTE = "/v1/analytics"


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(t: datetime) -> int:
    return round(t.timestamp() * 1000)


def post(server: Running, events: list[dict[str, Any]], key: str | None = None) -> None:
    for i in range(0, len(events), 1000):
        r = server.client.post(
            BATCH, headers=server.headers(key), json={"events": events[i : i + 1000]}
        )
        assert r.status_code == 202, r.text[:2000]


def get(server: Running, path: str, project: str = "acme", **params: Any) -> Any:
    r = server.client.get(
        ROUTE + path, params={"project_id": project, **params}, headers=server.headers()
    )
    assert r.status_code == 200, f"{path} {params}: {r.status_code} {r.text[:2000]}"
    return r.json()


# --- the ranges, at both edges ------------------------------------------------------------


def _event(event_type: str, **fields: Any) -> dict[str, Any]:
    required: dict[str, dict[str, Any]] = {
        "prompt_call": {},
        "tool_call": {"tool_name": "search"},
        "agent_step": {"step_number": 1},
        "hallucination_detected": {"detection_method": "nli", "confidence": 0.5, "claim": "c"},
        "cost_threshold_exceeded": {"threshold_usd": 1.0, "actual_usd": 2.0, "window": "1h"},
        "performance_alert": {"metric": "p95", "threshold": 1.0, "actual": 2.0, "window": "1h"},
    }
    return {
        "event_id": "e1",
        "run_id": "r1",
        "timestamp": "2026-01-02T03:04:05Z",
        "event_type": event_type,
        **required[event_type],
        **fields,
    }


def _tool_item(latency: Any) -> dict[str, Any]:
    return _event("prompt_call", tool_calls=[{"tool_name": "t", "latency_ms": latency}])


# (what, event with the value, lowest accepted, highest accepted, refused below, refused above)
RANGES: list[tuple[str, Callable[[Any], dict[str, Any]], Any, Any, Any, Any]] = [
    *[
        (
            f"{kind}.latency_ms",
            lambda v, kind=kind: _event(kind, latency_ms=v),
            0.0,
            MAX_LATENCY_MS,
            -0.001,
            MAX_LATENCY_MS + 1,
        )
        for kind in ("prompt_call", "tool_call", "agent_step")
    ],
    ("tool_calls[].latency_ms", _tool_item, 0.0, MAX_LATENCY_MS, -0.001, MAX_LATENCY_MS + 1),
    (
        "cost_estimate_usd",
        lambda v: _event("prompt_call", cost_estimate_usd=v),
        0.0,
        MAX_COST_USD,
        -1e-9,
        MAX_COST_USD * (1 + 1e-15),
    ),
    *[
        (
            f"prompt_call.{name}",
            lambda v, name=name: _event("prompt_call", **{name: v}),
            0,
            MAX_TOKENS,
            -1,
            MAX_TOKENS + 1,
        )
        for name in ("tokens_input", "tokens_output")
    ],
    (
        "step_number",
        lambda v: _event("agent_step", step_number=v),
        0,
        MAX_STEP_NUMBER,
        -1,
        MAX_STEP_NUMBER + 1,
    ),
    (
        "confidence",
        lambda v: _event("hallucination_detected", confidence=v),
        0.0,
        1.0,
        -0.01,
        1.01,
    ),
    *[
        (
            name,
            lambda v, name=name: _event("cost_threshold_exceeded", **{name: v}),
            0.0,
            MAX_SPEND_USD,
            -0.01,
            MAX_SPEND_USD * 1.01,
        )
        for name in ("threshold_usd", "actual_usd")
    ],
    *[
        (
            name,
            lambda v, name=name: _event("performance_alert", **{name: v}),
            -MAX_METRIC_ABS,
            MAX_METRIC_ABS,
            -MAX_METRIC_ABS * 1.01,
            MAX_METRIC_ABS * 1.01,
        )
        for name in ("threshold", "actual")
    ],
]


@CHDB_ONLY  # the schema alone: no store involved
@pytest.mark.parametrize(
    ("what", "make", "low", "high", "below", "above"), RANGES, ids=[r[0] for r in RANGES]
)
def test_every_numeric_field_has_its_range(
    what: str, make: Callable[[Any], dict[str, Any]], low: Any, high: Any, below: Any, above: Any
) -> None:
    field = what.rsplit(".", 1)[-1].removesuffix("[]")
    for value in (low, high):
        EVENT_ADAPTER.validate_json(json.dumps(make(value)))
    for value in (below, above):
        with pytest.raises(ValidationError) as info:
            EVENT_ADAPTER.validate_json(json.dumps(make(value)))
        (error,) = info.value.errors()
        assert field in [str(p) for p in error["loc"]], (what, error)


# The values of the finding: each was accepted with 202 and then broke or skewed analytics.
FINDING = [
    ("cost_estimate_usd", 1.7e308),
    ("latency_ms", 1.7e308),
    ("cost_estimate_usd", 1e12),
    ("latency_ms", 1e20),
    ("latency_ms", 1e15),
]


@CHDB_ONLY  # validation happens before any store is involved
def test_the_findings_values_get_422_naming_the_field(server: Running) -> None:
    for i, (field, value) in enumerate(FINDING):
        r = server.client.post(
            BATCH,
            headers=server.headers(),
            json={"events": [prompt_call(f"x{i}", **{field: value})]},
        )
        assert r.status_code == 422, r.text
        body = r.json()
        (rejected,) = body["rejected"]
        assert [e["field"] for e in rejected["errors"]] == [field], body
        assert "less than or equal" in rejected["errors"][0]["message"], body
    server.flush()
    assert server.query("SELECT count() AS n FROM events")[0]["n"] in (0, "0")


# --- figures at the extremes, against Python ----------------------------------------------


def _expected(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure the routes give for `events`, computed as they define it."""
    calls = [e for e in events if e["event_type"] == "prompt_call"]
    lat = [e["latency_ms"] for e in calls if e.get("latency_ms") is not None]
    runs: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"cost": 0, "tokens_input": 0, "tokens_output": 0, "n": 0, "start": None, "end": 0}
    )
    for e in events:
        run = runs[e["run_id"]]
        t = _ms(datetime.fromisoformat(e["timestamp"]))
        run["start"] = t if run["start"] is None else min(run["start"], t)
        run["end"] = max(run["end"], t + int(e.get("latency_ms") or 0))
        run["cost"] += round((e.get("cost_estimate_usd") or 0) * 1e9)
        run["tokens_input"] += e.get("tokens_input") or 0
        run["tokens_output"] += e.get("tokens_output") or 0
        run["n"] += 1
    return {
        "total_events": len(events),
        "total_requests": len(calls),
        # integer nano-USD sums, as the store keeps them
        "total_cost": sum(round((e.get("cost_estimate_usd") or 0) * 1e9) for e in events) / 1e9,
        "tokens_input": sum(e.get("tokens_input") or 0 for e in events),
        "tokens_output": sum(e.get("tokens_output") or 0 for e in events),
        "avg_latency_ms": (sum(round(x * 1000) for x in lat) / 1000 / len(lat)) if lat else None,
        "latency_max": max(lat, default=None),
        "runs": dict(runs),
    }


def check_routes(
    server: Running,
    events: list[dict[str, Any]],
    start: datetime,
    end: datetime,
    project: str = "acme",
) -> dict[str, Any]:
    """Call every analytics route over [start, end) and compare its figures with Python."""
    want = _expected(events)
    window = {"from": _iso(start), "to": _iso(end)}

    stats = get(server, "/stats", project, **window)
    for name in ("total_events", "total_requests", "total_cost", "tokens_input", "tokens_output"):
        assert stats[name] == want[name], (name, stats[name], want[name])
    if want["avg_latency_ms"] is None:
        assert stats["avg_latency_ms"] is None
    else:
        assert stats["avg_latency_ms"] == pytest.approx(want["avg_latency_ms"], rel=1e-12)
        for p in ("p50", "p90", "p95", "p99"):  # DDSketch: 1% relative accuracy
            assert 0 <= stats["latency_ms"][p] <= want["latency_max"] * 1.02 + 1e-9, stats

    for group_by in (None, "model", "status", "event_type"):
        params = {**window, "interval": "1h", **({"group_by": group_by} if group_by else {})}
        series = get(server, "/timeseries", project, **params)["series"]
        points = [p for s in series.values() for p in s]
        assert sum(p["events"] for p in points) == want["total_events"], group_by
        assert sum(p["tokens_input"] for p in points) == want["tokens_input"], group_by
        assert sum(p["tokens_output"] for p in points) == want["tokens_output"], group_by
        cost = sum(p["cost"] for p in points)
        assert cost == pytest.approx(want["total_cost"], rel=1e-12, abs=1e-9), group_by
        for p in points:
            assert 0 <= p["latency_p95_ms"] <= MAX_LATENCY_MS * 1.02, p

    logs = get(server, "/logs", project, limit=1000, **window)
    assert sorted(e["event_id"] for e in logs["events"]) == sorted(e["event_id"] for e in events)

    runs = get(server, "/runs", project, limit=1000, **window)["runs"]
    assert {r["run_id"] for r in runs} == set(want["runs"])
    for run in runs:
        detail = get(server, f"/runs/{run['run_id']}", project)["run"]
        exp = want["runs"][run["run_id"]]
        for got in (run, detail):
            assert got["event_count"] == exp["n"], got
            assert got["tokens_input"] == exp["tokens_input"], got
            assert got["tokens_output"] == exp["tokens_output"], got
            assert got["cost"] == pytest.approx(exp["cost"] / 1e9, rel=1e-12, abs=1e-9), got
            assert got["duration_ms"] == exp["end"] - exp["start"], got
            # a sane end: after the start, at most the longest latency later, never year 0
            end_ms = _ms(datetime.fromisoformat(got["end"].replace("Z", "+00:00")))
            assert end_ms == exp["end"], got
            assert 0 <= got["duration_ms"] <= (exp["end"] - exp["start"]), got

    for e in events:
        stored = get(server, f"/event/{e['event_id']}", project)["event"]
        for name in ("cost_estimate_usd", "latency_ms", "tokens_input", "tokens_output"):
            assert stored.get(name) == e.get(name), (name, stored, e)
    return stats


def refresh(server: Running) -> int:
    # Nothing inserts meanwhile: no margin needed. Every project refreshes.
    result = refresh_projects(server.wl.store, margin=timedelta(0))
    assert not result.failed, result
    return result.hours


_cost = st.sampled_from([0.0, MAX_COST_USD]) | st.floats(0, MAX_COST_USD)
_latency = st.none() | st.sampled_from([0.0, MAX_LATENCY_MS]) | st.floats(0, MAX_LATENCY_MS)
_tokens = st.sampled_from([0, MAX_TOKENS]) | st.integers(0, MAX_TOKENS)


@st.composite
def extreme_events(draw: st.DrawFn, day: datetime, tag: str) -> list[dict[str, Any]]:
    """Events of every type in three hours from `day`, numbers at and between their edges."""
    out: list[dict[str, Any]] = []
    ids = itertools.count()

    def base(kind: str, **fields: Any) -> dict[str, Any]:
        ms = draw(st.integers(0, 3 * 3600 * 1000 - 1))
        return {
            "event_id": f"{tag}-{next(ids)}",
            "event_type": kind,
            "run_id": f"{tag}-r{draw(st.integers(0, 2))}",
            "timestamp": _iso(day + timedelta(milliseconds=ms)),
            **fields,
        }

    for _ in range(draw(st.integers(1, 6))):
        call = base(
            "prompt_call",
            model=draw(st.sampled_from(["m-a", "m-b", None])),
            status=draw(st.sampled_from(["success", "error"])),
            cost_estimate_usd=draw(_cost),
            latency_ms=draw(_latency),
            tokens_input=draw(_tokens),
            tokens_output=draw(_tokens),
            tool_calls=[
                {"tool_name": "t", "latency_ms": draw(_latency)}
                for _ in range(draw(st.integers(0, 2)))
            ],
        )
        out.append({k: v for k, v in call.items() if v is not None})
    extremes = st.sampled_from
    more = [
        base("tool_call", tool_name="t", latency_ms=draw(extremes([0.0, MAX_LATENCY_MS]))),
        base(
            "agent_step",
            step_number=draw(extremes([0, MAX_STEP_NUMBER])),
            latency_ms=draw(extremes([0.0, MAX_LATENCY_MS])),
        ),
        base(
            "hallucination_detected",
            detection_method="nli",
            claim="c",
            confidence=draw(extremes([0.0, 1.0])),
        ),
        base(
            "cost_threshold_exceeded",
            window="1d",
            threshold_usd=draw(extremes([0.0, MAX_SPEND_USD])),
            actual_usd=draw(extremes([0.0, MAX_SPEND_USD])),
        ),
        base(
            "performance_alert",
            metric="p95",
            window="1h",
            threshold=draw(extremes([-MAX_METRIC_ABS, MAX_METRIC_ABS])),
            actual=draw(extremes([-MAX_METRIC_ABS, MAX_METRIC_ABS])),
        ),
        base("error", error_type="E", error_message="m"),
    ]
    out += [e for e in more if draw(st.booleans())]
    return out


# Each example gets four hours of its own from here (shrinking runs many examples: years).
DAY0 = datetime(2015, 1, 1, tzinfo=UTC)


def test_every_route_is_exact_at_the_extremes(server: Running) -> None:
    slots = itertools.count()

    @settings(
        max_examples=8,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        n = next(slots)  # each example in hours of its own: its figures are its events' alone
        day = DAY0 + timedelta(hours=4 * n)
        events = data.draw(extreme_events(day, f"x{n}"))
        post(server, events)
        server.flush()
        window = (day, day + timedelta(hours=3))
        raw = check_routes(server, events, *window)
        assert raw["rollup_hours"] == 0
        assert refresh(server) >= 1
        rolled = check_routes(server, events, *window)
        assert rolled["rollup_hours"] >= 1
        for name in ("total_cost", "tokens_input", "tokens_output", "total_events"):
            assert rolled[name] == raw[name]

    run()


def test_many_max_cost_events_sum_exactly(server: Running) -> None:
    # 20,000 events at the largest cost: 2e19 nano-USD, beyond a UInt64 (1.8e19), which the
    # sums used to be; tokens and latency at their largest too. One hour, one group.
    start = datetime(2025, 6, 1, 10, tzinfo=UTC)
    events = [
        prompt_call(
            f"max-{i}",
            run_id=f"max-run-{i % 2}",
            timestamp=_iso(start + timedelta(milliseconds=i * 100)),
            cost_estimate_usd=MAX_COST_USD,
            latency_ms=MAX_LATENCY_MS,
            tokens_input=MAX_TOKENS,
            tokens_output=MAX_TOKENS,
        )
        for i in range(20_000)
    ]
    for e in events:
        e.pop("prompt"), e.pop("response")
    post(server, events)
    server.flush()
    window = {"from": _iso(start), "to": _iso(start + timedelta(hours=1))}
    for phase in ("raw", "rollup"):
        stats = get(server, "/stats", **window)
        assert stats["total_cost"] == 20_000 * MAX_COST_USD, phase
        assert stats["tokens_input"] == stats["tokens_output"] == 20_000 * MAX_TOKENS, phase
        assert stats["avg_latency_ms"] == MAX_LATENCY_MS, phase
        assert stats["rollup_hours"] == (phase == "rollup"), phase
        (series,) = get(server, "/timeseries", interval="1h", **window)["series"].values()
        assert sum(p["cost"] for p in series) == 20_000 * MAX_COST_USD, phase
        for run_id in ("max-run-0", "max-run-1"):
            run = get(server, f"/runs/{run_id}")["run"]
            assert run["cost"] == 10_000 * MAX_COST_USD, phase
            assert run["tokens_input"] == 10_000 * MAX_TOKENS, phase
        (traces,) = server.query(
            "SELECT sum(cost_usd) AS c, sum(tokens_input) AS t FROM traces"
            " WHERE project_id = 'acme'"
        )
        assert (
            float(traces["c"]) == 20_000 * MAX_COST_USD and int(traces["t"]) == 20_000 * MAX_TOKENS
        )
        if phase == "raw":
            assert refresh(server) == 1


def test_timestamps_at_their_edges_keep_run_ends_sane(server: Running) -> None:
    # The latest timestamp plus the longest latency: the run ends 30 days into 2100, which
    # DateTime64 holds (to 2299); the earliest with the longest, in 1970.
    last = MAX_TIMESTAMP - timedelta(milliseconds=1)
    events = [
        prompt_call(
            "late",
            run_id="late",
            timestamp=_iso(last),
            latency_ms=MAX_LATENCY_MS,
            cost_estimate_usd=0.0,  # given, so that no cost is computed from the tokens
        ),
        prompt_call(
            "early",
            run_id="early",
            timestamp=_iso(MIN_TIMESTAMP),
            latency_ms=MAX_LATENCY_MS,
            cost_estimate_usd=MAX_COST_USD,
        ),
    ]
    post(server, events)
    server.flush()
    for event, t in zip(events, (last, MIN_TIMESTAMP), strict=True):
        run = get(server, f"/runs/{event['run_id']}")["run"]
        assert run["duration_ms"] == MAX_LATENCY_MS
        end = datetime.fromisoformat(run["end"].replace("Z", "+00:00"))
        assert end == t + timedelta(milliseconds=MAX_LATENCY_MS), run
        span = (
            (t, t + timedelta(hours=1))
            if t == MIN_TIMESTAMP
            else (t - timedelta(hours=1), MAX_TIMESTAMP)
        )
        check_routes(server, [event], *span)


# --- rows stored before the ranges ---------------------------------------------------------

POISON_AT = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)


def _insert_poison(
    store: Store,
    project: str,
    run_id: str,
    event_id: str,
    cost: float,
    latency: float,
    at: datetime = POISON_AT,
) -> None:
    """A prompt call as the schema used to accept it (no upper bound), written directly."""
    store.execute(
        "INSERT INTO events (project_id, event_id, event_type, run_id, timestamp, env, metadata,"
        " model, status, cost_estimate_usd, latency_ms, tokens_input, tool_call_count,"
        " ingested_at) VALUES ({p:String}, {e:String}, 'prompt_call', {r:String},"
        " {t:DateTime64(3, 'UTC')}, 'production', '{{}}', 'gpt-4o', 'success', {c:Float64},"
        " {l:Float64}, 10, 0, now64(3))",
        {"p": project, "e": event_id, "r": run_id, "t": at, "c": cost, "l": latency},
    )


def test_rows_stored_before_the_ranges_cannot_break_analytics(server: Running) -> None:
    store = server.wl.store
    # The values of the finding, as they were stored (accepted with 202 then).
    _insert_poison(store, "acme", "old-run", "old-1", 1.7e308, 1.7e308)
    _insert_poison(store, "acme", "old-run", "old-2", 1e12, 1e20)
    _insert_poison(store, "acme", "old-run", "old-3", 0.5, 1e15)
    post(
        server,
        [
            prompt_call(
                "new-1",
                run_id="old-run",
                timestamp=_iso(POISON_AT),
                cost_estimate_usd=1.25,
                latency_ms=10.0,
            )
        ],
    )
    server.flush()
    window = {
        "from": _iso(POISON_AT - timedelta(hours=1)),
        "to": _iso(POISON_AT + timedelta(hours=1)),
    }
    # Each old value counts at its bound: clamped, never an error or a wrapped sum.
    cost = (2 * MAX_COST_USD * 1e9 + 0.5e9 + 1.25e9) / 1e9
    for phase in ("raw", "rollup"):
        stats = get(server, "/stats", **window)
        assert stats["total_cost"] == cost, phase
        assert stats["avg_latency_ms"] == (3 * MAX_LATENCY_MS * 1000 + 10_000) / 1000 / 4
        assert stats["latency_ms"]["p99"] <= MAX_LATENCY_MS * 1.02
        for group_by in (None, "model", "status", "event_type"):
            extra = {"group_by": group_by} if group_by else {}
            series = get(server, "/timeseries", interval="1h", **window, **extra)["series"]
            assert sum(p["cost"] for s in series.values() for p in s) == pytest.approx(cost)
        (run,) = get(server, "/runs", **window)["runs"]
        detail = get(server, "/runs/old-run")["run"]
        for got in (run, detail):
            assert got["duration_ms"] == MAX_LATENCY_MS, got  # not negative, not year 9999
            assert got["end"].startswith("2025-03-31T12:30:00"), got
            assert got["cost"] == pytest.approx(cost)
        assert len(get(server, "/logs", **window)["events"]) == 4
        assert get(server, "/event/old-1")["event"]["event_id"] == "old-1"
        (trace,) = server.query("SELECT cost_usd, toString(end_time) AS end FROM traces")
        assert float(trace["cost_usd"]) == pytest.approx(cost)
        assert trace["end"].startswith("2025-03-31 12:30:00")
        if phase == "raw":
            assert refresh(server) == 1  # the hour that used to fail the whole refresh


def test_migration_0007_marks_hours_with_old_out_of_range_rows(server: Running) -> None:
    store = server.wl.store
    _insert_poison(store, "acme", "r", "old-1", 1.7e308, 1.0)
    refresh(server)  # computed with the clamps: clean now
    assert store.query(Q.DIRTY_HOURS, {"limit": 10}) == []
    (migration,) = [m for m in load_migrations() if m.version == 7]
    for statement in migration.statements():
        if statement.startswith("INSERT"):
            store.execute(statement)
    # The hour is dirty again, so a rollup computed before the clamps would be replaced.
    assert [r["project_id"] for r in store.query(Q.DIRTY_HOURS, {"limit": 10})] == ["acme"]


@CHDB_ONLY  # text of the migration, no store
def test_migration_0007_clamps_to_the_schemas_bounds_and_has_a_cluster_form() -> None:
    (migration,) = [m for m in load_migrations() if m.version == 7]
    assert str(MAX_COST_USD) in migration.sql and str(MAX_LATENCY_MS) in migration.sql
    assert str(MAX_COST_USD) in Q.COST_NANOS and str(MAX_LATENCY_MS) in Q.LATENCY_US
    forms = [for_cluster(s, "c") for s in migration.statements()]
    assert [len(f) for f in forms] == [2, 1, 1]
    alter_local, alter_distributed = forms[0]
    assert alter_local.startswith("ALTER TABLE hourly_usage_by_project_local ON CLUSTER 'c'")
    assert alter_distributed.startswith("ALTER TABLE hourly_usage_by_project ON CLUSTER 'c'")
    assert forms[1][0].startswith("CREATE OR REPLACE VIEW traces ON CLUSTER 'c' AS")


# --- the rollup refresh, one project at a time ---------------------------------------------


class FailsForProject:
    """The real store, except that recomputing one project's hours raises.

    Why a wrapper: after this fix no stored row can make a recomputation fail (the clamps
    above), yet a project can still fail on its own: a query timeout on a very large project,
    a shard that holds it being down, a memory limit. This raises where those would."""

    def __init__(self, store: Store, project: str) -> None:
        self.store = store
        self.project = project
        self.name = store.name

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.store.query(sql, params)

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        if params and params.get("project") == self.project:
            raise StoreError(f"Code: 159. Timeout exceeded for {self.project}")
        self.store.execute(sql, params)


def _three_projects(server: Running) -> None:
    keys = {p: server.keys.create(p, scope="admin") for p in ("bad", "good-1", "good-2")}
    # bad's hours come first, so a refresh that stops at the first failure skips the rest.
    for i, project in enumerate(("bad", "good-1", "good-2")):
        events = [
            prompt_call(
                f"{project}-{h}",
                timestamp=_iso(datetime(2025, 2, 1, 3 * i + h, 5, tzinfo=UTC)),
                cost_estimate_usd=1.0,
            )
            for h in range(3)
        ]
        post(server, events, key=keys[project])
    server.flush()


def _dirty(server: Running) -> set[str]:
    return {r["project_id"] for r in server.query(Q.DIRTY_HOURS, {"limit": 100})}


def test_one_failing_project_does_not_stop_the_others(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    _three_projects(server)
    store = FailsForProject(server.wl.store, "bad")
    with caplog.at_level(logging.ERROR, logger="watchllm.rollup"):
        result = refresh_projects(store, margin=timedelta(0))
    assert result.failed.keys() == {"bad"} and sorted(result.done) == ["good-1", "good-2"]
    assert result.hours == 6
    assert _dirty(server) == {"bad"}
    (record,) = caplog.records
    assert "project bad" in record.getMessage() and "Timeout exceeded" in caplog.text


def test_a_failing_project_waits_so_the_others_get_the_budget(server: Running) -> None:
    _three_projects(server)
    store = FailsForProject(server.wl.store, "bad")
    now = [0.0]
    backoff = ProjectBackoff(initial_s=30, max_s=120, clock=lambda: now[0])
    # A round takes 3 hours at most: bad's three hours, the earliest, fill it.
    result = refresh_projects(store, max_hours=3, margin=timedelta(0), skip=backoff.waiting())
    backoff.record(result)
    assert result.failed.keys() == {"bad"} and result.hours == 0
    assert backoff.waiting() == ["bad"]
    for _ in range(2):
        result = refresh_projects(store, max_hours=3, margin=timedelta(0), skip=backoff.waiting())
        backoff.record(result)
    assert _dirty(server) == {"bad"}
    # Its wait doubles while it keeps failing, up to the maximum; a success forgets it.
    delays = []
    for _ in range(4):
        now[0] += 1000
        assert backoff.waiting() == []
        result = refresh_projects(store, max_hours=3, margin=timedelta(0), skip=backoff.waiting())
        backoff.record(result)
        delays.append(backoff._state["bad"][1])
    assert delays == [60, 120, 120, 120]
    now[0] += 1000
    result = refresh_projects(
        server.wl.store, max_hours=3, margin=timedelta(0), skip=backoff.waiting()
    )
    backoff.record(result)
    assert result.done == ["bad"] and backoff.waiting() == [] and not backoff._state
    assert _dirty(server) == set()


def test_the_rollup_task_keeps_refreshing_the_others(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    # The built-in background task itself, on the failing store: it never stops, refreshes
    # the good projects and logs the bad one by name, each time it is retried.
    _three_projects(server)
    store = FailsForProject(server.wl.store, "bad")
    settings = make_settings(server.settings.data_dir.parent, rollup_interval_s=0.05)
    task = register_background_tasks(settings=settings, store=store)
    assert task is not None

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(task)
            with anyio.fail_after(30):
                while _dirty(server) != {"bad"}:
                    await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # rounds go on: bad is retried after its wait
            tg.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="watchllm.rollup"):
        anyio.run(main)
    assert _dirty(server) == {"bad"}
    failures = [r.getMessage() for r in caplog.records]
    # Retried after 0.05 s, then 0.1, 0.2, ...: not once per round (every 0.05 s).
    times = [r.created for r in caplog.records]
    assert len(times) >= 4, failures  # 0, 0.05, 0.15, 0.35 s at least
    for k, gap in enumerate(b - a for a, b in itertools.pairwise(times)):
        assert gap >= 0.05 * 2**k * 0.9, (k, gap, times)
    assert all("project bad" in m for m in failures), failures


# --- background tasks ----------------------------------------------------------------------


@CHDB_ONLY  # no store involved
def test_a_background_task_that_raises_is_restarted_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(anyio.current_time())
        if len(calls) < 4:
            raise RuntimeError(f"failure {len(calls)}")

    async def main() -> None:
        with anyio.fail_after(10):
            await _run_background(flaky, initial_s=0.2, max_s=0.4)

    with caplog.at_level(logging.ERROR, logger="watchllm.app"):
        anyio.run(main)
    assert len(calls) == 4  # three failures, each restarted; the fourth run returned
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.4  # doubled, then capped
    assert [r.getMessage() for r in caplog.records] == [
        f"background task {flaky.__qualname__} failed; restarting it in {d} s"
        for d in ("0.2", "0.4", "0.4")
    ]
    assert "failure 1" in caplog.text and "failure 3" in caplog.text
