"""The OTLP exporter sink (watchllm_ext/otel/export.py) against real HTTP endpoints: a small
OTLP/HTTP receiver in the test (a real server that decodes with opentelemetry-proto) for
every attribute, retries on 503 with Retry-After, dead letters on 400, 413 splitting and
partial success; then the round trip into a second WatchLLM's receiver, compared field by
field through the analytics API."""

from __future__ import annotations

import gzip
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from hashlib import blake2b
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Running, free_port, prompt_call
from hypothesis import HealthCheck, example, given, settings
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from test_durability import ServeProcess
from test_fast_validate import ANY_EVENT

from watchllm_ext.ingest.fast_validate import validate_list
from watchllm_ext.keys import KeyStore
from watchllm_ext.otel import decode
from watchllm_ext.otel.export import build_request, event_span, hex_id, row_span, typed_value
from watchllm_ext.otel.mapping import Span, attribute_text, map_span
from watchllm_ext.schema import EVENT_ADAPTER

Answer = tuple[int, dict[str, str], bytes]


class OtlpEndpoint:
    """An OTLP/HTTP traces endpoint on loopback: each request is gunzipped, parsed into
    ExportTraceServiceRequest and kept; `answer(request)` decides the reply (200 by default)."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.answer: Callable[[ExportTraceServiceRequest], Answer] = lambda _: (200, {}, b"")
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                endpoint.requests.append(request)
                endpoint.headers.append(dict(self.headers.items()))
                endpoint.times.append(time.monotonic())
                status, headers, reply = endpoint.answer(request)
                self.send_response(status)
                headers = {"Content-Type": "application/x-protobuf", **headers}
                headers["Content-Length"] = str(len(reply))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[Span]:
        """Every span received, decoded (resource attributes on each)."""
        out: list[Span] = []
        for request in self.requests:
            decoded = decode.spans_of(request)
            assert decoded.rejected == 0, decoded.problems
            out.extend(decoded.spans)
        return out

    def wait_spans(self, n: int, timeout_s: float = 30) -> list[Span]:
        deadline = time.monotonic() + timeout_s
        while len(spans := self.spans()) < n:
            assert time.monotonic() < deadline, f"got {len(spans)} spans of {n}"
            time.sleep(0.05)
        return spans


@pytest.fixture
def endpoint() -> Iterator[OtlpEndpoint]:
    ep = OtlpEndpoint()
    yield ep
    ep.close()


def ns(text: str) -> int:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(when.timestamp()) * 10**9 + when.microsecond * 1000


def send_trace(url: str, key: str) -> None:
    """Spans from the real opentelemetry-sdk exporter: a server span with typed attributes,
    span events and a link, an LLM chat span under it (with cost), a failed plain span."""
    resource = Resource.create(
        {
            "service.name": "checkout",
            "service.version": "1.4.2",
            "deployment.environment": "staging",
        }
    )
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(
        endpoint=f"{url}/v1/traces", headers={"Authorization": f"Bearer {key}"}
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test.app", "0.1")
    with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER) as root:
        root.set_attributes(
            {
                "http.route": "/chat",
                "http.status_code": 200,
                "app.ratio": 0.25,
                "app.flag": True,
                "app.list": ["a", "b"],
                "app.ints": [1, 2, 3],
                "app.looks_numeric": "007",
            }
        )
        root.add_event("cache.miss", {"key": "k1", "size": 3})
        context = root.get_span_context()
        with tracer.start_as_current_span(
            "chat gpt-4o-mini", kind=SpanKind.CLIENT, links=[Link(context, {"why": "retry"})]
        ) as chat:
            chat.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o-mini",
                    "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                    "gen_ai.usage.input_tokens": 120,
                    "gen_ai.usage.output_tokens": 30,
                    "gen_ai.usage.cost": 0.0125,
                    "gen_ai.input.messages": json.dumps(
                        [{"role": "user", "parts": [{"type": "text", "content": "Weather?"}]}]
                    ),
                    "user.id": "u-7",
                    "app.custom": 42,
                }
            )
        with tracer.start_as_current_span("db.query") as failed:
            failed.set_status(Status(StatusCode.ERROR, "timeout after 5s"))
    provider.shutdown()


def stored_spans(running: Running) -> list[dict[str, Any]]:
    running.flush()
    return running.query("SELECT * FROM spans FINAL ORDER BY start_time, span_id")


# --- the exporter against a real OTLP endpoint --------------------------------------------------


def test_events_and_spans_reach_the_endpoint_with_every_attribute(
    server_factory: Any, endpoint: OtlpEndpoint
) -> None:
    running = server_factory(
        otlp_export_endpoint=endpoint.url,
        otlp_export_headers={"Authorization": "Bearer collector-key"},
    )
    event = prompt_call(
        "e1",
        parent_event_id="p0",
        user_id="u1",
        session_id="s1",
        tags=["a", "b"],
        release="1.2",
        env="staging",
        client={"hostname": "h1"},
        metadata={"k": 1},
        response_metadata={"finish_reason": "stop"},
        cost_estimate_usd=0.5,
        status="error",
        error_message="boom",
    )
    tool = {
        "event_id": "0123456789abcdef",  # already a span id: kept as it is
        "event_type": "tool_call",
        "run_id": "0af7651916cd43dd8448eb211c80319c",  # already a trace id
        "timestamp": "2026-01-02T03:04:06Z",
        "tool_name": "search",
        "tool_input": {"q": "x"},
        "tool_output": "plain text",
        "latency_ms": 2.0,
    }
    answer = running.client.post(
        "/v1/events/batch", json={"events": [event, tool]}, headers=running.headers()
    )
    assert answer.status_code == 202, answer.text
    send_trace(running.url, running.key)
    got = {s.span_id: s for s in endpoint.wait_spans(5)}
    running.flush()
    time.sleep(0.3)
    # 2 events + 3 spans; the chat span's event is not sent again as an event.
    assert len(endpoint.spans()) == 5

    span = got[hex_id("e1", 8)]
    assert span.trace_id == blake2b(b"run-1", digest_size=16).hexdigest()
    assert span.parent_span_id == blake2b(b"p0", digest_size=8).hexdigest()
    assert span.name == "chat gpt-4o"
    assert span.kind == "client"
    assert (span.status_code, span.status_message) == ("error", "boom")
    assert span.start_unix_nano == ns("2026-01-02T03:04:05.678Z")
    assert span.end_unix_nano - span.start_unix_nano == 123_500_000
    assert span.resource == {"watchllm.project_id": "acme"}
    assert span.scope_name == "watchllm"
    assert span.attributes == {
        "watchllm.event_type": "prompt_call",
        "watchllm.event_id": "e1",
        "watchllm.run_id": "run-1",
        "watchllm.parent_event_id": "p0",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
        "gen_ai.provider.name": "openai",
        "gen_ai.usage.input_tokens": 100,
        "gen_ai.usage.output_tokens": 50,
        "gen_ai.usage.cost": 0.5,
        "gen_ai.input.messages": json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "hello"}]}],
            separators=(",", ":"),
        ),
        "watchllm.prompt_form": "text",
        "gen_ai.output.messages": json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "world"}]}],
            separators=(",", ":"),
        ),
        "watchllm.user_id": "u1",
        "watchllm.session_id": "s1",
        "watchllm.tags": '["a","b"]',
        "watchllm.release": "1.2",
        "watchllm.env": "staging",
        "watchllm.client": '{"hostname":"h1"}',
        "watchllm.metadata": '{"k":1}',
        "watchllm.response_metadata": '{"finish_reason":"stop"}',
        "watchllm.status": "error",
        "watchllm.latency_ms": 123.5,
        "watchllm.error_message": "boom",
        "watchllm.cost_source": "client",
    }

    span = got["0123456789abcdef"]
    assert span.trace_id == tool["run_id"]
    assert span.parent_span_id is None
    assert (span.name, span.kind, span.status_code) == ("execute_tool search", "internal", "unset")
    assert span.attributes == {
        "watchllm.event_type": "tool_call",
        "watchllm.event_id": "0123456789abcdef",
        "watchllm.run_id": tool["run_id"],
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "search",
        "gen_ai.tool.call.arguments": '{"q":"x"}',
        "gen_ai.tool.call.result": '"plain text"',
        "watchllm.env": "production",
        "watchllm.status": "success",
        "watchllm.latency_ms": 2.0,
    }

    # The spans went out as they were stored: same ids, times, kind, status, events, links,
    # attributes typed again, the resource with the project beside it.
    for row in stored_spans(running):
        sent = got[row["span_id"]]
        assert sent.trace_id == row["trace_id"]
        assert sent.parent_span_id == (row["parent_span_id"] or None)
        assert (sent.name, sent.kind) == (row["name"], row["kind"])
        assert (sent.status_code, sent.status_message) == (
            row["status_code"],
            row["status_message"],
        )
        assert sent.resource == {
            **{k: typed_value(v) for k, v in row["resource_attributes"].items()},
            "watchllm.project_id": "acme",
        }
        assert sent.resource["service.name"] == "checkout"
        assert {k: attribute_text(v) for k, v in sent.attributes.items()} == row["attributes"]
        events = [
            {"name": e.name, "time_unix_nano": e.time_unix_nano, "attributes": e.attributes}
            for e in sent.events
        ]
        assert events == json.loads(row["span_events"])
        assert sent.links == json.loads(row["links"])
    root = next(s for s in got.values() if s.name == "POST /chat")
    assert root.attributes["http.status_code"] == 200
    assert root.attributes["app.ratio"] == 0.25
    assert root.attributes["app.flag"] is True
    assert root.attributes["app.list"] == ["a", "b"]
    assert root.attributes["app.ints"] == [1, 2, 3]
    assert root.attributes["app.looks_numeric"] == "007"  # not JSON's own text of a number
    assert root.events[0].attributes == {"key": "k1", "size": 3}
    chat = next(s for s in got.values() if s.name == "chat gpt-4o-mini")
    assert chat.links[0]["span_id"] == root.span_id
    assert chat.attributes["gen_ai.usage.cost"] == 0.0125

    headers = endpoint.headers[0]
    assert headers["Authorization"] == "Bearer collector-key"
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == "application/x-protobuf"
    metrics = running.client.get("/metrics").text
    assert "watchllm_otlp_export_spans_total 5.0" in metrics


def test_503_with_retry_after_is_retried_after_the_wait(
    server_factory: Any, endpoint: OtlpEndpoint
) -> None:
    calls = {"n": 0}

    def answer(_: ExportTraceServiceRequest) -> Answer:
        calls["n"] += 1
        if calls["n"] <= 2:
            return 503, {"Retry-After": "1"}, b"busy"
        return 200, {}, b""

    endpoint.answer = answer
    running = server_factory(otlp_export_endpoint=endpoint.url, sink_retry_initial_s=0.05)
    answer_ = running.client.post(
        "/v1/events/batch", json={"events": [prompt_call("e1")]}, headers=running.headers()
    )
    assert answer_.status_code == 202
    endpoint.wait_spans(3)  # two refused copies, then the accepted one
    gaps = [b - a for a, b in zip(endpoint.times, endpoint.times[1:], strict=False)]
    assert all(gap >= 0.95 for gap in gaps), gaps  # Retry-After: 1 was waited out
    running.flush()
    stats = running.wl.writer.stats()["sinks"]["otlp-export"]
    assert stats["retries_total"] == 2
    assert stats["delivered_events_total"] == 1
    assert stats["dead_letter_events_total"] == 0
    assert "503" in stats["last_error"]


def test_400_is_permanent_and_the_batch_goes_to_the_dead_letters(
    server_factory: Any, endpoint: OtlpEndpoint
) -> None:
    endpoint.answer = lambda _: (400, {}, b"bad span")
    running = server_factory(otlp_export_endpoint=endpoint.url)
    events = [prompt_call("e1"), prompt_call("e2")]
    answer = running.client.post(
        "/v1/events/batch", json={"events": events}, headers=running.headers()
    )
    assert answer.status_code == 202
    running.flush()
    assert len(endpoint.requests) == 1  # never sent again
    letters = running.client.get(
        "/v1/admin/dead-letters", params={"sink": "otlp-export"}, headers=running.headers()
    ).json()
    entries = letters["dead_letters"]
    assert [(e["sink"], e["events"]) for e in entries] == [("otlp-export", 2)]
    assert "answered 400: bad span" in entries[0]["reason"]
    lines = (running.settings.spool_path / "dead-letter" / "otlp-export.jsonl").read_text()
    assert [e["event_id"] for e in json.loads(lines.splitlines()[0])["events"]] == ["e1", "e2"]
    # The store got them all the same: one sink's refusal holds back no other.
    assert running.query("SELECT count() AS n FROM events")[0]["n"] == 2
    # Once the endpoint is fixed, a replay sends them (to this sink only).
    endpoint.answer = lambda _: (200, {}, b"")
    replay = running.client.post(
        "/v1/admin/dead-letters/replay", params={"sink": "otlp-export"}, headers=running.headers()
    )
    assert replay.status_code == 200, replay.text
    sent = endpoint.wait_spans(4)[2:]
    assert sorted(s.attributes["watchllm.event_id"] for s in sent) == ["e1", "e2"]


def test_spans_refused_for_good_are_dead_letters_and_replay(
    server_factory: Any, endpoint: OtlpEndpoint
) -> None:
    endpoint.answer = lambda _: (401, {}, b"unknown key")
    running = server_factory(otlp_export_endpoint=endpoint.url)
    send_trace(running.url, running.key)
    running.flush()
    stats = running.wl.writer.stats()["sinks"]["otlp-export"]
    assert stats["dead_letter_events_total"] == 3  # the trace's three span rows
    assert "answered 401: unknown key" in stats["last_error"]
    letters = running.client.get(
        "/v1/admin/dead-letters", params={"sink": "otlp-export"}, headers=running.headers()
    ).json()["dead_letters"]
    # One entry per refused batch (the exporter sent the spans one by one, which may be
    # batched apart), every one of span rows.
    assert {e["kind"] for e in letters} == {"spans"}
    assert sum(e["events"] for e in letters) == 3
    # The store sink took them all the same.
    assert len(stored_spans(running)) == 3
    endpoint.answer = lambda _: (200, {}, b"")
    # Counted before the replay: the replayed spans may reach the endpoint before its answer.
    refused = len(endpoint.spans())
    replay = running.client.post(
        "/v1/admin/dead-letters/replay", params={"sink": "otlp-export"}, headers=running.headers()
    )
    assert replay.status_code == 200, replay.text
    sent = endpoint.wait_spans(refused + 3)[refused:]
    assert sorted(s.span_id for s in sent) == sorted(r["span_id"] for r in stored_spans(running))


def test_413_splits_the_request_down_to_one_span(
    server_factory: Any, endpoint: OtlpEndpoint
) -> None:
    def answer(request: ExportTraceServiceRequest) -> Answer:
        n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        too_big = any(
            kv.key == "watchllm.event_id" and kv.value.string_value == "huge"
            for r in request.resource_spans
            for s in r.scope_spans
            for span in s.spans
            for kv in span.attributes
        )
        return (413, {}, b"too large") if n > 2 or too_big else (200, {}, b"")

    endpoint.answer = answer
    running = server_factory(otlp_export_endpoint=endpoint.url)
    events = [prompt_call(f"e{i}") for i in range(5)]
    running.client.post("/v1/events/batch", json={"events": events}, headers=running.headers())
    running.flush()
    accepted = [r for r in endpoint.requests if answer(r)[0] == 200]
    got = sorted(
        kv.value.string_value
        for r in accepted
        for rs in r.resource_spans
        for s in rs.scope_spans
        for span in s.spans
        for kv in span.attributes
        if kv.key == "watchllm.event_id"
    )
    assert got == ["e0", "e1", "e2", "e3", "e4"]
    assert running.wl.writer.stats()["sinks"]["otlp-export"]["dead_letter_events_total"] == 0
    # One span the endpoint refuses even alone: permanent.
    running.client.post(
        "/v1/events/batch", json={"events": [prompt_call("huge")]}, headers=running.headers()
    )
    running.flush()
    assert running.wl.writer.stats()["sinks"]["otlp-export"]["dead_letter_events_total"] == 1


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_partial_success_is_counted_and_not_sent_again(
    server_factory: Any, endpoint: OtlpEndpoint, encoding: str
) -> None:
    if encoding == "protobuf":
        reply = ExportTraceServiceResponse(
            partial_success=ExportTracePartialSuccess(rejected_spans=1, error_message="e1: bad")
        ).SerializeToString()
        headers = {}
    else:  # OTLP JSON: int64 as a string
        reply = b'{"partialSuccess": {"rejectedSpans": "1", "errorMessage": "e1: bad"}}'
        headers = {"Content-Type": "application/json"}
    endpoint.answer = lambda _: (200, headers, reply)
    running = server_factory(otlp_export_endpoint=endpoint.url)
    running.client.post(
        "/v1/events/batch",
        json={"events": [prompt_call("e1"), prompt_call("e2")]},
        headers=running.headers(),
    )
    running.flush()
    time.sleep(0.3)
    assert len(endpoint.requests) == 1
    metrics = running.client.get("/metrics").text
    assert "watchllm_otlp_export_rejected_spans_total 1.0" in metrics
    assert "watchllm_otlp_export_spans_total 1.0" in metrics
    assert running.wl.writer.stats()["sinks"]["otlp-export"]["retries_total"] == 0


def test_an_unreachable_endpoint_is_retried_not_dead_lettered(server_factory: Any) -> None:
    port = free_port()  # nothing listens there
    running = server_factory(
        otlp_export_endpoint=f"http://127.0.0.1:{port}/v1/traces", sink_retry_initial_s=0.05
    )
    running.client.post(
        "/v1/events/batch", json={"events": [prompt_call("e1")]}, headers=running.headers()
    )
    deadline = time.monotonic() + 30
    while (stats := running.wl.writer.stats()["sinks"]["otlp-export"])["retries_total"] < 3:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats["dead_letter_events_total"] == 0 and stats["lag_events"] == 1
    assert "ConnectError" in stats["last_error"]


def test_off_without_an_endpoint(server: Running) -> None:
    assert "otlp-export" not in server.wl.writer.stats()["sinks"]


def test_typed_value_gives_back_what_the_stored_text_was_made_of() -> None:
    assert typed_value("5") == 5
    assert typed_value("0.25") == 0.25
    assert typed_value("true") is True
    for value in (["a", 1], {"a": [1, 2.5]}, [], {"é": "ü"}):
        assert typed_value(attribute_text(value)) == value
    for text in ("007", "1.50", '"quoted"', "null", "[1,  2]", "plain", "", "1e400", " 5"):
        assert typed_value(text) == text
    deep = "[" * 20 + "]" * 20
    assert typed_value(deep) == deep  # deeper than a receiver takes: sent as text
    assert typed_value(str(2**70)) == str(2**70)  # no int64: sent as text


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(ANY_EVENT)
@example(  # text that reads as JSON, which the second hop sends typed
    prompt_call(
        "123",
        run_id="true",
        parent_event_id="1.5",
        user_id="42",
        session_id="null",
        release="[1,2]",
        model="false",
        tags=["7"],
        metadata={"k": "8"},
        prompt=[{"role": "user", "content": [{"type": "text", "content": "x"}]}],
    )
)
def test_any_event_comes_back_from_its_span(raw: dict[str, Any]) -> None:
    """Any valid event, as the server carries it (a struct, or a model when the fast path
    declines), through protobuf bytes and the receiver's decoder and mapping: the same event."""
    raw = {**raw, "project_id": "p"}
    raw["event_id"] = raw.get("event_id") or "filled-by-server"
    raw["timestamp"] = raw.get("timestamp") or "2026-01-01T00:00:00.123456Z"
    structs = validate_list(json.dumps([raw]).encode())
    event = structs[0] if structs else EVENT_ADAPTER.validate_python(raw)
    body = build_request([((("watchllm.project_id", "p"),), ("watchllm", ""), event_span(event))])
    spans = decode.spans_of(decode.parse_protobuf(body.SerializeToString())).spans
    mapped = map_span(spans[0])
    assert mapped.unmapped == []
    assert mapped.row.event_type == raw["event_type"]
    back = EVENT_ADAPTER.validate_python({**mapped.event, "project_id": "p"})
    want = EVENT_ADAPTER.validate_python(raw)
    # Python values: timestamps compare as instants (the span's is UTC), 3 and 3.0 as equal.
    assert back.model_dump() == want.model_dump()
    # A second hop: the receiver's stored span (texts), forwarded again, is the same event.
    row = mapped.row
    scope = (row.scope_name, row.scope_version)
    body = build_request([(tuple(row.resource_attributes.items()), scope, row_span(row))])
    again = decode.spans_of(decode.parse_protobuf(body.SerializeToString())).spans[0]
    remapped = map_span(again)
    assert remapped.row == mapped.row
    assert remapped.event is not None
    back = EVENT_ADAPTER.validate_python({**remapped.event, "project_id": "p"})
    assert back.model_dump() == want.model_dump()


