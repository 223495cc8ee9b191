"""The OTLP/HTTP receiver with the real opentelemetry-sdk exporter: protobuf (none, gzip,
deflate) and OTLP JSON, Bearer and Basic auth, partial success, the answers' encodings,
exactly once on a re-send, and the store's `spans` rows and mapped events."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import Running
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from stores import EVERY_STORE

from watchllm_ext.hookspecs import hookimpl

RESOURCE = Resource.create(
    {
        "service.name": "checkout",
        "service.version": "1.4.2",
        "deployment.environment.name": "staging",
    }
)


class Collect(SpanExporter):
    """Keeps the finished spans so a test can encode and send them itself."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def make_trace(exporter: SpanExporter) -> TracerProvider:
    """One agent trace: a server span, an LLM chat span under it, a tool span, a failed span."""
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test.app", "0.1")
    with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER) as root:
        root.set_attribute("http.route", "/chat")
        with tracer.start_as_current_span("chat gpt-4o-mini", kind=SpanKind.CLIENT) as chat:
            chat.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o-mini",
                    "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                    "gen_ai.usage.input_tokens": 120,
                    "gen_ai.usage.output_tokens": 30,
                    "user.id": "u-7",
                    "app.custom": "kept",
                }
            )
        with tracer.start_as_current_span("execute_tool get_weather") as tool:
            tool.set_attributes(
                {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": "get_weather",
                    "gen_ai.tool.call.arguments": '{"city": "Paris"}',
                }
            )
        with tracer.start_as_current_span("db.query") as failed:
            failed.set_status(Status(StatusCode.ERROR, "timeout after 5s"))
    return provider


def export(running: Running, **kwargs: Any) -> SpanExportResult:
    exporter = OTLPSpanExporter(
        endpoint=f"{running.url}/v1/traces",
        headers=kwargs.pop("headers", running.headers()),
        **kwargs,
    )
    collect = Collect()
    make_trace(collect).shutdown()
    result = exporter.export(collect.spans)
    exporter.shutdown()
    return result


def stored_spans(running: Running) -> list[dict[str, Any]]:
    running.flush()
    return running.query(
        "SELECT * FROM spans FINAL WHERE project_id = 'acme' ORDER BY start_time, span_id"
    )


def stored_events(running: Running) -> list[dict[str, Any]]:
    running.flush()
    return running.query(
        "SELECT event_type, event_id, run_id, parent_event_id, model, provider, tokens_input,"
        " tokens_output, cost_estimate_usd, env, release, user_id, metadata, tool_name,"
        " error_message FROM events FINAL WHERE project_id = 'acme' ORDER BY timestamp"
    )


@EVERY_STORE
@pytest.mark.parametrize("compression", [None, Compression.Gzip, Compression.Deflate])
def test_real_exporter_stores_spans_and_events(server: Running, compression: Any) -> None:
    assert export(server, compression=compression) is SpanExportResult.SUCCESS
    spans = stored_spans(server)
    assert len(spans) == 4
    by_name = {s["name"]: s for s in spans}
    root = by_name["POST /chat"]
    chat = by_name["chat gpt-4o-mini"]
    assert root["parent_span_id"] is None and root["kind"] == "server"
    assert chat["parent_span_id"] == root["span_id"] and chat["trace_id"] == root["trace_id"]
    assert chat["kind"] == "client" and chat["event_type"] == "prompt_call"
    assert chat["attributes"]["gen_ai.usage.input_tokens"] == "120"
    assert chat["resource_attributes"]["service.name"] == "checkout"
    assert chat["service_name"] == "checkout"
    assert by_name["db.query"]["status_code"] == "error"
    assert by_name["db.query"]["status_message"] == "timeout after 5s"
    assert root["event_type"] is None  # not LLM work: only in spans

    events = {e["event_type"]: e for e in stored_events(server)}
    assert set(events) == {"prompt_call", "tool_call", "error"}
    prompt = events["prompt_call"]
    assert prompt["event_id"] == f"{chat['trace_id']}-{chat['span_id']}"
    assert prompt["run_id"] == chat["trace_id"]
    assert prompt["parent_event_id"] == f"{chat['trace_id']}-{root['span_id']}"
    assert prompt["model"] == "gpt-4o-mini-2024-07-18" and prompt["provider"] == "openai"
    assert (prompt["tokens_input"], prompt["tokens_output"]) == (120, 30)
    assert prompt["cost_estimate_usd"] and prompt["cost_estimate_usd"] > 0  # price tables
    assert (prompt["env"], prompt["release"], prompt["user_id"]) == ("staging", "1.4.2", "u-7")
    assert json.loads(prompt["metadata"])["otel.attributes"] == {"app.custom": "kept"}
    assert events["tool_call"]["tool_name"] == "get_weather"
    assert events["error"]["error_message"] == "timeout after 5s"


