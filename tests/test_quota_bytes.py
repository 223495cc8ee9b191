"""The monthly payload-bytes quota (docs/QUOTAS.md, `payload_bytes`) counts every field of an
accepted event, whatever its type, and the rows of OpenTelemetry spans: a real server on
loopback, the memory backend, real chDB, real OTLP protobuf bodies.

Each case is a project of its own (its own usage) whose one event carries one big field; the
plan's limit is below that field's size, so the event is taken (sizes are known only after
validation), counted, and the project's next batch is refused 429."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Running
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from test_otel_receiver import Collect
from test_otel_workers import wait_for_a_worker
from test_quota import away_from_period_end

from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
from watchllm_ext.otel import pool
from watchllm_ext.plugins import get_plugin_manager
from watchllm_ext.settings import Settings

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
        otel_worker_processes=0,
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


def plain_spans(attribute_bytes: int) -> bytes:
    """An OTLP protobuf body of two spans that are not LLM work (no event: a `spans` row
    each), one with an attribute of `attribute_bytes`."""
    collect = Collect()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(collect))
    tracer = provider.get_tracer("test.app")
    with tracer.start_as_current_span("render") as span:
        span.set_attribute("blob", "x" * attribute_bytes)
        with tracer.start_as_current_span("db.query"):
            pass
    provider.shutdown()
    return encode_spans(collect.spans).SerializeToString()


@pytest.mark.parametrize("where", ["server", "worker"])
def test_span_rows_count_and_reach_the_limit(server_factory: Any, where: str) -> None:
    """Spans with no event used to add nothing: a 900 KB attribute was stored uncounted.
    Bodies of 64 KiB or more are mapped in a worker process: counted the same."""
    away_from_period_end()
    limit = 2 * OFFLOAD_MIN_BYTES
    server: Running = server_factory(
        quota_backend="memory",
        quota_plans={"default": {"payload_bytes_per_month": limit}},
        durability="memory",
        otel_worker_processes=1 if where == "worker" else 0,
    )
    h = {**server.headers(), "Content-Type": "application/x-protobuf"}
    # Under 64 KiB a body is mapped in the server; the worker's bodies are bigger.
    blob = OFFLOAD_MIN_BYTES + 1_000 if where == "worker" else 40_000
    if where == "worker":
        wait_for_a_worker()
    answered = pool.POOL.answered_total
    sent = 0
    while sent <= limit:
        assert (
            server.client.post("/v1/traces", content=plain_spans(blob), headers=h).status_code
            == 200
        )
        sent += blob
        used = used_bytes(server, server.key)
        # The attribute, and the two rows' other columns: ids, names, times, kind, status,
        # the resource's attributes (the SDK's own: telemetry.sdk.*, service.name).
        assert sent <= used < sent + 1_000 * (sent // blob), used
    assert pool.POOL.answered_total - answered == (sent // blob if where == "worker" else 0)
    refused = server.client.post("/v1/traces", content=plain_spans(10), headers=h)
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert b"payload bytes of this month" in refused.content  # the google.rpc.Status message


def test_spans_are_measured_only_when_a_plan_counts_bytes(tmp_path: Path) -> None:
    """Without a byte limit no built-in implements transform_spans: the OTLP path skips the
    hook, and a worker process's rows are spooled as the JSON it made."""
    plans = {"default": {"events_per_day": 10}, "big": {"payload_bytes_per_month": 10}}
    for backend, defined, implemented in (
        ("off", plans, False),
        ("memory", {"default": {"events_per_day": 10}}, False),
        ("memory", plans, True),
    ):
        settings = Settings(data_dir=tmp_path, quota_backend=backend, quota_plans=defined)
        hook = get_plugin_manager(settings, entry_points=False).hook.transform_spans
        assert bool(hook.get_hookimpls()) is implemented, (backend, defined)
