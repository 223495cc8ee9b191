"""Ingestion over real HTTP into every store (tests/stores.py): single, array, batch, every
event type, each field read back as stored."""

from __future__ import annotations

import gzip
import json
from typing import Any

from conftest import Running, prompt_call
from stores import EVERY_STORE

pytestmark = EVERY_STORE

ALL_TYPES: list[dict[str, Any]] = [
    prompt_call(
        "p1",
        prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        response_metadata={"finish_reason": "stop"},
        status="error",
        error_message="rate limited",
        tags=["a", "b"],
        user_id="u1",
        session_id="s1",
        release="1.2.3",
        env="staging",
        parent_event_id="root",
        client={"hostname": "h", "sdk_version": "0.1", "platform": "linux"},
        metadata={"k": [1, 2]},
        tool_calls=[
            {
                "id": "c1",
                "tool_name": "search",
                "tool_input": {"q": "x"},
                "tool_output": "res",
                "status": "success",
                "latency_ms": 5.0,
            },
            {"tool_name": "calc", "tool_input": "1+1"},
        ],
    ),
    {
        "event_id": "t1",
        "event_type": "tool_call",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:06+02:00",
        "tool_name": "search",
        "tool_input": {"q": "y"},
        "tool_output": ["r1", "r2"],
        "status": "timeout",
        "latency_ms": 1500.0,
        "error_message": "slow",
    },
    {
        "event_id": "a1",
        "event_type": "agent_step",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:07Z",
        "step_number": 3,
        "step_name": "plan",
        "reasoning": "because",
        "action": "search",
        "observation": "found",
        "latency_ms": 2.5,
    },
    {
        "event_id": "x1",
        "event_type": "error",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:08Z",
        "error_type": "ValueError",
        "error_message": "bad",
        "stack_trace": "Traceback...",
    },
    {
        "event_id": "as1",
        "event_type": "assertion_failed",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:09Z",
        "assertion_name": "is_json",
        "expected": {"type": "object"},
        "actual": "text",
        "severity": "high",
    },
    {
        "event_id": "h1",
        "event_type": "hallucination_detected",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:10Z",
        "detection_method": "nli",
        "confidence": 0.9,
        "claim": "the moon is cheese",
        "evidence": "NASA",
        "severity": "critical",
    },
    {
        "event_id": "c1",
        "event_type": "cost_threshold_exceeded",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:11Z",
        "threshold_usd": 10.0,
        "actual_usd": 12.5,
        "window": "1d",
    },
    {
        "event_id": "pa1",
        "event_type": "performance_alert",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:12Z",
        "metric": "latency_p95_ms",
        "threshold": 1000.0,
        "actual": 1500.0,
        "window": "5m",
    },
]


def _row(server: Running, event_id: str) -> dict[str, Any]:
    rows = server.query(
        "SELECT * FROM events FINAL WHERE project_id = 'acme' AND event_id = {id:String}",
        {"id": event_id},
    )
    assert len(rows) == 1, rows
    return rows[0]


def test_single_event(server: Running) -> None:
    r = server.client.post("/v1/projects/acme/events", json=prompt_call(), headers=server.headers())
    assert r.status_code == 202, r.text
    assert r.json() == {"project_id": "acme", "accepted": 1, "event_ids": ["e1"]}
    server.flush()
    row = _row(server, "e1")
    assert row["model"] == "gpt-4o"
    assert row["tokens_input"] == 100
    assert row["project_id"] == "acme"
    assert row["timestamp"] == "2026-01-02 03:04:05.678"
    # gpt-4o: $2.50 / $10 per million tokens.
    assert row["cost_source"] == "computed"
    assert abs(row["cost_estimate_usd"] - (100 * 2.5 + 50 * 10) / 1e6) < 1e-12


def test_accepted_answer_bytes_are_json_dumps_compact(server: Running) -> None:
    """The 202 body (written by msgspec) is byte for byte what JSONResponse's json.dumps
    wrote: compact, keys in order, ids and project as sent."""
    events = [prompt_call(f"id-{i}:x.y_z") for i in range(3)]
    r = server.client.post("/v1/projects/acme/events", json=events, headers=server.headers())
    assert r.status_code == 202, r.text
    assert r.headers["content-type"] == "application/json"
    want = {"project_id": "acme", "accepted": 3, "event_ids": [e["event_id"] for e in events]}
    assert r.content == json.dumps(want, ensure_ascii=False, separators=(",", ":")).encode()
    assert r.headers["content-length"] == str(len(r.content))


