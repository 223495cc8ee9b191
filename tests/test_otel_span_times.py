"""Span times the events' range cannot hold are refused span by span, never moved.

Spans made by the real OpenTelemetry SDK with the times a broken clock or a buggy client
gives (unset, starting after 2100, ending before they start, longer than an event's
latency_ms maximum), encoded by the OTLP exporter's own encoder, sent as protobuf and as OTLP
JSON to a real server: 200 with partial_success naming the span and the field, the good span
of the same request stored with exactly the times sent, the bad one not at all. The in-process
exporter's conversion refuses the same spans. The boundaries (zero length, exactly 30 days,
the last nanosecond before 2100, an end past 2100 within 30 days of the start, as a JSON
event's timestamp + latency_ms may be) are taken.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from conftest import Running, ServerThread, make_settings
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context

from watchllm_ext.app import create_app
from watchllm_ext.keys import KeyStore
from watchllm_ext.otel.decode import parse_protobuf, spans_of
from watchllm_ext.otel.export import build_request, event_span
from watchllm_ext.otel.exporter import convert
from watchllm_ext.otel.ids import MAX_NS
from watchllm_ext.otel.mapping import map_span
from watchllm_ext.schema import EVENT_ADAPTER, MAX_LATENCY_MS

T0 = 1_767_323_045_000_000_000  # 2026-01-02T03:04:05Z
DAY_NS = 86_400 * 10**9
Y2200 = int(datetime(2200, 1, 1, tzinfo=UTC).timestamp()) * 10**9
MAX_DURATION_NS = int(MAX_LATENCY_MS) * 10**6
LLM = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("otel_span_times")
    settings = make_settings(tmp)
    keys = KeyStore(settings.keys_path, refresh_s=0.2)
    key = keys.create("acme", scope="admin")
    app = create_app(settings)
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=60) as client:
        yield Running(thread.url, app, settings, keys, key, client, thread)
    keys.close()


@dataclass
class Case:
    id: str
    start: int
    end: int | None  # None: never ended
    says: str  # in the answer's message


BAD = [
    Case("start-unset", 0, T0, "startTimeUnixNano is not set"),
    Case("end-unset", T0, 0, "endTimeUnixNano is not set"),
    Case("unfinished", T0, None, "endTimeUnixNano is not set"),
    Case("start-after-2100", Y2200, Y2200, "startTimeUnixNano 7258118400000000000 is not before"),
    Case("end-in-2200", T0, Y2200, "over the longest latency_ms"),
    Case("end-before-start", T0, T0 - 10**9, "endTimeUnixNano is 1000000000 ns before"),
    Case("300-days", T0, T0 + 300 * DAY_NS, "the span lasts 25920000000 ms"),
    Case("30-days-and-1-ns", T0, T0 + MAX_DURATION_NS + 1, "over the longest latency_ms"),
]
GOOD = [
    Case("zero-length", T0, T0, ""),
    Case("exactly-30-days", T0, T0 + MAX_DURATION_NS, ""),
    Case("last-ns-before-2100", MAX_NS - 1, MAX_NS - 1, ""),
    # A JSON event may start just before 2100 and last 30 days; so may a span (the exporter
    # sink sends such an event as this span: it must come back).
    Case("ends-after-2100", MAX_NS - 1, MAX_NS - 1 + MAX_DURATION_NS, ""),
    Case("first-ns-after-1970", 1, 1, ""),
]


def sdk_spans(case: Case) -> list[ReadableSpan]:
    """The case's LLM span and a good LLM span of the same trace, made by the SDK with the
    case's times (the SDK takes any times it is given)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("span-times")
    root = tracer.start_span("good", kind=SpanKind.CLIENT, attributes=LLM, start_time=T0)
    root.end(end_time=T0 + 5_000_000)
    bad = tracer.start_span(
        f"chat {case.id}",
        context=set_span_in_context(root),
        kind=SpanKind.CLIENT,
        attributes=LLM,
        start_time=case.start,
    )
    if case.end is not None:
        bad.end(end_time=case.end)
    spans: list[ReadableSpan] = [*memory.get_finished_spans()]
    if case.end is None:
        spans.append(bad)  # what an exporter of unfinished spans sends: no end time
    provider.shutdown()
    assert [s.name for s in spans] == ["good", f"chat {case.id}"]
    return spans