# --- round trip: WatchLLM -> OTLP -> WatchLLM ---------------------------------------------------

ROUND_TRIP_EVENTS: list[dict[str, Any]] = [
    prompt_call(
        "rt-1",
        run_id="run-rt",
        tags=["x"],
        metadata={"nested": {"a": [1, 2.5, None, True]}},
        client={"hostname": "h", "sdk_version": "1.0"},
        response_metadata={"finish_reason": "stop"},
        user_id="u",
        session_id="s",
        release="r1",
        env="development",
    ),
    prompt_call(  # no cost given: the first server computes it
        "rt-2",
        run_id="run-rt",
        parent_event_id="rt-1",
        prompt=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
            {"role": "user", "content": [{"type": "text", "content": "looks like one part"}]},
            {"role": "user", "content": [{"type": "image_url", "url": "http://x/y.png"}]},
        ],
        tool_calls=[{"id": "call_1", "tool_name": "calc", "tool_input": {"x": 1}}],
        status="timeout",
        error_message="slow",
    ),
    {
        "event_id": "rt-3",
        "event_type": "tool_call",
        "run_id": "run-rt",
        "parent_event_id": "rt-2",
        "timestamp": "2026-01-02T03:04:06.001Z",
        "tool_name": "calc",
        "tool_input": "just text",
        "tool_output": [1, {"two": 2}],
        "latency_ms": 0.333,
    },
    {
        "event_id": "rt-4",
        "event_type": "agent_step",
        "run_id": "run-rt",
        "timestamp": "2026-01-02T03:04:06.5Z",
        "step_number": 3,
        "step_name": "plan",
        "reasoning": "think",
        "action": "act",
        "observation": "saw",
        "latency_ms": 10.0,
    },
    {
        "event_id": "rt-5",
        "event_type": "error",
        "run_id": "run-rt",
        "timestamp": "2026-01-02T03:04:07Z",
        "error_type": "ValueError",
        "error_message": "bad",
        "stack_trace": "line 1\nline 2",
    },
    {
        "event_id": "rt-6",
        "event_type": "assertion_failed",
        "run_id": "run-rt",
        "timestamp": "2026-01-02T03:04:07Z",
        "assertion_name": "is_json",
        "expected": {"a": 1},
        "actual": "nope",
        "severity": "high",
    },
    {
        "event_id": "rt-7",
        "event_type": "hallucination_detected",
        "run_id": "run-rt",
        "timestamp": "2026-01-02T03:04:07Z",
        "detection_method": "nli",
        "confidence": 0.9,
        "claim": "the moon is cheese",
        "evidence": "it is not",
    },
    {
        "event_id": "rt-8",
        "event_type": "cost_threshold_exceeded",
        "run_id": "run-rt",
        "timestamp": "2026-01-02T03:04:07Z",
        "threshold_usd": 10.0,
        "actual_usd": 12.5,
        "window": "1h",
    },
    {
        "event_id": "rt-9",
        "event_type": "performance_alert",
        "run_id": "run-rt",
        "timestamp": "2026-01-02T03:04:07Z",
        "metric": "latency_p95",
        "threshold": 1000.0,
        "actual": -1.5,
        "window": "5m",
    },
]
ROUND_TRIP_EVENTS[0]["cost_estimate_usd"] = 0.25