def test_langfuse_path_and_basic_auth(server: Running) -> None:
    exporter = OTLPSpanExporter(
        endpoint=f"{server.url}/api/public/otel/v1/traces",
        headers={
            "Authorization": "Basic " + base64.b64encode(f"pk:{server.key}".encode()).decode()
        },
    )
    collect = Collect()
    make_trace(collect).shutdown()
    assert exporter.export(collect.spans) is SpanExportResult.SUCCESS
    assert len(stored_spans(server)) == 4


def _body(spans: list[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def _collected() -> list[ReadableSpan]:
    collect = Collect()
    make_trace(collect).shutdown()
    return collect.spans


@pytest.mark.parametrize(
    ("variable", "suffix"),
    [
        # the traces endpoint given as the base URL: the exporter posts to /
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        # the base URL given with the traces path: the exporter adds it again
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "/v1/traces"),
    ],
    ids=["traces-endpoint-without-path", "base-url-with-path"],
)
def test_a_wrong_exporter_endpoint_is_told_the_right_one(
    server: Running, monkeypatch: pytest.MonkeyPatch, variable: str, suffix: str
) -> None:
    """The two usual mistakes in the exporter's variables, as the SDK resolves them: the
    answer is a 404 whose message names the receiver and which variable holds what, in the
    OTLP form of the request's encoding (a protobuf Status, which the Collector's exporter
    shows; JSON otherwise). Other wrong routes keep their plain answers."""
    monkeypatch.setenv(variable, f"{server.url}{suffix}")
    exporter = OTLPSpanExporter(headers=server.headers())
    url = exporter._endpoint  # where the SDK posts: the mistake's URL
    assert url.rstrip("/") in (server.url, f"{server.url}/v1/traces/v1/traces")
    spans = _collected()
    assert exporter.export(spans) is SpanExportResult.FAILURE  # the real exporter, refused
    exporter.shutdown()
    for content_type in ("application/x-protobuf", "application/json", None):
        headers = server.headers() | ({"Content-Type": content_type} if content_type else {})
        answer = httpx.post(url, content=_body(spans), headers=headers)
        assert answer.status_code == 404, (content_type, answer.status_code, answer.content)
        if content_type == "application/x-protobuf":
            assert answer.headers["content-type"] == "application/x-protobuf"
            message = status_pb2.Status.FromString(answer.content).message
        else:
            message = answer.json()["message"]
        assert "traces go to POST /v1/traces" in message, message
        assert "OTEL_EXPORTER_OTLP_ENDPOINT to the server's base URL, without a path" in message
        assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT to the full URL" in message
    # Not a mistake of an exporter's endpoint: the plain answers.
    assert server.client.get("/v1/traces").status_code == 405
    other = server.client.post("/v1/tracez", content=b"{}")
    assert other.status_code == 404 and "OTEL_" not in other.json()["message"]
    assert stored_spans(server) == []


@EVERY_STORE
def test_resend_is_stored_once(server: Running) -> None:
    body = _body(_collected())
    headers = {**server.headers(), "Content-Type": "application/x-protobuf"}
    for _ in range(3):
        answer = server.client.post("/v1/traces", content=body, headers=headers)
        assert answer.status_code == 200, answer.content
    assert len(stored_spans(server)) == 4
    assert len(stored_events(server)) == 3


def to_otlp_json(spans: list[ReadableSpan]) -> dict[str, Any]:
    """The same request as OTLP JSON: hex ids, enum integers, int64 as strings."""
    from google.protobuf import json_format

    document = json_format.MessageToDict(encode_spans(spans))
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
                span["kind"] = (
                    ExportTraceServiceRequest()
                    .DESCRIPTOR.fields_by_name["resource_spans"]
                    .message_type.fields_by_name["scope_spans"]
                    .message_type.fields_by_name["spans"]
                    .message_type.enum_types_by_name["SpanKind"]
                    .values_by_name[span["kind"]]
                    .number
                )
    return document


def test_otlp_json_gives_the_same_rows(server: Running) -> None:
    spans = _collected()
    document = to_otlp_json(spans)
    answer = server.client.post(
        "/v1/traces",
        content=gzip.compress(json.dumps(document).encode()),
        headers={
            **server.headers(),
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.content == b'{"partialSuccess":{}}'  # compact, as docs/ANALYTICS.md shows it
    stored = stored_spans(server)
    assert {s["span_id"] for s in stored} == {format(s.context.span_id, "016x") for s in spans}
    assert len(stored_events(server)) == 3


def test_a_protobuf_body_in_several_gzip_members_is_one_body(server: Running) -> None:
    """A gzip body of two members (a compressor that flushes in members): one export."""
    spans = _collected()
    raw = encode_spans(spans).SerializeToString()
    answer = server.client.post(
        "/v1/traces",
        content=gzip.compress(raw[:100]) + gzip.compress(raw[100:]),
        headers={
            **server.headers(),
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
        },
    )
    assert answer.status_code == 200, answer.text
    stored = stored_spans(server)
    assert {s["span_id"] for s in stored} == {format(s.context.span_id, "016x") for s in spans}


def test_partial_success_names_the_bad_span(server: Running) -> None:
    request = encode_spans(_collected())
    bad = request.resource_spans[0].scope_spans[0].spans[1]
    bad.trace_id = b"\x01" * 15  # one byte short
    answer = server.client.post(
        "/v1/traces",
        content=request.SerializeToString(),
        headers={**server.headers(), "Content-Type": "application/x-protobuf"},
    )
    assert answer.status_code == 200
    response = ExportTraceServiceResponse.FromString(answer.content)
    assert response.partial_success.rejected_spans == 1
    assert "traceId has 15 bytes, must have 16" in response.partial_success.error_message
    assert len(stored_spans(server)) == 3


@pytest.mark.parametrize(
    ("headers", "status", "words"),
    [
        ({}, 401, "Authorization"),
        ({"Authorization": "Bearer nope"}, 401, "not valid"),
        ({"Authorization": "Basic !!!"}, 401, "Basic"),
        ({"Content-Type": "text/plain"}, 415, "Content-Type"),
        ({"Content-Encoding": "br"}, 415, "Content-Encoding"),
    ],
)
def test_failures_answer_a_status_in_the_request_encoding(
    server: Running, headers: dict[str, str], status: int, words: str
) -> None:
    sent = {"Content-Type": "application/x-protobuf", **server.headers(), **headers}
    if "Authorization" in headers and not headers["Authorization"]:
        sent.pop("Authorization")
    if headers == {}:
        sent.pop("Authorization")
    answer = server.client.post("/v1/traces", content=_body(_collected()), headers=sent)
    assert answer.status_code == status
    if sent["Content-Type"] == "application/x-protobuf":
        message = status_pb2.Status.FromString(answer.content).message
    else:
        message = answer.json()["message"]
    assert words in message


def test_undecodable_bodies_are_400(server: Running) -> None:
    for content_type, body in [
        ("application/x-protobuf", b"\xff\xff\xff\xff not protobuf"),
        ("application/json", b"{not json"),
        ("application/json", b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 7}]}]}]}'),
    ]:
        answer = server.client.post(
            "/v1/traces", content=body, headers={**server.headers(), "Content-Type": content_type}
        )
        assert answer.status_code == 400, (body, answer.content)
    assert server.client.get("/healthz").status_code == 200
    assert stored_spans(server) == []


