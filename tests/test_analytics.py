"""The analytics API against a generated data set whose answers are computed here, in plain
Python: every figure of stats and timeseries, across bucket edges and time zones, from the
raw table and from the hourly rollup alike; logs pagination; one event; runs; isolation.

Every test that reads the store runs on every store (tests/stores.py): the embedded chDB, the
ClickHouse store against tests/chfixture.py, and a real server when one is configured; each
is held to the same expectations, computed here."""

from __future__ import annotations

import base64
import itertools
import json
import random
import threading
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from conftest import Running, prompt_call
from stores import CHDB_ONLY, EVERY_STORE

from watchllm_ext.analytics.params import PERIODS
from watchllm_ext.analytics.rollup import refresh_rollups

pytestmark = EVERY_STORE

START = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)


def refresh(server: Running) -> int:
    # No insert runs meanwhile in these tests, so the rollups need no safety margin.
    return refresh_rollups(server.wl.store, margin=timedelta(0))


MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"]
STATUSES = ["success"] * 6 + ["error", "timeout", "warning"]


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_events(n: int, seed: int = 1, project: str | None = None) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        t = START + timedelta(
            seconds=rng.randint(0, 3 * 86400 - 1), milliseconds=rng.randint(0, 999)
        )
        kind = rng.random()
        base = {
            "event_id": f"{seed}-{i}",
            "run_id": f"run-{seed}-{i % 40}",
            "timestamp": _iso(t),
            "user_id": f"user-{i % 13}",
            "tags": ["t-even" if i % 2 == 0 else "t-odd"],
        }
        if project:
            base["project_id"] = project
        if kind < 0.75:
            events.append(
                {
                    **base,
                    "event_type": "prompt_call",
                    "model": rng.choice(MODELS),
                    "provider": "openai",
                    "tokens_input": rng.randint(1, 4000),
                    "tokens_output": rng.randint(1, 1500),
                    "cost_estimate_usd": round(rng.random() / 100, 6),
                    "latency_ms": float(rng.randint(20, 8000)),
                    "status": rng.choice(STATUSES),
                    "prompt": f"question {i} about {'cats' if i % 3 else 'dogs'}",
                    "response": f"answer {i}",
                }
            )
        elif kind < 0.9:
            events.append(
                {
                    **base,
                    "event_type": "tool_call",
                    "tool_name": "search",
                    "latency_ms": float(rng.randint(1, 500)),
                    "status": "success",
                }
            )
        else:
            events.append(
                {**base, "event_type": "error", "error_type": "E", "error_message": "boom"}
            )
    return events


def expected_stats(events: list[dict[str, Any]], lo: datetime, hi: datetime) -> dict[str, Any]:
    inside = [e for e in events if lo <= datetime.fromisoformat(e["timestamp"]) < hi]
    calls = [e for e in inside if e["event_type"] == "prompt_call"]
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in calls:
        by_model[e["model"]].append(e)
    return {
        "total_requests": len(calls),
        "total_events": len(inside),
        "events_by_type": dict(Counter(e["event_type"] for e in inside)),
        "total_cost": sum(e.get("cost_estimate_usd", 0) for e in calls),
        "tokens_input": sum(e.get("tokens_input", 0) for e in calls),
        "tokens_output": sum(e.get("tokens_output", 0) for e in calls),
        "avg_latency_ms": sum(e["latency_ms"] for e in calls) / len(calls) if calls else None,
        "latency": sorted(e["latency_ms"] for e in calls),
        "error_rate": sum(e["status"] != "success" for e in calls) / len(calls) if calls else 0,
        "distinct_runs": len({e["run_id"] for e in inside}),
        "distinct_users": len({e["user_id"] for e in inside}),
        "top_models": sorted(
            ((m, len(es), sum(e["tokens_input"] for e in es)) for m, es in by_model.items()),
            key=lambda x: (-x[1], x[0]),
        ),
    }


def check_stats(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in (
        "total_requests",
        "total_events",
        "events_by_type",
        "tokens_input",
        "tokens_output",
        "distinct_runs",
        "distinct_users",
    ):
        assert got[key] == want[key], key
    assert got["total_cost"] == pytest.approx(want["total_cost"], rel=1e-9)
    assert got["avg_latency_ms"] == pytest.approx(want["avg_latency_ms"], rel=1e-9)
    assert got["error_rate"] == pytest.approx(want["error_rate"], rel=1e-12)
    lat = want["latency"]
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99)):
        # DDSketch: within 1% of a value whose rank is q (allow one rank either side).
        rank = q * (len(lat) - 1)
        lo, hi = lat[max(0, int(rank) - 1)], lat[min(len(lat) - 1, int(rank) + 2)]
        assert lo * 0.99 <= got["latency_ms"][name] <= hi * 1.01, (name, got["latency_ms"])
    assert [(m["model"], m["calls"], m["tokens_input"]) for m in got["top_models"]] == want[
        "top_models"
    ]


@pytest.fixture
def loaded(server: Running) -> tuple[Running, list[dict[str, Any]]]:
    other = server.keys.create("other", scope="admin")  # before the server's first key lookup
    events = make_events(3000)
    for i in range(0, len(events), 1000):
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(), json={"events": events[i : i + 1000]}
        )
        assert r.status_code == 202, r.text
    r = server.client.post(
        "/v1/events/batch", headers=server.headers(other), json={"events": make_events(500, seed=2)}
    )
    assert r.status_code == 202
    server.flush()
    return server, events


def get(server: Running, path: str, key: str | None = None, **params: Any) -> Any:
    r = server.client.get(
        path, params={"project_id": "acme", **params}, headers=server.headers(key)
    )
    assert r.status_code == 200, r.text
    return r.json()


RANGES = [
    (START, START + timedelta(days=3)),
    (
        START + timedelta(hours=5, minutes=17, seconds=3),
        START + timedelta(days=1, hours=7, minutes=41),
    ),
    (START + timedelta(minutes=10), START + timedelta(minutes=50)),
]