def otlp_json(spans: list[ReadableSpan]) -> bytes:
    """OTLP JSON of the exporter's encoding: ids in hex, enums as integers."""
    doc = json_format.MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in doc["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(doc).encode()


def send(server: Running, spans: list[ReadableSpan], as_json: bool) -> tuple[int, str]:
    """(rejected spans, message) of a 200 answer, decoded in the request's encoding."""
    media = "application/json" if as_json else "application/x-protobuf"
    body = otlp_json(spans) if as_json else encode_spans(spans).SerializeToString()
    r = server.client.post(
        "/v1/traces", content=body, headers={**server.headers(), "Content-Type": media}
    )
    assert r.status_code == 200, (r.status_code, r.content[:300])
    answer = ExportTraceServiceResponse()
    if as_json:
        json_format.Parse(r.content, answer)
    else:
        answer.ParseFromString(r.content)
    return answer.partial_success.rejected_spans, answer.partial_success.error_message


def stored(server: Running, trace_id: str, n: int) -> list[dict[str, Any]]:
    """The trace's spans, once `n` of them (and their events) are in the store."""
    deadline = time.monotonic() + 30
    while True:
        server.flush()
        rows = server.query(
            "SELECT name, toUnixTimestamp64Micro(start_time) AS start,"
            " toUnixTimestamp64Micro(end_time) AS end, duration_ms FROM spans FINAL"
            " WHERE trace_id = {t:String} ORDER BY name",
            {"t": trace_id},
        )
        events = server.query(
            "SELECT count() AS n FROM events FINAL WHERE run_id = {t:String}", {"t": trace_id}
        )[0]["n"]
        if len(rows) >= n and events >= n:
            assert (len(rows), events) == (n, n)
            return rows
        assert time.monotonic() < deadline, (rows, events)
        time.sleep(0.05)


def trace_of(spans: list[ReadableSpan]) -> str:
    context = spans[0].context
    assert context is not None
    return format(context.trace_id, "032x")


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_out_of_range_times_are_refused_span_by_span(
    server: Running, case: Case, as_json: bool
) -> None:
    spans = sdk_spans(case)
    rejected, message = send(server, spans, as_json)
    assert rejected == 1, message
    # Named by its place in the request and by the field that is wrong.
    assert "resourceSpans[0].scopeSpans[0].spans[1]" in message, message
    assert case.says in message, message
    # The good span is stored as sent; nothing of the bad one (no made-up times).
    (row,) = stored(server, trace_of(spans), 1)
    assert (row["name"], row["start"], row["end"]) == ("good", T0 // 1000, T0 // 1000 + 5000)
    assert row["duration_ms"] == 5.0
    # The in-process exporter refuses the same span with the same words.
    converted, problems = convert(spans)
    assert [s.name for s in converted] == ["good"]
    assert len(problems) == 1 and case.says in problems[0], problems


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_times_at_the_bounds_are_stored_as_sent(server: Running, case: Case) -> None:
    spans = sdk_spans(case)
    rejected, message = send(server, spans, as_json=False)
    assert rejected == 0, message
    rows = {r["name"]: r for r in stored(server, trace_of(spans), 2)}
    assert case.end is not None
    row = rows[f"chat {case.id}"]
    assert (row["start"], row["end"]) == (case.start // 1000, case.end // 1000)
    assert row["duration_ms"] == (case.end - case.start) / 1e6
    converted, problems = convert(spans)
    assert problems == [] and len(converted) == 2


def test_a_random_trace_is_still_taken(server: Running) -> None:
    # The checks cost nothing to a normal span: a fresh trace at the current time.
    now = time.time_ns()
    case = Case("now", now, now + 1_234_567, "")
    spans = sdk_spans(case)
    assert send(server, spans, as_json=True) == (0, "")
    assert len(stored(server, trace_of(spans), 2)) == 2


@pytest.mark.parametrize(
    ("timestamp", "latency_ms"),
    [("2099-12-31T23:59:59.999Z", MAX_LATENCY_MS), ("1970-01-01T00:00:00Z", 1.0)],
    ids=["last-ms-before-2100-for-30-days", "the-epoch"],
)
def test_an_event_at_the_edge_of_the_range_comes_back_from_its_span(
    timestamp: str, latency_ms: float
) -> None:
    """The exporter sink sends an event as a span ending at timestamp + latency_ms: an event
    of the last millisecond before 2100 lasting 30 days (valid) is a span ending in 2100, and
    one at the epoch a span starting at 0 (OTLP's "not set", so sent 1 ns later); the
    receiver takes both, and maps them back to the same events."""
    raw = {
        "event_id": "edge-1",
        "event_type": "prompt_call",
        "run_id": "run-edge",
        "project_id": "p",
        "timestamp": timestamp,
        "model": "gpt-4o",
        "latency_ms": latency_ms,
    }
    event = EVENT_ADAPTER.validate_python(raw)
    body = build_request([((("watchllm.project_id", "p"),), ("watchllm", ""), event_span(event))])
    decoded = spans_of(parse_protobuf(body.SerializeToString()))
    assert decoded.rejected == 0, decoded.problems
    (span,) = decoded.spans
    assert span.end_unix_nano > MAX_NS or span.start_unix_nano == 1
    mapped = map_span(span)
    assert mapped.event is not None
    back = EVENT_ADAPTER.validate_python({**mapped.event, "project_id": "p"})
    assert back.model_dump() == event.model_dump()