def test_spool_full_is_503_with_retry_after_and_nothing_answered_200_is_lost(
    server_factory: Any,
) -> None:
    import faults  # the store outage is simulated on chDB

    running: Running = server_factory(
        plugin_objects=(faults,), spool_max_bytes=256 * 1024, sink_retry_max_s=0.2
    )
    marker = running.settings.data_dir / "store-down"
    marker.touch()
    answered: set[str] = set()
    for _ in range(200):
        spans = _collected()
        answer = running.client.post(
            "/v1/traces",
            content=_body(spans),
            headers={**running.headers(), "Content-Type": "application/x-protobuf"},
        )
        if answer.status_code == 503:
            assert int(answer.headers["Retry-After"]) >= 1
            assert "retry" in status_pb2.Status.FromString(answer.content).message
            break
        assert answer.status_code == 200, answer.content
        answered.update(format(s.context.span_id, "016x") for s in spans)
    else:
        pytest.fail("the spool never filled")
    assert answered
    marker.unlink()
    stored = {s["span_id"] for s in stored_spans(running)}
    assert answered <= stored


def test_metrics_count_spans_and_unmapped_keys(server: Running) -> None:
    assert export(server) is SpanExportResult.SUCCESS
    text = httpx.get(f"{server.url}/metrics").text
    assert 'watchllm_otel_spans_total{outcome="accepted"} 4.0' in text
    # The chat span's app.custom: a namespace of no public convention (test below).
    assert 'watchllm_otel_unmapped_attributes_total{namespace="(other)"} 1.0' in text