def test_stats_raw_and_rollup_match_python(loaded: Any) -> None:
    server, events = loaded
    before = []
    for lo, hi in RANGES:
        got = get(server, "/v1/analytics/stats", **{"from": _iso(lo), "to": _iso(hi)})
        assert got["rollup_hours"] == 0
        check_stats(got, expected_stats(events, lo, hi))
        before.append(got)
    assert refresh(server) > 0
    for (lo, hi), raw in zip(RANGES, before, strict=True):
        got = get(server, "/v1/analytics/stats", **{"from": _iso(lo), "to": _iso(hi)})
        whole_hours = int((hi - lo).total_seconds() // 3600) - 1
        assert got["rollup_hours"] >= max(0, whole_hours)
        assert {**got, "rollup_hours": 0} == {**raw, "rollup_hours": 0}  # rollup == raw


def test_late_and_duplicate_events_keep_rollups_exact(loaded: Any) -> None:
    server, events = loaded
    refresh(server)
    lo, hi = RANGES[0]
    late = make_events(50, seed=9)
    r = server.client.post(
        "/v1/events/batch", headers=server.headers(), json={"events": late + events[:300]}
    )  # new and already stored
    assert r.status_code == 202
    server.flush()
    want = expected_stats(events + late, lo, hi)
    got = get(server, "/v1/analytics/stats", **{"from": _iso(lo), "to": _iso(hi)})
    check_stats(got, want)  # dirty hours are read raw until recomputed
    refresh(server)
    again = get(server, "/v1/analytics/stats", **{"from": _iso(lo), "to": _iso(hi)})
    check_stats(again, want)
    assert again["rollup_hours"] == 72


def expected_series(
    events: list[dict[str, Any]], lo: datetime, hi: datetime, step: timedelta, tz: str
) -> dict[int, dict[str, Any]]:
    zone = ZoneInfo(tz)
    out: dict[int, dict[str, Any]] = defaultdict(lambda: Counter())
    for e in events:
        t = datetime.fromisoformat(e["timestamp"])
        if not lo <= t < hi:
            continue
        local = t.astimezone(zone)
        if step >= timedelta(days=1):
            floored = local.replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            minutes = int(step.total_seconds() // 60)
            total = local.hour * 60 + local.minute
            total -= total % minutes
            floored = local.replace(hour=total // 60, minute=total % 60, second=0, microsecond=0)
        key = int(floored.timestamp())
        bucket = out[key]
        bucket["events"] += 1
        if e["event_type"] == "prompt_call":
            bucket["requests"] += 1
            bucket["errors"] += e["status"] != "success"
            bucket["tokens_input"] += e["tokens_input"]
            bucket["cost"] += e["cost_estimate_usd"]
    return out


@pytest.mark.parametrize(
    ("interval", "step", "tz"),
    [
        ("1h", timedelta(hours=1), "UTC"),
        ("15m", timedelta(minutes=15), "UTC"),
        ("1h", timedelta(hours=1), "Asia/Kolkata"),
        ("1d", timedelta(days=1), "America/New_York"),
    ],
)
def test_timeseries_matches_python(loaded: Any, interval: str, step: timedelta, tz: str) -> None:
    server, events = loaded
    refresh(server)
    lo, hi = RANGES[1]
    got = get(
        server,
        "/v1/analytics/timeseries",
        interval=interval,
        tz=tz,
        **{"from": _iso(lo), "to": _iso(hi)},
    )
    points = got["series"]["all"]
    want = expected_series(events, lo, hi, step, tz)
    by_t = {int(datetime.fromisoformat(p["t"]).timestamp()): p for p in points}
    assert set(want) <= set(by_t)  # every bucket with data is there...
    for t, point in by_t.items():  # ...and the empty ones are zeros
        w = want.get(t, Counter())
        assert point["events"] == w["events"]
        assert point["requests"] == w["requests"]
        assert point["errors"] == w["errors"]
        assert point["tokens_input"] == w["tokens_input"]
        assert point["cost"] == pytest.approx(w["cost"], rel=1e-9, abs=1e-12)
    times = sorted(by_t)
    assert len(times) == len(points)  # no duplicate buckets
    if step < timedelta(days=1):
        assert all(b - a == step.total_seconds() for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("rolled_up", [False, True])
def test_timeseries_keeps_every_event_where_clocks_change(server: Running, rolled_up: bool) -> None:
    """A clock set back repeats an hour: its minute and hour buckets are their own, as
    ClickHouse makes them (stepping the wall clock skipped them: 36 of 180 events of New
    York's 2026-11-01 were in no series). And 1970's first day west of Greenwich starts before
    the epoch, which ClickHouse's DateTime cannot hold: its events are in its first bucket."""
    days = {
        "2026-11-01": datetime(2026, 11, 1, 3, tzinfo=UTC),  # New York: 02:00 EDT -> 01:00 EST
        "2026-03-08": datetime(2026, 3, 8, 5, tzinfo=UTC),  # New York: 02:00 EST -> 03:00 EDT
        "1970-01-01": datetime(1970, 1, 1, tzinfo=UTC),
    }
    events = [
        {
            "event_id": f"clock-{day}-{i}",
            "event_type": "error",
            "run_id": "clocks",
            "error_type": "E",
            "error_message": "m",
            "timestamp": _iso(t0 + timedelta(minutes=5 * i)),
        }
        for day, t0 in days.items()
        for i in range(60)
    ]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202, r.text
    server.flush()
    if rolled_up:
        refresh(server)
    for day in days:
        window = {"from": f"{day}T00:00:00Z", "to": f"{day}T23:00:00Z"}
        times = [
            datetime.fromisoformat(e["timestamp"])
            for e in events
            if e["event_id"].startswith(f"clock-{day}")
        ]
        for tz in ("America/New_York", "America/Los_Angeles", "Asia/Kolkata", "UTC"):
            for interval in ("5m", "15m", "1h", "6h", "1d"):
                got = get(server, "/v1/analytics/timeseries", interval=interval, tz=tz, **window)
                points = got["series"]["all"]
                starts = [datetime.fromisoformat(p["t"]) for p in points]
                assert starts == sorted(set(starts)), (day, tz, interval)
                where = (day, tz, interval, got.get("rollup_hours"))
                assert sum(p["events"] for p in points) == 60, where
                for point, start, end in zip(points, starts, [*starts[1:], None], strict=True):
                    inside = [t for t in times if t >= start and (end is None or t < end)]
                    if start == starts[0]:  # the first bucket may start before the range
                        inside = [t for t in times if end is None or t < end]
                    assert point["events"] == len(inside), (*where, start)


def test_timeseries_group_by_and_rollup_equals_raw(loaded: Any) -> None:
    server, events = loaded
    params = {"from": _iso(RANGES[0][0]), "to": _iso(RANGES[0][1]), "interval": "6h"}
    raw = get(server, "/v1/analytics/timeseries", group_by="model", **params)
    refresh(server)
    rolled = get(server, "/v1/analytics/timeseries", group_by="model", **params)
    assert rolled["rollup_hours"] > 0 and raw["rollup_hours"] == 0
    assert rolled["series"] == raw["series"]
    assert set(raw["series"]) == set(MODELS) | {"(none)"}
    calls = Counter(e["model"] for e in events if e["event_type"] == "prompt_call")
    for model in MODELS:
        assert sum(p["requests"] for p in raw["series"][model]) == calls[model]


def test_period_defaults_and_empty_buckets(server: Running) -> None:
    got = get(server, "/v1/analytics/timeseries", period="1h")
    assert got["interval"] == "1m" and len(got["series"]["all"]) in (60, 61)
    assert all(p["requests"] == 0 and p["latency_p50_ms"] == 0 for p in got["series"]["all"])
    stats = get(server, "/v1/analytics/stats")
    assert stats["total_events"] == 0 and stats["latency_ms"]["p50"] is None


def test_logs_filters_and_pagination_under_concurrent_inserts(loaded: Any) -> None:
    server, events = loaded
    window = {"from": _iso(START), "to": _iso(START + timedelta(days=3))}
    stop = threading.Event()

    def insert_more() -> None:  # new events keep arriving, newer than the window's end
        n = 0
        while not stop.is_set() and n < 40:
            fresh = [
                {
                    **make_events(1, seed=100 + n)[0],
                    "event_id": f"new-{n}",
                    "timestamp": _iso(datetime.now(UTC)),
                }
            ]
            server.client.post("/v1/events/batch", headers=server.headers(), json={"events": fresh})
            n += 1

    inserter = threading.Thread(target=insert_more)
    inserter.start()
    seen: list[str] = []
    cursor = None
    try:
        while True:
            page = get(
                server,
                "/v1/analytics/logs",
                limit=137,
                **window,
                **({"cursor": cursor} if cursor else {}),
            )
            seen += [e["event_id"] for e in page["events"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        stop.set()
        inserter.join()
    assert len(seen) == len(set(seen)) == len(events)
    assert set(seen) == {e["event_id"] for e in events}
    ts = [
        datetime.fromisoformat(e["timestamp"])
        for e in sorted(events, key=lambda e: (e["timestamp"], e["event_id"]), reverse=True)
    ]
    assert len(ts) == len(seen)

    errors = get(
        server, "/v1/analytics/logs", status="error", model="gpt-4o", **window, limit=1000
    )["events"]
    assert {e["event_id"] for e in errors} == {
        e["event_id"] for e in events if e.get("status") == "error" and e.get("model") == "gpt-4o"
    }
    dogs = get(server, "/v1/analytics/logs", q="DOGS", tag="t-even", **window, limit=1000)
    assert {e["event_id"] for e in dogs["events"]} == {
        e["event_id"] for e in events if "dogs" in e.get("prompt", "") and "t-even" in e["tags"]
    }
    run = get(
        server, "/v1/analytics/logs", run_id="run-1-3", event_type="tool_call", **window, limit=1000
    )
    assert {e["event_id"] for e in run["events"]} == {
        e["event_id"] for e in events if e["run_id"] == "run-1-3" and e["event_type"] == "tool_call"
    }


def test_event_detail_and_run_tree(server: Running) -> None:
    t = datetime(2026, 2, 1, tzinfo=UTC)
    events = [
        {
            "event_id": "root",
            "event_type": "agent_step",
            "run_id": "R",
            "timestamp": _iso(t),
            "step_number": 1,
            "step_name": "plan",
        },
        {
            "event_id": "call",
            "event_type": "prompt_call",
            "run_id": "R",
            "parent_event_id": "root",
            "timestamp": _iso(t + timedelta(seconds=1)),
            "model": "gpt-4o",
            "tokens_input": 10,
            "latency_ms": 1500.0,
            "tool_calls": [{"tool_name": "search", "tool_input": {"q": "x"}}],
            "metadata": {"k": 1},
        },
        {
            "event_id": "tool",
            "event_type": "tool_call",
            "run_id": "R",
            "parent_event_id": "call",
            "timestamp": _iso(t + timedelta(seconds=2)),
            "tool_name": "search",
            "status": "error",
        },
    ]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202
    server.flush()
    detail = get(server, "/v1/analytics/event/call")
    assert detail["event"]["model"] == "gpt-4o" and detail["event"]["metadata"] == {"k": 1}
    assert detail["parent_event_id"] == "root" and detail["children"] == ["tool"]
    assert detail["tool_calls"][0]["tool_input"] == {"q": "x"}
    assert get(server, "/v1/analytics/event/root")["agent_steps"][0]["step_name"] == "plan"
    missing = server.client.get(
        "/v1/analytics/event/nope", params={"project_id": "acme"}, headers=server.headers()
    )
    assert missing.status_code == 404 and missing.json()["field"] == "event_id"

    runs = get(
        server,
        "/v1/analytics/runs",
        **{"from": _iso(t - timedelta(hours=1)), "to": _iso(t + timedelta(hours=1))},
    )
    (run,) = runs["runs"]
    assert run["run_id"] == "R" and run["event_count"] == 3 and run["error_count"] == 1
    assert run["duration_ms"] == 2500 and run["tokens_input"] == 10
    tree = get(server, "/v1/analytics/runs/R")["tree"]
    assert [n["id"] for n in tree] == ["root"]
    assert [n["id"] for n in tree[0]["children"]] == ["call"]
    assert [n["id"] for n in tree[0]["children"][0]["children"]] == ["tool"]


def test_runs_lists_only_runs_that_started_in_the_range(server: Running) -> None:
    """A run with events before the range is not listed; one that started in it is, with its
    figures over the whole run, events after the range included."""
    t = datetime(2026, 3, 1, tzinfo=UTC)

    def call(event_id: str, run_id: str, at: datetime, tokens: int) -> dict[str, Any]:
        return prompt_call(event_id, run_id=run_id, timestamp=_iso(at), tokens_input=tokens)

    events = [
        call("early-1", "early", t - timedelta(days=2), 100),
        call("early-2", "early", t + timedelta(hours=1), 5),
        call("inside-1", "inside", t + timedelta(hours=2), 7),
        call("inside-2", "inside", t + timedelta(days=3), 11),
    ]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202, r.text
    server.flush()
    window = {"from": _iso(t), "to": _iso(t + timedelta(days=1))}
    (run,) = get(server, "/v1/analytics/runs", **window)["runs"]
    assert run["run_id"] == "inside" and run["event_count"] == 2 and run["tokens_input"] == 18
    whole = get(server, "/v1/analytics/runs/early")["run"]
    assert whole["event_count"] == 2 and whole["tokens_input"] == 105
    before = {"from": _iso(t - timedelta(days=3)), "to": _iso(t)}
    (run,) = get(server, "/v1/analytics/runs", **before)["runs"]
    assert run["run_id"] == "early" and run["event_count"] == 2 and run["tokens_input"] == 105


def test_runs_pagination(loaded: Any) -> None:
    server, events = loaded
    window = {"from": _iso(START), "to": _iso(START + timedelta(days=3))}
    seen, cursor = [], None
    while True:
        page = get(
            server,
            "/v1/analytics/runs",
            limit=7,
            **window,
            **({"cursor": cursor} if cursor else {}),
        )
        seen += [r["run_id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted({e["run_id"] for e in events})
    by_run = Counter(e["run_id"] for e in events)
    first = get(server, "/v1/analytics/runs", limit=1000, **window)["runs"]
    assert {r["run_id"]: r["event_count"] for r in first} == dict(by_run)


# The routes that take a time range (period, or from/to); the other two look up an id.
RANGE_ROUTES = [
    "/v1/analytics/stats",
    "/v1/analytics/timeseries",
    "/v1/analytics/logs",
    "/v1/analytics/runs",
]
ROUTES = [
    "/v1/analytics/stats",
    "/v1/analytics/timeseries",
    "/v1/analytics/logs",
    "/v1/analytics/event/x",
    "/v1/analytics/runs",
    "/v1/analytics/runs/x",
]


# Keys and scopes are checked before any query: no store is asked, so one store will do.
@CHDB_ONLY
@pytest.mark.parametrize("path", ROUTES)
def test_isolation(server: Running, path: str) -> None:
    other = server.keys.create("other", scope="read")
    ingest = server.keys.create("acme", scope="ingest")
    import time

    time.sleep(1.1)  # the key cache rereads the key file
    r = server.client.get(path, params={"project_id": "acme"}, headers=server.headers(other))
    assert r.status_code == 403 and r.json()["field"] == "project_id"
    r = server.client.get(path, params={"project_id": "acme"}, headers=server.headers(ingest))
    assert r.status_code == 403 and "read" in r.json()["message"]
    r = server.client.get(path, params={"project_id": "acme"})
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers


def _forged(data: Any) -> str:
    raw = json.dumps(data, ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Parameters are refused before any query: no store is asked, so one store will do.
@CHDB_ONLY
@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/analytics/timeseries", {"period": "2h"}, "period"),
        (
            "/v1/analytics/stats",
            {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
            "from",
        ),
        ("/v1/analytics/stats", {"from": "yesterday"}, "from"),
        ("/v1/analytics/stats", {"to": "2026-01-01T00:00:00"}, "to"),
        ("/v1/analytics/logs", {"limit": "0"}, "limit"),
        ("/v1/analytics/logs", {"limit": "1001"}, "limit"),
        ("/v1/analytics/logs", {"limit": "ten"}, "limit"),
        ("/v1/analytics/logs", {"cursor": "not-a-cursor"}, "cursor"),
        ("/v1/analytics/logs", {"status": "great"}, "status"),
        ("/v1/analytics/runs", {"cursor": "eyJ4IjoxfQ"}, "cursor"),
        # Forged: what no page ends on (other digits, keys it never writes).
        *[
            ("/v1/analytics/logs", {"cursor": _forged(data)}, "cursor")
            for data in (
                {"ts": "\uff12\uff10\uff12\uff16-12-04 00:00:00.000", "id": "e1"},
                {"ts": "2026-12-04 00:00:00.000", "id": "e1", "x": 1},
                {"ts": "2026-12-04T00:00:00.000", "id": "e1"},
                ["2026-12-04 00:00:00.000", "e1"],
            )
        ],
        ("/v1/analytics/timeseries", {"tz": "Mars/Olympus"}, "tz"),
        ("/v1/analytics/timeseries", {"interval": "7m"}, "interval"),
        ("/v1/analytics/timeseries", {"interval": "1m", "period": "30d"}, "interval"),
        ("/v1/analytics/timeseries", {"group_by": "user"}, "group_by"),
        ("/v1/analytics/stats", {"project_id": ""}, "project_id"),
        ("/v1/analytics/runs", {"project_id": "a b"}, "project_id"),
        # One time-range vocabulary: each route with a range refuses the same way.
        *[(path, {"period": "2h"}, "period") for path in RANGE_ROUTES],
        *[
            (path, {"period": "24h", "from": "2026-01-01T00:00:00Z"}, "period")
            for path in RANGE_ROUTES
        ],
        ("/v1/analytics/logs", {"period": "30d", "to": "not-a-time"}, "to"),
        # ISO 8601's other forms, which RFC 3339 (and an event's timestamp) does not take.
        *[
            ("/v1/analytics/stats", {"to": form}, "to")
            for form in (
                "20260101T000000Z",
                "2026-01-01T00:00:00+0200",
                "2026-01-01T00:00:00+02",
                "2026-01-01T00Z",
                "2026-W01-1T00:00:00Z",
                "2026-01-01T00:00:00,5Z",
                "2026-01-01T00:00:00+00:00:00.5",
                "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",  # full-width digits
            )
        ],
    ],
)
def test_bad_parameters_name_the_parameter(
    server: Running, path: str, params: dict[str, str], field: str
) -> None:
    r = server.client.get(path, params={"project_id": "acme", **params}, headers=server.headers())
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and field in r.json()["message"]


@CHDB_ONLY
def test_from_and_to_take_rfc_3339s_forms(server: Running) -> None:
    """Lower-case t and z, a fraction of up to 9 digits, an offset whose "+" arrived as a
    space; as event timestamps, 10 fraction digits are refused, naming the parameter."""
    for form in (
        "2026-01-01t00:00:00z",
        "2026-01-01T02:00:00.123456789+02:00",
        "2026-01-01T02:00:00 02:00",
        "2026-01-01 00:00:00Z",
    ):
        params = {"from": "2025-12-31T00:00:00Z", "to": form}
        r = server.client.get("/v1/analytics/stats", params=params, headers=server.headers())
        assert r.status_code == 200, (form, r.text)
    for too_fine in ("2025-12-31T00:00:00.1234567890Z", "2025-12-31T00:00:00.1234567890"):
        params = {"from": too_fine}  # (without a zone too: the zone is not all that is wrong)
        r = server.client.get("/v1/analytics/stats", params=params, headers=server.headers())
        assert (r.status_code, r.json()["field"]) == (400, "from"), r.text
        assert "not an RFC 3339 time" in r.json()["message"], r.text


def test_calls_without_latency_give_zero_percentiles_not_errors(server: Running) -> None:
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    event = {
        "event_id": "no-latency",
        "event_type": "prompt_call",
        "run_id": "r",
        "timestamp": _iso(t),
        "model": "gpt-4o",
    }
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": [event]})
    assert r.status_code == 202
    server.flush()
    window = {"from": _iso(t - timedelta(hours=1)), "to": _iso(t + timedelta(hours=1))}
    series = get(server, "/v1/analytics/timeseries", interval="1h", **window)["series"]["all"]
    assert sum(p["requests"] for p in series) == 1
    assert all(p["latency_p50_ms"] == 0 and p["latency_p95_ms"] == 0 for p in series)
    stats = get(server, "/v1/analytics/stats", **window)
    assert stats["total_requests"] == 1 and stats["latency_ms"]["p50"] is None


# --- bounded answers (issue 9, finding 2) ---


def _many_models(n_models: int, minutes: int, t0: datetime) -> list[dict[str, Any]]:
    """Prompt calls over `n_models` models: model i gets i % 7 + 1 calls, spread over the
    minutes, so the ranking by requests has ties (broken by name) and a long tail."""
    events = []
    for i in range(n_models):
        for _ in range(i % 7 + 1):
            k = len(events)
            events.append(
                prompt_call(
                    f"m-{k}",
                    model=f"model-{i:04d}",
                    run_id=f"run-{k % 50}",
                    timestamp=_iso(t0 + timedelta(minutes=k % minutes, seconds=k % 60)),
                    cost_estimate_usd=0.001 * (i % 5),
                    status="error" if k % 9 == 0 else "success",
                )
            )
    return events


def test_timeseries_caps_groups_with_other_while_healthz_answers(server: Running) -> None:
    """2,000 distinct models in 1-minute buckets: the answer holds the top groups by the
    measure asked for plus one "other" series (total minus top, per bucket), at most
    max_points points, and /healthz keeps answering while such requests run."""
    import time

    t0 = datetime(2026, 4, 1, tzinfo=UTC)
    minutes = 600
    events = _many_models(2000, minutes, t0)
    for i in range(0, len(events), 2000):
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(), json={"events": events[i : i + 2000]}
        )
        assert r.status_code == 202, r.text
    server.flush()
    window = {"from": _iso(t0), "to": _iso(t0 + timedelta(minutes=minutes))}

    got = get(server, "/v1/analytics/timeseries", group_by="model", interval="1m", **window)
    calls = Counter(e["model"] for e in events)
    ranked = sorted(calls, key=lambda m: (-calls[m], m))
    assert got["groups"] == 10 and got["groups_total"] == 2000 and got["groups_capped"]
    assert got["rank_by"] == "events" and list(got["series"]) == ranked[:10]
    assert all(len(points) == minutes for points in got["series"].values())
    assert len(got["other"]) == minutes
    # other = total - top, bucket by bucket and in all
    total = get(server, "/v1/analytics/timeseries", interval="1m", **window)["series"]["all"]
    for b, point in enumerate(total):
        top = sum(s[b]["requests"] for s in got["series"].values())
        assert got["other"][b]["requests"] == point["requests"] - top
        top_cost = sum(s[b]["cost"] for s in got["series"].values())
        assert abs(got["other"][b]["cost"] - (point["cost"] - top_cost)) < 1e-9
    assert sum(p["requests"] for p in got["other"]) == len(events) - sum(
        calls[m] for m in ranked[:10]
    )

    # Ranked by cost, and more groups asked than the point budget allows at 1,999 buckets.
    by_cost = get(
        server,
        "/v1/analytics/timeseries",
        group_by="model",
        rank_by="cost",
        groups=50,
        **{"from": _iso(t0), "to": _iso(t0 + timedelta(minutes=1999)), "interval": "1m"},
    )
    assert by_cost["groups"] == by_cost["max_points"] // 1999 - 1 == 9
    cost = Counter()
    for e in events:
        cost[e["model"]] += round(e["cost_estimate_usd"] * 1e9)
    assert list(by_cost["series"]) == sorted(cost, key=lambda m: (-cost[m], m))[:9]
    points = sum(len(s) for s in by_cost["series"].values()) + len(by_cost["other"])
    assert points <= by_cost["max_points"]

    # Stats: top models bounded too, totals over every model.
    stats = get(server, "/v1/analytics/stats", **window)
    assert stats["total_requests"] == len(events)
    assert [m["model"] for m in stats["top_models"]] == ranked[:10]
    assert [m["calls"] for m in stats["top_models"]] == [calls[m] for m in ranked[:10]]

    # /healthz while the heaviest of these run, back to back, from two other threads.
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            while not stop.is_set():
                r = c.get(
                    "/v1/analytics/timeseries",
                    params={"project_id": "acme", "group_by": "model", "interval": "1m", **window},
                    headers=server.headers(),
                )
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    worst = 0.0
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                began = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                worst = max(worst, time.perf_counter() - began)
                time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures
    # Generous: a shaping pass on the event loop took seconds here; bench/ measures it.
    assert worst < 1.0, worst


def test_run_tree_of_a_deep_chain_and_a_loop(server: Running) -> None:
    """A run whose 300 events each name the one before as parent: the tree nests 100 deep
    and hangs the rest under the 100th (parent_id intact), so it can be serialised; two
    events naming each other as parents are both in the tree."""
    t = datetime(2026, 5, 1, tzinfo=UTC)
    chain = [
        {
            "event_id": f"c{i}",
            "event_type": "agent_step",
            "run_id": "deep",
            "timestamp": _iso(t + timedelta(milliseconds=i)),
            "step_number": i,
            **({"parent_event_id": f"c{i - 1}"} if i else {}),
        }
        for i in range(300)
    ]
    loop = [
        {
            "event_id": name,
            "event_type": "agent_step",
            "run_id": "deep",
            "timestamp": _iso(t + timedelta(seconds=5 + k)),
            "step_number": 1,
            "parent_event_id": other,
        }
        for k, (name, other) in enumerate([("la", "lb"), ("lb", "la")])
    ]
    r = server.client.post(
        "/v1/events/batch", headers=server.headers(), json={"events": chain + loop}
    )
    assert r.status_code == 202, r.text
    server.flush()
    got = get(server, "/v1/analytics/runs/deep")
    assert got["run"]["event_count"] == 302 and got["truncated"] is False
    seen: dict[str, int] = {}
    stack = [(n, 0) for n in got["tree"]]
    while stack:
        node, depth = stack.pop()
        seen[node["id"]] = depth
        stack += [(c, depth + 1) for c in node["children"]]
    assert set(seen) == {e["event_id"] for e in chain + loop}
    assert max(seen.values()) == 100
    assert seen["c99"] == 99 and seen["c100"] == 100 and seen["c299"] == 100
    assert seen["la"] + seen["lb"] == 1  # one of the two is the root of the other


# --- exact round trip of free-form fields (issue 9, finding 8) ---

JSON_LOOKING = [
    '{"a": 1}',
    "[{",
    '[{"role": "user", "content": "hi"}]',
    '"quoted"',
    "123",
    "null",
    "NaN",
    " [1] ",
    "plain text",
    "[" * 5000,
]


def test_free_form_fields_round_trip_exactly(server: Running) -> None:
    t = datetime(2026, 6, 1, tzinfo=UTC)
    sent: list[dict[str, Any]] = []
    for i, text in enumerate(JSON_LOOKING):
        sent.append(
            prompt_call(
                f"rt-p{i}",
                timestamp=_iso(t + timedelta(seconds=i)),
                prompt=text,
                metadata={"text": text, "n": [1, {"x": None}]},
                response_metadata={"raw": text},
                tool_calls=[
                    {"tool_name": "a", "tool_input": text, "tool_output": {"o": text}},
                    {"tool_name": "b", "tool_input": [text], "tool_output": text},
                ],
            )
        )
        sent.append(
            {
                "event_id": f"rt-t{i}",
                "event_type": "tool_call",
                "run_id": "rt",
                "timestamp": _iso(t + timedelta(seconds=i)),
                "tool_name": "search",
                "tool_input": text,
                "tool_output": {"text": text} if i % 2 else 12.5,
            }
        )
        sent.append(
            {
                "event_id": f"rt-a{i}",
                "event_type": "assertion_failed",
                "run_id": "rt",
                "timestamp": _iso(t + timedelta(seconds=i)),
                "assertion_name": "same",
                "expected": text,
                "actual": {"a": 1} if i % 2 else [text, 1, None, True],
            }
        )
    messages = [{"role": "user", "content": '{"a": 1}'}, {"role": "assistant", "content": "[{"}]
    sent.append(prompt_call("rt-messages", timestamp=_iso(t), prompt=messages))
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": sent})
    assert r.status_code == 202, r.text
    server.flush()
    for event in sent:
        got = get(server, f"/v1/analytics/event/{event['event_id']}")
        stored = got["event"]
        assert "value_format" not in stored
        for name in ("prompt", "metadata", "response_metadata", "tool_input", "tool_output"):
            if name in event:
                assert stored[name] == event[name], (event["event_id"], name)
        for name in ("expected", "actual"):
            if name in event:
                assert stored[name] == event[name], (event["event_id"], name)
        calls = event.get("tool_calls") or (
            [{"tool_input": event["tool_input"], "tool_output": event["tool_output"]}]
            if event["event_type"] == "tool_call"
            else []
        )
        assert [(c["tool_input"], c["tool_output"]) for c in got["tool_calls"]] == [
            (c["tool_input"], c["tool_output"]) for c in calls
        ]
    # In the table, text that is not JSON stays readable as it is; JSON-looking text is a
    # JSON string.
    stored = {
        r["event_id"]: r["tool_input"]
        for r in server.query(
            "SELECT event_id, tool_input FROM events WHERE event_id IN ('rt-t1', 'rt-t8')"
        )
    }
    assert stored == {"rt-t1": "[{", "rt-t8": "plain text"}
    assert server.query("SELECT tool_input FROM events WHERE event_id = 'rt-t0'") == [
        {"tool_input": '"{\\"a\\": 1}"'}
    ]
    # A text prompt stays searchable and previewed as the text it is.
    logs = get(
        server,
        "/v1/analytics/logs",
        q='{"a": 1}',
        **{"from": _iso(t), "to": _iso(t + timedelta(minutes=1))},
    )
    assert '{"a": 1}' in {e["prompt_preview"] for e in logs["events"]}


def test_rows_stored_before_value_format_read_as_before(server: Running) -> None:
    """Rows written before migration 0008 (value_format 0) kept strings as they were: they
    read as they always did, JSON-looking text parsed, other text as it is."""
    assert server.wl.store is not None
    server.wl.store.execute(
        "INSERT INTO events (project_id, event_id, event_type, run_id, timestamp, env, metadata,"
        " prompt, tool_input, tool_output, expected, tool_call_count, ingested_at)"
        " VALUES ('acme', 'legacy', 'tool_call', 'r', '2026-06-02 00:00:00.000', 'production',"
        " '{\"k\":1}', '[{\"role\":\"user\"}]', '{\"a\": 1}', 'plain text', '[1, 2',"
        " 0, now64(3))"
    )
    got = get(server, "/v1/analytics/event/legacy")["event"]
    assert got["metadata"] == {"k": 1} and got["prompt"] == [{"role": "user"}]
    assert got["tool_input"] == {"a": 1} and got["tool_output"] == "plain text"
    assert got["expected"] == "[1, 2"


# --- one time-range vocabulary, project_id optional (issue 14) ---

# One event per age, back from T: each period holds exactly the events younger than it.
T = datetime(2026, 6, 1, 12, tzinfo=UTC)
AGES = [
    timedelta(minutes=10),
    timedelta(minutes=50),
    timedelta(hours=5),
    timedelta(hours=11),
    timedelta(hours=23),
    timedelta(days=6),
    timedelta(days=29),
    timedelta(days=89),
    timedelta(days=100),
]


def _events_in(server: Running, path: str, key: str | None = None, **params: Any) -> set[str]:
    """The ids (events, or runs for /runs) a range route's answer counts."""
    got = get(server, path, key, **params)
    if path.endswith("/stats"):
        return {f"event {i}" for i in range(got["total_events"])}
    if path.endswith("/timeseries"):
        return {f"event {i}" for i in range(sum(p["events"] for p in got["series"]["all"]))}
    if path.endswith("/logs"):
        return {e["event_id"] for e in got["events"]}
    return {r["run_id"] for r in got["runs"]}


def test_one_time_range_vocabulary_on_every_route(server: Running) -> None:
    now = datetime.now(UTC)
    events = [
        prompt_call(f"age-{i}", run_id=f"age-{i}", timestamp=_iso(T - age))
        for i, age in enumerate(AGES)
    ] + [
        prompt_call("now-1h", run_id="now-1h", timestamp=_iso(now - timedelta(hours=1))),
        prompt_call("now-25h", run_id="now-25h", timestamp=_iso(now - timedelta(hours=25))),
    ]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202, r.text
    server.flush()
    for path in RANGE_ROUTES:
        exact = not path.endswith(("/stats", "/timeseries"))  # those two answer counts only
        for name, length in PERIODS.items():
            want = {f"age-{i}" for i, age in enumerate(AGES) if age < length}
            # `period` counts back from `to`; `from`/`to` naming the same range agree.
            by_period = _events_in(server, path, period=name, to=_iso(T))
            by_bounds = _events_in(server, path, **{"from": _iso(T - length), "to": _iso(T)})
            assert by_period == by_bounds, (path, name)
            assert (by_period if exact else len(by_period)) == (want if exact else len(want))
        # Neither period nor from: the last 24 hours; period alone counts back from now.
        assert len(_events_in(server, path)) == 1, path
        assert len(_events_in(server, path, period="30d")) == 2, path
        assert len(_events_in(server, path, to=_iso(T))) == 5, path  # 24 hours back from to
    stats = get(server, "/v1/analytics/stats", period="7d", to=_iso(T))
    assert datetime.fromisoformat(stats["from"]) == T - timedelta(days=7)
    assert datetime.fromisoformat(stats["to"]) == T
    # An unknown period lists the choices; period with from is two starts.
    for path in RANGE_ROUTES:
        r = server.client.get(path, params={"period": "1w"}, headers=server.headers())
        assert (r.status_code, r.json()["field"]) == (400, "period"), path
        assert all(name in r.json()["message"] for name in PERIODS)
        r = server.client.get(
            path, params={"period": "1h", "from": _iso(T)}, headers=server.headers()
        )
        assert (r.status_code, r.json()["field"]) == (400, "period"), path


def _shows(path: str, got: dict[str, Any], project: str) -> bool:
    """Does the answer of `path` hold exactly `project`'s one event (a1/ra or b1/rb)?"""
    event_id, run_id = PROJECT_DATA[project]
    if path.endswith("/stats"):
        return got["project_id"] == project and got["total_events"] == 1
    if path.endswith("/timeseries"):
        return got["project_id"] == project and sum(p["events"] for p in got["series"]["all"]) == 1
    if path.endswith("/logs"):
        return [e["event_id"] for e in got["events"]] == [event_id]
    if path.endswith("/runs"):
        return [r["run_id"] for r in got["runs"]] == [run_id]
    if "/event/" in path:
        return got["event"]["event_id"] == event_id and got["event"]["project_id"] == project
    return got["project_id"] == project and got["run"]["run_id"] == run_id


PROJECT_DATA = {"acme": ("a1", "ra"), "beta": ("b1", "rb")}


@pytest.mark.parametrize("route", ROUTES)
def test_project_id_optional_for_a_project_key_required_for_an_operator_key(
    server: Running, route: str
) -> None:
    beta = server.keys.create("beta", scope="ingest")
    reader = server.keys.create("acme", scope="read")
    operator = server.keys.create("ops", scope="operator")
    import time

    time.sleep(1.1)  # the key cache rereads the key file
    t = _iso(datetime.now(UTC) - timedelta(hours=1))
    for key, (event_id, run_id) in (
        (server.key, PROJECT_DATA["acme"]),
        (beta, PROJECT_DATA["beta"]),
    ):
        r = server.client.post(
            "/v1/events/batch",
            headers=server.headers(key),
            json={"events": [prompt_call(event_id, run_id=run_id, timestamp=t)]},
        )
        assert r.status_code == 202, r.text
    server.flush()

    def call(key: str, project: str | None, data_of: str = "acme") -> httpx.Response:
        event_id, run_id = PROJECT_DATA[data_of]
        path = route.replace("/event/x", f"/event/{event_id}").replace("/runs/x", f"/runs/{run_id}")
        params = {} if project is None else {"project_id": project}
        return server.client.get(path, params=params, headers=server.headers(key))

    # A project's key (admin or read): its own project, named or left out; another is 403.
    for key in (server.key, reader):
        for project in (None, "acme"):
            r = call(key, project)
            assert r.status_code == 200 and _shows(route, r.json(), "acme"), (project, r.text)
        r = call(key, "beta", data_of="beta")
        assert (r.status_code, r.json()["field"]) == (403, "project_id")
        assert "'acme'" in r.json()["message"] and "'beta'" in r.json()["message"]
    # An operator key reads every project, so it names one: without project_id, a 400.
    r = call(operator, None)
    assert (r.status_code, r.json()["field"]) == (400, "project_id")
    assert "operator" in r.json()["message"]
    for project in ("acme", "beta"):
        r = call(operator, project, data_of=project)
        assert r.status_code == 200 and _shows(route, r.json(), project), (project, r.text)


def _nodes(tree: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for root in tree for n in (root, *_nodes(root["children"]))]


def test_run_tree_and_logs_show_each_event_alike_with_its_stored_cost_source(
    server: Running,
) -> None:
    t = datetime.now(UTC) - timedelta(hours=1)
    events = [
        prompt_call("priced", run_id="costs", timestamp=_iso(t)),  # gpt-4o, priced here
        prompt_call(
            "client",
            run_id="costs",
            parent_event_id="priced",
            timestamp=_iso(t + timedelta(seconds=1)),
            cost_estimate_usd=0.25,
            user_id="u1",
            session_id="s1",
            tags=["blue"],
        ),
        prompt_call(
            "unpriced",
            run_id="costs",
            timestamp=_iso(t + timedelta(seconds=2)),
            model="no-such-model-anywhere",
        ),
    ]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202, r.text
    server.flush()
    logs = {e["event_id"]: e for e in get(server, "/v1/analytics/logs", run_id="costs")["events"]}
    tree = get(server, "/v1/analytics/runs/costs")["tree"]
    in_tree = {n["id"]: n["event"] for n in _nodes(tree) if n["kind"] == "event"}
    assert in_tree == logs  # every field, cost_source, user, session and tags included
    stored = {
        row["event_id"]: row["cost_source"]
        for row in server.query(
            "SELECT event_id, cost_source FROM events FINAL WHERE run_id = {r:String}",
            {"r": "costs"},
        )
    }
    assert stored == {"priced": "computed", "client": "client", "unpriced": "unknown"}
    assert {i: e["cost_source"] for i, e in in_tree.items()} == stored
    assert (in_tree["client"]["user_id"], in_tree["client"]["tags"]) == ("u1", ["blue"])


def test_openapi_states_the_shared_range_and_an_optional_project_id() -> None:
    from watchllm_ext.openapi import build_document

    paths = build_document()["paths"]
    for path in ROUTES:
        template = path.replace("/event/x", "/event/{event_id}").replace(
            "/runs/x", "/runs/{run_id}"
        )
        params = {p["name"]: p for p in paths[template]["get"]["parameters"]}
        assert (
            params["project_id"]["required"] is False
            and "operator" in (params["project_id"]["description"])
        )
        has_range = path in RANGE_ROUTES
        assert {"period", "from", "to"} <= set(params) if has_range else "period" not in params
        if has_range:
            assert params["period"]["schema"]["enum"] == list(PERIODS)


# --- answers bounded in bytes ---

FAT_TEXT = "é😀x" * 3334  # 10,002 characters, multibyte: cut on characters, never bytes
FAT_TAGS = [f"{i:03d}-" + "ü" * 123 for i in range(64)]  # 64 tags of 128 characters


def _fat_events(n: int, run_id: str, t0: datetime) -> list[dict[str, Any]]:
    return [
        prompt_call(
            f"fat-{i:04d}",
            run_id=run_id,
            parent_event_id=f"fat-{i - 1:04d}" if i % 5 else None,
            timestamp=_iso(t0 + timedelta(milliseconds=10 * i)),
            status="error",
            error_message=FAT_TEXT[:10_000],
            tags=FAT_TAGS,
            prompt=FAT_TEXT,
            response=FAT_TEXT[:150],  # short: shown whole, not flagged
        )
        for i in range(n)
    ]


def _load_fat(server: Running, n: int, run_id: str, t0: datetime) -> list[dict[str, Any]]:
    events = _fat_events(n, run_id, t0)
    for i in range(0, n, 100):
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(), json={"events": events[i : i + 100]}
        )
        assert r.status_code == 202, r.text
    server.flush()
    return events


def _raw_get(server: Running, path: str, **params: Any) -> httpx.Response:
    r = server.client.get(path, params={"project_id": "acme", **params}, headers=server.headers())
    assert r.status_code == 200, r.text
    return r


def test_run_tree_of_fat_events_holds_summaries_within_its_byte_budget(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from watchllm_ext.analytics import routes

    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    events = _load_fat(server, 300, "fat-run", t0)
    r = _raw_get(server, "/v1/analytics/runs/fat-run")
    body = r.json()
    nodes = _nodes(body["tree"])
    assert len(nodes) == 300 and body["truncated"] is False
    assert len(r.content) <= body["max_bytes"] == routes.TREE_MAX_BYTES
    for node in nodes:
        summary = node["event"]
        assert summary["error_message"] == FAT_TEXT[:200]
        assert summary["prompt_preview"] == FAT_TEXT[:200]
        assert summary["response_preview"] == FAT_TEXT[:150]
        assert summary["tags"] == FAT_TAGS[:16]
        assert summary["truncated_fields"] == ["error_message", "prompt", "tags"]
    # Was ~45 KB a node (error_message, tags whole); a summary now, whatever the data.
    assert len(r.content) / len(nodes) < 7_000  # 16 tags of 128 two-byte letters: 4 KB
    # The whole values are still one request away.
    detail = get(server, "/v1/analytics/event/fat-0007")["event"]
    assert detail["error_message"] == FAT_TEXT[:10_000] and detail["tags"] == FAT_TAGS

    # A budget smaller than the run: the first nodes in time order, as many as fit.
    monkeypatch.setattr(routes, "TREE_MAX_BYTES", 200_000)
    r = _raw_get(server, "/v1/analytics/runs/fat-run")
    body = r.json()
    shown = sorted(n["id"] for n in _nodes(body["tree"]))
    assert body["truncated"] is True and body["max_bytes"] == 200_000
    assert len(r.content) <= 200_000 < len(r.content) + 8_000  # full up to a node and 2 KB
    assert shown == [e["event_id"] for e in events[: len(shown)]]
    assert body["run"]["event_count"] == 300  # the figures still count every event


def test_logs_pages_stop_at_their_byte_budget_and_paging_returns_each_event_once(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from watchllm_ext.analytics import routes

    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    events = _load_fat(server, 250, "fat-logs", t0)
    # Events of one millisecond share a timestamp: the cursor's id part must order them.
    same_time = [
        prompt_call(
            f"tie-{i}", run_id="fat-logs", timestamp=_iso(t0), error_message=FAT_TEXT[:10_000]
        )
        for i in range(12)
    ]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": same_time})
    assert r.status_code == 202, r.text
    server.flush()
    window = {"from": _iso(t0 - timedelta(minutes=1)), "to": _iso(t0 + timedelta(minutes=1))}

    page = _raw_get(server, "/v1/analytics/logs", limit=1000, **window)
    body = page.json()
    assert len(body["events"]) == 262 and body["next_cursor"] is None
    assert body["bytes_capped"] is False and body["max_bytes"] == routes.LOGS_MAX_BYTES
    assert len(page.content) <= routes.LOGS_MAX_BYTES and len(page.content) / 262 < 7_000
    flagged = {e["event_id"]: e["truncated_fields"] for e in body["events"]}
    assert flagged["tie-3"] == ["error_message"] and flagged["fat-0003"] == [
        "error_message",
        "prompt",
        "tags",
    ]

    budget = 60_000
    monkeypatch.setattr(routes, "LOGS_MAX_BYTES", budget)
    seen: list[str] = []
    capped = 0
    cursor = None
    while True:
        more = {"cursor": cursor} if cursor else {}
        page = _raw_get(server, "/v1/analytics/logs", limit=100, **window, **more)
        body = page.json()
        assert len(page.content) <= budget and body["events"]
        capped += body["bytes_capped"]
        seen += [e["event_id"] for e in body["events"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    want = sorted(events + same_time, key=lambda e: (e["timestamp"], e["event_id"]), reverse=True)
    assert seen == [e["event_id"] for e in want]  # each once, in order, none skipped
    assert capped >= 5  # the budget, not `limit`, ended these pages
