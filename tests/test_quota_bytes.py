"""The monthly payload-bytes quota (docs/QUOTAS.md, `payload_bytes`) counts every field of an
accepted event, whatever its type: a real server on loopback, the memory backend, real chDB.

Each case is a project of its own (its own usage) whose one event carries one big field; the
plan's limit is below that field's size, so the event is taken (sizes are known only after
validation), counted, and the project's next batch is refused 429."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from conftest import Running
from test_quota import away_from_period_end

LIMIT = 5_000  # payload bytes a month, in the plan of every project here
BIG = 6_000  # the size of each case's big field: over the limit on its own
TEXT = "x" * BIG
SHORT = "y" * 100  # a ShortText field (10,000 at most) or a tag (128)
JSON_VALUE = {"text": "z" * BIG}  # a JSON field: its keys count too (4 bytes of "text")

BASE = {"run_id": "run-1", "timestamp": "2026-01-02T03:04:05.678Z"}
# (case, event): one event type with one of its fields big; every type is here, each of its
# big fields (the base fields user_id, tags... are the same for all: tags stand for them).
CASES: list[tuple[str, dict[str, Any]]] = [
    (
        "prompt_call.tool_calls.tool_input",
        {
            "event_type": "prompt_call",
            "tool_calls": [{"tool_name": "search", "tool_input": JSON_VALUE}],
        },
    ),
    (
        "prompt_call.tool_calls.tool_output",
        {
            "event_type": "prompt_call",
            "tool_calls": [{"tool_name": "search", "tool_output": TEXT}],
        },
    ),
    (
        "prompt_call.tool_calls.error_message",
        {
            "event_type": "prompt_call",
            "tool_calls": [{"tool_name": "search", "error_message": TEXT}],
        },
    ),
    ("prompt_call.error_message", {"event_type": "prompt_call", "error_message": TEXT}),
    (
        "prompt_call.prompt messages",
        {
            "event_type": "prompt_call",
            "prompt": [{"role": "user", "content": TEXT}],
        },
    ),
    (
        "tool_call.error_message",
        {
            "event_type": "tool_call",
            "tool_name": "search",
            "error_message": TEXT,
        },
    ),
    ("agent_step.action", {"event_type": "agent_step", "step_number": 1, "action": TEXT}),
    (
        "agent_step.observation",
        {
            "event_type": "agent_step",
            "step_number": 1,
            "observation": TEXT,
        },
    ),
    ("error.error_message", {"event_type": "error", "error_type": "E", "error_message": TEXT}),
    (
        "assertion_failed.tags",
        {
            "event_type": "assertion_failed",
            "assertion_name": "a",
            "tags": [SHORT] * 60,
        },
    ),
    (
        "hallucination_detected.claim",
        {
            "event_type": "hallucination_detected",
            "detection_method": "judge",
            "confidence": 0.5,
            "claim": TEXT,
        },
    ),
    (
        "hallucination_detected.evidence",
        {
            "event_type": "hallucination_detected",
            "detection_method": "judge",
            "confidence": 0.5,
            "claim": "c",
            "evidence": TEXT,
        },
    ),
    (
        "cost_threshold_exceeded.tags",
        {
            "event_type": "cost_threshold_exceeded",
            "threshold_usd": 1.0,
            "actual_usd": 2.0,
            "window": "day",
            "tags": [SHORT] * 60,
        },
    ),
    (
        "performance_alert.tags",
        {
            "event_type": "performance_alert",
            "metric": "latency_ms",
            "threshold": 1.0,
            "actual": 2.0,
            "window": "5m",
            "tags": [SHORT] * 60,
        },
    ),
]


@pytest.fixture
def byte_server(server_factory: Any) -> Running:
    away_from_period_end()
    return server_factory(
        quota_backend="memory",
        quota_plans={"default": {"payload_bytes_per_month": LIMIT}},
        durability="memory",
    )


def used_bytes(server: Running, key: str) -> int:
    return int(
        server.client.get("/v1/usage", headers=server.headers(key)).json()["used"]["payload_bytes"]
    )


def tiny() -> dict[str, Any]:
    return {"events": [{"event_type": "prompt_call", "run_id": "r", "event_id": uuid.uuid4().hex}]}


def test_every_field_of_every_event_type_counts(byte_server: Running) -> None:
    server = byte_server
    keys = {case: server.keys.create(f"p{i}", scope="ingest") for i, (case, _) in enumerate(CASES)}
    time.sleep(0.5)  # the key file is reread every 0.2 s in tests
    for case, event in CASES:
        key = keys[case]
        h = server.headers(key)
        taken = server.client.post(
            "/v1/events/batch", json={"events": [{**BASE, **event}]}, headers=h
        )
        assert taken.status_code == 202, (case, taken.text)
        used = used_bytes(server, key)
        big = 60 * len(SHORT) if case.endswith(".tags") else BIG
        # The big field, and the few bytes of the event's other values (ids, its time...).
        assert big <= used < big + 300, (case, used)
        refused = server.client.post("/v1/events/batch", json=tiny(), headers=h)
        assert refused.status_code == 429, (case, refused.text)
        assert refused.json()["window"] == "payload_bytes", case