def test_array_of_events(server: Running) -> None:
    events = [prompt_call(f"e{i}") for i in range(5)]
    r = server.client.post("/v1/projects/acme/events", json=events, headers=server.headers())
    assert r.status_code == 202, r.text
    assert r.json()["event_ids"] == [f"e{i}" for i in range(5)]
    server.flush()
    assert server.query("SELECT count() AS n FROM events FINAL")[0]["n"] == 5


def test_batch_endpoint_gzip(server: Running) -> None:
    body = gzip.compress(
        json.dumps({"events": [prompt_call(f"g{i}") for i in range(300)]}).encode()
    )
    r = server.client.post(
        "/v1/events/batch",
        content=body,
        headers={
            **server.headers(),
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 300
    server.flush()
    assert server.query("SELECT count() AS n FROM events FINAL")[0]["n"] == 300


def test_a_gzip_body_of_several_members_is_one_body(server: Running) -> None:
    """What `cat head.gz events.gz tail.gz` makes, or a compressor that flushes in members
    (RFC 1952): the members' bytes in order are the body. A big one goes to the worker
    process whole, decompressed."""
    for n in (3, 2000):
        text = json.dumps({"events": [prompt_call(f"m{n}-{i}") for i in range(n)]}).encode()
        cut = len(text) // 2
        body = gzip.compress(text[:cut]) + gzip.compress(b"") + gzip.compress(text[cut:])
        r = server.client.post(
            "/v1/events/batch",
            content=body,
            headers={**server.headers(), "Content-Encoding": "gzip"},
        )
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == n
    server.flush()
    assert server.query("SELECT count() AS n FROM events FINAL")[0]["n"] == 2003


def test_every_event_type_is_stored_with_its_fields(server: Running) -> None:
    r = server.client.post("/v1/events/batch", json={"events": ALL_TYPES}, headers=server.headers())
    assert r.status_code == 202, r.text
    server.flush()

    p = _row(server, "p1")
    assert p["event_type"] == "prompt_call"
    assert json.loads(p["prompt"]) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert json.loads(p["response_metadata"]) == {"finish_reason": "stop"}
    assert p["status"] == "error" and p["error_message"] == "rate limited"
    assert p["tags"] == ["a", "b"] and p["user_id"] == "u1" and p["session_id"] == "s1"
    assert p["release"] == "1.2.3" and p["env"] == "staging"
    assert p["parent_event_id"] == "root"
    assert (p["client_hostname"], p["client_sdk_version"], p["client_platform"]) == (
        "h",
        "0.1",
        "linux",
    )
    assert json.loads(p["metadata"]) == {"k": [1, 2]}
    assert p["tool_call_count"] == 2

    t = _row(server, "t1")
    assert t["tool_name"] == "search" and json.loads(t["tool_input"]) == {"q": "y"}
    assert json.loads(t["tool_output"]) == ["r1", "r2"]
    assert t["status"] == "timeout" and t["latency_ms"] == 1500.0
    # +02:00 is stored as UTC.
    assert t["timestamp"] == "2026-01-02 01:04:06.000"

    a = _row(server, "a1")
    assert (a["step_number"], a["step_name"], a["reasoning"], a["action"], a["observation"]) == (
        3,
        "plan",
        "because",
        "search",
        "found",
    )

    x = _row(server, "x1")
    assert (x["error_type"], x["error_message"], x["stack_trace"]) == (
        "ValueError",
        "bad",
        "Traceback...",
    )

    s = _row(server, "as1")
    assert s["assertion_name"] == "is_json" and json.loads(s["expected"]) == {"type": "object"}
    assert s["actual"] == "text" and s["severity"] == "high"

    h = _row(server, "h1")
    assert (h["detection_method"], h["confidence"], h["claim"], h["evidence"]) == (
        "nli",
        0.9,
        "the moon is cheese",
        "NASA",
    )

    c = _row(server, "c1")
    assert (c["threshold_usd"], c["actual_usd"], c["alert_window"]) == (10.0, 12.5, "1d")

    m = _row(server, "pa1")
    assert (m["metric"], m["metric_threshold"], m["metric_actual"], m["alert_window"]) == (
        "latency_p95_ms",
        1000.0,
        1500.0,
        "5m",
    )

    tools = server.query(
        "SELECT event_id, call_index, source, tool_call_id, tool_name, tool_input, status"
        " FROM tool_calls FINAL ORDER BY event_id, call_index"
    )
    assert [(r["event_id"], r["call_index"], r["source"], r["tool_name"]) for r in tools] == [
        ("p1", 0, "prompt_call", "search"),
        ("p1", 1, "prompt_call", "calc"),
        ("t1", 0, "tool_call", "search"),
    ]
    assert tools[0]["tool_call_id"] == "c1" and json.loads(tools[0]["tool_input"]) == {"q": "x"}

    steps = server.query("SELECT event_id, step_number, step_name FROM agent_steps FINAL")
    assert steps == [{"event_id": "a1", "step_number": 3, "step_name": "plan"}]

    trace = server.query("SELECT run_id, event_count AS n, error_count AS errors FROM traces")
    # p1 (status error), t1 (timeout) and x1 (an error event) are errors.
    assert trace == [{"run_id": "run-1", "n": 8, "errors": 3}]


def test_cost_from_client_is_kept_and_unknown_model_is_marked(server: Running) -> None:
    events = [
        prompt_call("c1", cost_estimate_usd=0.5),
        prompt_call("c2", model="no-such-model-xyz", provider="nobody"),
        prompt_call("c3", model=None, provider=None),
    ]
    r = server.client.post("/v1/events/batch", json={"events": events}, headers=server.headers())
    assert r.status_code == 202, r.text
    server.flush()
    assert (_row(server, "c1")["cost_source"], _row(server, "c1")["cost_estimate_usd"]) == (
        "client",
        0.5,
    )
    assert _row(server, "c2")["cost_source"] == "unknown"
    assert _row(server, "c2")["cost_estimate_usd"] is None
    assert _row(server, "c3")["cost_source"] == "unknown"


def test_custom_model_price_setting(server_factory: Any) -> None:
    server = server_factory(model_prices={"my-finetune": (1.0, 2.0)})
    r = server.client.post(
        "/v1/events/batch",
        json={"events": [prompt_call("f1", model="my-finetune", provider="openai")]},
        headers=server.headers(),
    )
    assert r.status_code == 202
    server.flush()
    assert _row(server, "f1")["cost_estimate_usd"] == (100 * 1.0 + 50 * 2.0) / 1e6


def test_partial_batch_answers_207_and_stores_only_valid(server: Running) -> None:
    events = [prompt_call("ok1"), {**prompt_call("bad1"), "tokens_input": -5}, prompt_call("ok2")]
    r = server.client.post("/v1/events/batch", json={"events": events}, headers=server.headers())
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["accepted"] == 2 and body["event_ids"] == ["ok1", "ok2"]
    assert body["rejected"] == [
        {
            "index": 1,
            "event_id": "bad1",
            "errors": [
                {"field": "tokens_input", "message": "Input should be greater than or equal to 0"}
            ],
        }
    ]
    server.flush()
    ids = [r["event_id"] for r in server.query("SELECT event_id FROM events ORDER BY event_id")]
    assert ids == ["ok1", "ok2"]


def test_ids_of_dots_alone_are_refused(server: Running) -> None:
    """Ids "." and ".." are path segments: an event under such an id could not be fetched by
    its URL (browsers and HTTP clients resolve them away). Dots among other characters are
    ids like any."""
    rule = "an id is letters, digits and _ . : - (not dots alone)"
    events = [
        prompt_call("..", run_id="ok-run"),
        prompt_call("dots-run", run_id="."),
        prompt_call("a..b", run_id="v1.2..x"),
    ]
    r = server.client.post("/v1/events/batch", json={"events": events}, headers=server.headers())
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["event_ids"] == ["a..b"]
    assert [(x["index"], x["errors"]) for x in body["rejected"]] == [
        (0, [{"field": "event_id", "message": rule}]),
        (1, [{"field": "run_id", "message": rule}]),
    ]
    for path in ("/v1/analytics/event/%2E%2E", "/v1/analytics/runs/%2E"):
        lookup = server.client.get(path, headers=server.headers())
        assert lookup.status_code == 400 and "not dots alone" in lookup.text, lookup.text
    server.flush()
    ids = [r["event_id"] for r in server.query("SELECT event_id FROM events")]
    assert ids == ["a..b"]


def test_health_and_ready(server: Running) -> None:
    assert server.client.get("/healthz").json()["status"] == "ok"
    ready = server.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["store"]["ok"] and body["checks"]["writer"]["running"]