def event_detail(running: Running, event_id: str) -> dict[str, Any]:
    answer = running.client.get(f"/v1/analytics/event/{event_id}", headers=running.headers())
    assert answer.status_code == 202, answer.text
    return answer.json()


def get(url: str, path: str, key: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_round_trip_into_a_second_watchllm(server_factory: Any, tmp_path: Path) -> None:
    # chDB holds one folder per process: the first WatchLLM is a `watchllm serve` process,
    # the second runs here (uvicorn on loopback), so its store can be read whole.
    second = server_factory(data_dir=tmp_path / "second")
    data = tmp_path / "first"
    data.mkdir()
    key = KeyStore(data / "keys.sqlite3").create("acme", scope="admin")
    first = ServeProcess(
        data,
        free_port(),
        WATCHLLM_OTLP_EXPORT_ENDPOINT=f"{second.url}/v1/traces",
        WATCHLLM_OTLP_EXPORT_HEADERS=json.dumps(second.headers()),
    )
    try:
        answer = httpx.post(
            f"{first.url}/v1/events/batch",
            json={"events": ROUND_TRIP_EVENTS},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 202, answer.text
        send_trace(first.url, key)
        # 9 events sent as events (and spans), 3 spans of which one is LLM work.
        deadline = time.monotonic() + 60
        while True:
            second.flush()
            n = second.query("SELECT count() AS n FROM spans FINAL")[0]["n"]
            if n >= len(ROUND_TRIP_EVENTS) + 3:
                break
            assert time.monotonic() < deadline, f"{n} spans arrived"
            time.sleep(0.1)
        time.sleep(0.5)
        second.flush()

        # Events: every stored column the same, but the receipt time and the cost's source
        # (a forwarded cost is the client's on the second server).
        chat = second.query(
            "SELECT * FROM spans FINAL WHERE event_type = 'prompt_call'"
            " AND name = 'chat gpt-4o-mini'"
        )[0]
        from_spans = second.query(
            "SELECT span_id FROM spans FINAL WHERE trace_id = {t:String}"
            " AND event_type IS NOT NULL",
            {"t": chat["trace_id"]},
        )
        assert len(from_spans) == 2  # the chat span and the failed one
        ids = [e["event_id"] for e in ROUND_TRIP_EVENTS] + [
            f"{chat['trace_id']}-{r['span_id']}" for r in from_spans
        ]
        assert second.query("SELECT count() AS n FROM events FINAL")[0]["n"] == len(ids)
        for event_id in ids:
            one = get(first.url, f"/v1/analytics/event/{event_id}", key)
            two = get(second.url, f"/v1/analytics/event/{event_id}", second.key)
            a, b = dict(one.pop("event")), dict(two.pop("event"))
            if event_id == "rt-2":
                assert (a["cost_source"], b["cost_source"]) == ("computed", "client")
                assert b["cost_estimate_usd"] == a["cost_estimate_usd"] > 0
            for name in ("ingested_at", "cost_source"):
                a.pop(name, None)
                b.pop(name, None)
            assert b == a, event_id  # the instrumentation scope too (spans.scope_name)
            assert two == one, event_id

        # Spans: the OTel trace's tree the same on both (events and spans, field by field).
        trace = chat["trace_id"]
        one = get(first.url, f"/v1/analytics/runs/{trace}", key)
        two = get(second.url, f"/v1/analytics/runs/{trace}", second.key)
        assert two["tree"] == one["tree"]
        assert (two["run"], two["span_count"]) == (one["run"], one["span_count"])
        assert one["span_count"] == 3
    finally:
        first.kill(signal.SIGTERM)
    # The second's rows hold every attribute, the resource naming the sending project too.
    rows = second.query(f"SELECT * FROM spans FINAL WHERE trace_id = '{trace}'")
    root = next(r for r in rows if r["name"] == "POST /chat")
    assert root["resource_attributes"]["watchllm.project_id"] == "acme"
    assert root["resource_attributes"]["service.name"] == "checkout"
    assert root["attributes"]["app.ints"] == attribute_text([1, 2, 3])
    assert root["attributes"]["app.looks_numeric"] == "007"
    assert json.loads(root["span_events"])[0]["attributes"] == {"key": "k1", "size": 3}
    # The events sent as events are spans there too, one each, of their type.
    forwarded = second.query(
        "SELECT attributes['watchllm.event_id'] AS id, event_type FROM spans FINAL"
        " WHERE has(mapKeys(attributes), 'watchllm.event_id') ORDER BY id"
    )
    assert [(r["id"], r["event_type"]) for r in forwarded] == sorted(
        (e["event_id"], e["event_type"]) for e in ROUND_TRIP_EVENTS
    )


def test_an_event_named_by_trace_and_span_id_is_sent_with_that_span_id() -> None:
    """Ids `<trace>-<span>` (an OTel span's event, or a JSON event under one: otel/ids.py)
    give the span id part within their own trace; in another trace they are hashed."""
    trace, span, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "00f067aa0ba902b7"
    raw = prompt_call(f"{trace}-{span}", run_id=trace, parent_event_id=f"{trace}-{parent}")
    sent = event_span(EVENT_ADAPTER.validate_python({**raw, "project_id": "p"}))
    assert (sent.trace_id.hex(), sent.span_id.hex()) == (trace, span)
    assert sent.parent_span_id.hex() == parent
    elsewhere = prompt_call(f"{trace}-{span}", run_id="run-9", parent_event_id=f"{trace}-{parent}")
    sent = event_span(EVENT_ADAPTER.validate_python({**elsewhere, "project_id": "p"}))
    assert sent.span_id.hex() == hex_id(f"{trace}-{span}", 8) != span
    assert sent.parent_span_id.hex() == hex_id(f"{trace}-{parent}", 8)