def llm_spans_with(trace: bytes, keys: list[str]) -> list[Span]:
    """LLM spans (prompt calls) carrying `keys` (string values), 1,000 a span at most."""
    spans = []
    for n, start in enumerate(range(0, len(keys), 1000)):
        attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
        attributes |= {key: "v" for key in keys[start : start + 1000]}
        spans.append(
            Span(
                trace_id=trace,
                span_id=trace[:4] + n.to_bytes(4, "big"),
                name="chat gpt-4o",
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=time.time_ns(),
                end_time_unix_nano=time.time_ns() + 1_000,
                attributes=[
                    KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attributes.items()
                ],
            )
        )
    return spans


def test_metrics_show_no_projects_attribute_keys(server: Running) -> None:
    """/metrics needs no key and is the server's, not a project's: the attributes no rule read
    are counted by the namespace of their key, from a fixed list of public conventions',
    never by the key. Before, the keys were label values, verbatim: a tenant could write text
    into keys and read it back there, read other projects' key names, and fill the 1,000
    label values so that the others' keys counted as (other)."""
    from prometheus_client.parser import text_string_to_metric_families

    from watchllm_ext.otel.mapped import OTHER_NAMESPACE, UNMAPPED_NAMESPACES

    tenant = server.keys.create("tenant-b", scope="ingest")
    words = ["please visit evil.example now", "tenant_b.merger_target.name", "Ünïcode\n{x}"]
    filler = [f"fill.k{i}" for i in range(1200)]  # past the 1,000 label values there were
    trace = os.urandom(16)
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(scope_spans=[ScopeSpans(spans=llm_spans_with(trace, words + filler))])
        ]
    )
    headers = {"Authorization": f"Bearer {tenant}", "Content-Type": "application/x-protobuf"}
    answer = server.client.post("/v1/traces", content=request.SerializeToString(), headers=headers)
    assert answer.status_code == 200, answer.content
    # Another project's keys of public conventions are still counted, by their namespace.
    mine = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                scope_spans=[
                    ScopeSpans(spans=llm_spans_with(os.urandom(16), ["langfuse.trace.name"]))
                ]
            )
        ]
    )
    headers = {**server.headers(), "Content-Type": "application/x-protobuf"}
    answer = server.client.post("/v1/traces", content=mine.SerializeToString(), headers=headers)
    assert answer.status_code == 200, answer.content
    text = httpx.get(f"{server.url}/metrics").text
    for word in ("evil", "merger", "Ünï", "fill.k", "tenant_b"):
        assert word not in text, word
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "watchllm_otel_unmapped_attributes"
    ]
    counts = {s.labels["namespace"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert set(counts) <= UNMAPPED_NAMESPACES | {OTHER_NAMESPACE}, counts
    assert counts == {OTHER_NAMESPACE: len(words) + len(filler), "langfuse": 1.0}


def test_quota_denial_is_429_with_retry_after_in_otlp_form(server_factory: Any) -> None:
    running: Running = server_factory(
        quota_backend="memory",
        quota_plans={"small": {"events_per_day": 6}},
        quota_default_plan="small",
    )
    headers = {**running.headers(), "Content-Type": "application/x-protobuf"}
    first = running.client.post("/v1/traces", content=_body(_collected()), headers=headers)
    assert first.status_code == 200, first.content  # 4 spans of 6
    denied = running.client.post("/v1/traces", content=_body(_collected()), headers=headers)
    assert denied.status_code == 429
    assert int(denied.headers["Retry-After"]) >= 1
    assert denied.headers["X-RateLimit-Limit"]
    status = status_pb2.Status.FromString(denied.content)
    assert status.code == 8 and status.message  # RESOURCE_EXHAUSTED, with the reason
    assert len(stored_spans(running)) == 4  # the refused request left nothing behind


def test_a_traces_run_lasts_as_long_as_its_root_span(server: Running) -> None:
    assert export(server) is SpanExportResult.SUCCESS
    root = next(s for s in stored_spans(server) if s["parent_span_id"] is None)
    answer = server.client.get(f"/v1/analytics/runs/{root['trace_id']}", headers=server.headers())
    assert answer.status_code == 200, answer.text
    run = answer.json()["run"]
    assert run["event_count"] == 3  # the figures of the events stay theirs
    # Events are stored to the millisecond, spans to the microsecond.
    start, end = (datetime.fromisoformat(run[k]).replace(tzinfo=None) for k in ("start", "end"))
    assert abs(start - datetime.fromisoformat(root["start_time"])) < timedelta(milliseconds=1)
    assert end == datetime.fromisoformat(root["end_time"])
    assert abs(run["duration_ms"] - root["duration_ms"]) <= 1
    # Both ends in one precision, the spans' (the start was an event's, to the millisecond).
    assert all(re.fullmatch(r"[-0-9]{10}T[:0-9]{8}\.\d{6}Z", run[k]) for k in ("start", "end"))


def test_the_receiver_is_a_plugin_that_can_be_turned_off(server_factory: Any) -> None:
    running: Running = server_factory(disable_plugins=["watchllm_ext.otel.receiver"])
    answer = running.client.post(
        "/v1/traces",
        content=_body(_collected()),
        headers={**running.headers(), "Content-Type": "application/x-protobuf"},
    )
    assert answer.status_code == 404
    assert "/v1/traces" not in running.client.get("/openapi.json").json()["paths"]


class Overlap:
    """A validate_event plugin (it runs inside a request's mapping, on a worker thread) that
    records how many requests' mappings ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = self.most = self.calls = 0

    @hookimpl
    def validate_event(self, event: Any, principal: Any) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.calls += 1
        time.sleep(0.001)  # the GIL is free meanwhile: without the limiter, others run
        with self.lock:
            self.active -= 1


def test_big_requests_are_mapped_one_at_a_time(server_factory: Any) -> None:
    """Concurrent big requests (decoded and mapped on worker threads) take turns: one
    request's CPU work at a time per event loop (ingest.cpu_limiter), and all are stored."""
    overlap = Overlap()
    running: Running = server_factory(plugin_objects=(overlap,))
    headers = {**running.headers(), "Content-Type": "application/x-protobuf"}
    bodies = [_body([s for _ in range(20) for s in _collected()]) for _ in range(4)]
    answers: list[int] = []

    def send(body: bytes) -> None:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            answers.append(client.post("/v1/traces", content=body, headers=headers).status_code)

    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * 4
    assert overlap.calls == 4 * 20 * 3  # every LLM span's event was validated
    assert overlap.most == 1
    running.flush()
    assert len(stored_spans(running)) == 4 * 20 * 4


class MappedOn:
    """A transform_spans plugin (it runs in a request's mapping) that records the thread each
    request's rows were mapped on."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    @hookimpl
    def transform_spans(self, spans: list[Any], principal: Any) -> None:
        self.threads.append(threading.current_thread())


def test_a_small_body_of_costly_entries_is_mapped_off_the_event_loop(server_factory: Any) -> None:
    """20 spans of 300 span events each, 61 KB (under 64 spans and 64 KiB: before, decoded and
    mapped on the event loop, 100-300 ms): on a worker thread. An SDK's single span stays on
    the event loop's thread."""
    from test_otel_bad_input import costly_span_events

    mapped = MappedOn()
    running: Running = server_factory(plugin_objects=(mapped,))
    headers = {**running.headers(), "Content-Type": "application/x-protobuf"}
    for body in (costly_span_events(os.urandom(16)), _body(_collected()[:1])):
        assert running.client.post("/v1/traces", content=body, headers=headers).status_code == 200
    loop_thread = running.thread.thread
    assert [thread is loop_thread for thread in mapped.threads] == [False, True]
