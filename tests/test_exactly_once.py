"""Exactly once in the store: event_id (with its project) is the idempotency key.

The same batch sent twice, overlapping batches, and a replay of rows the store already holds
(what a crash between insert and cursor commit causes) must leave every figure unchanged:
counts, sums, averages, percentiles and distinct counts, read as the analytics read them
(`FINAL` on the ReplacingMergeTree tables).
"""

from __future__ import annotations

import random
import statistics
from datetime import datetime, timedelta
from typing import Any

from conftest import Running, prompt_call
from stores import EVERY_STORE

from watchllm_ext.auth import Principal
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.store.rows import tables_for

pytestmark = EVERY_STORE  # FINAL's deduplication is the store's: hold every store to it

FIGURES = """
SELECT
    count() AS events,
    countIf(event_type = 'prompt_call') AS requests,
    sum(tokens_input) AS tokens_input,
    sum(tokens_output) AS tokens_output,
    round(sum(cost_estimate_usd), 9) AS cost,
    round(avg(latency_ms), 6) AS avg_latency,
    quantileExact(0.5)(latency_ms) AS p50,
    quantileExact(0.9)(latency_ms) AS p90,
    quantileExact(0.99)(latency_ms) AS p99,
    uniqExact(run_id) AS runs,
    uniqExact(user_id) AS users,
    round(countIf(status != 'success') / count(), 9) AS error_rate
FROM events FINAL
WHERE project_id = 'acme'
"""


def _events(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        prompt_call(
            f"ev-{i}",
            run_id=f"run-{i % 17}",
            user_id=f"user-{i % 5}",
            timestamp=f"2026-01-0{1 + i % 3}T{i % 24:02d}:{i % 60:02d}:00.{i % 1000:03d}Z",
            tokens_input=rng.randint(1, 5000),
            tokens_output=rng.randint(1, 2000),
            latency_ms=float(rng.randint(5, 9000)),
            status=rng.choice(["success", "success", "success", "error", "timeout"]),
        )
        for i in range(n)
    ]


def _expected(events: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(e["latency_ms"] for e in events)

    def exact_quantile(q: float) -> float:  # ClickHouse quantileExact: element at floor(q*n)
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    return {
        "events": len(events),
        "requests": len(events),
        "tokens_input": sum(e["tokens_input"] for e in events),
        "tokens_output": sum(e["tokens_output"] for e in events),
        "avg_latency": round(statistics.fmean(lat), 6),
        "p50": exact_quantile(0.5),
        "p90": exact_quantile(0.9),
        "p99": exact_quantile(0.99),
        "runs": len({e["run_id"] for e in events}),
        "users": len({e["user_id"] for e in events}),
        "error_rate": round(sum(e["status"] != "success" for e in events) / len(events), 9),
    }


def _moved(event: dict[str, Any], seconds: int) -> dict[str, Any]:
    """`event` sent again `seconds` later (or earlier), every figure changed."""
    moved = datetime.fromisoformat(event["timestamp"]) + timedelta(seconds=seconds)
    return {
        **event,
        "timestamp": moved.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "run_id": "run-moved",
        "user_id": "user-moved",
        "tokens_input": 99_999,
        "latency_ms": 99_999.0,
        "status": "error",
    }


def _figures(server: Running) -> dict[str, Any]:
    server.flush()
    (row,) = server.query(FIGURES)
    return row


def _post(server: Running, events: list[dict[str, Any]]) -> None:
    r = server.client.post("/v1/events/batch", json={"events": events}, headers=server.headers())
    assert r.status_code == 202, r.text


def test_duplicates_change_no_figure(server: Running) -> None:
    events = _events(600)
    _post(server, events[:400])
    once = _figures(server)
    expected = _expected(events[:400])
    assert {k: once[k] for k in expected} == expected

    _post(server, events[:400])  # the same batch again (a client retry)
    _post(server, events[200:600])  # overlapping with what is stored
    _post(server, [events[5], events[5], events[599]])  # duplicates inside one batch
    # Copies with their timestamps moved and other figures: the first copy stored wins.
    _post(server, [_moved(e, seconds) for e in events[:100] for seconds in (1, -1)])
    # A replay of rows the store already has, as after a crash before the cursor commit: the
    # spool holds events as accepted, i.e. after the transforms (cost) ran.
    server.flush()
    models = EVENT_LIST_ADAPTER.validate_python([{**e, "project_id": "acme"} for e in events])
    principal = Principal("acme", frozenset({"ingest"}))
    server.wl.pm.hook.transform_events(events=models, principal=principal)
    store = server.wl.store
    for table, data in tables_for(models[:300]).items():
        store.insert(table, data)

    after = _figures(server)
    expected = _expected(events)
    assert {k: after[k] for k in expected} == expected
    assert after["cost"] == round(
        sum((e["tokens_input"] * 2.5 + e["tokens_output"] * 10) / 1e6 for e in events), 9
    )

    # Raw rows do hold the duplicates: the figures are right because reads deduplicate.
    raw = server.query("SELECT count() AS n FROM events")[0]["n"]
    assert raw > len(events)
    runs = server.query("SELECT sum(event_count) AS n, sum(tokens_input) AS t FROM traces")
    assert runs == [{"n": len(events), "t": expected["tokens_input"]}]
    # Background merges collapse them for good, and the figures stay the same.
    server.query("OPTIMIZE TABLE events FINAL")
    assert server.query("SELECT count() AS n FROM events")[0]["n"] == len(events)
    assert _figures(server) == after
