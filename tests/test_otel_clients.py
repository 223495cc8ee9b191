"""OpenTelemetry's own clients into WatchLLM: the SDK's OTLP/HTTP exporter to a real server on
loopback, the OpenAI instrumentations (OpenTelemetry's openai-v2 and OpenInference's) around
the real `openai` client pointed at the local fake provider, and the in-process exporter
(watchllm_ext.otel.exporter) in a FastAPI host that mounts WatchLLM. What arrived is read
back through the analytics API and the `spans` table."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Running, ServerThread, make_settings
from fake_llm import FakeLLM
from fastapi import FastAPI
from openai import OpenAI
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from stores import EVERY_STORE
from test_examples import ROOT, App, documented, shell

from watchllm_ext import create_app, hookimpl, lifespan
from watchllm_ext.keys import KeyStore
from watchllm_ext.otel import mapping
from watchllm_ext.otel.decode import MAX_ATTRIBUTES, MAX_VALUE_DEPTH, spans_of
from watchllm_ext.otel.exporter import WatchLLMSpanExporter, convert, to_span
from watchllm_ext.otel.mapping import map_span
from watchllm_ext.otel.rows import SpanRow
from watchllm_ext.quota import QuotaDecision

RESOURCE = Resource.create(
    {
        "service.name": "checkout",
        "service.version": "1.4.2",
        "deployment.environment.name": "staging",
    }
)


@pytest.fixture
def memory() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A real TracerProvider whose finished spans are kept in memory (the SDK's own exporter
    for that), to convert them as the in-process exporter does."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def finished(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_sdk_span_converts_with_every_part(
    memory: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = memory
    tracer = provider.get_tracer("my.instrumentation", "2.1.0")
    attributes: dict[str, Any] = {
        "text": "hé",
        "flag": True,
        "count": 3,
        "ratio": 0.25,
        "words": ["a", "b"],
        "numbers": [1, 2],
        "raw": b"\x00\x01\xff",
        "nested": {"k": [1, b"ab", {"z": "y"}]},
    }
    with tracer.start_as_current_span("root") as root:
        other = root.get_span_context()
    with (
        tracer.start_as_current_span("parent"),
        tracer.start_as_current_span(
            "child",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            links=[Link(other, {"why": "retry of"})],
        ) as child,
    ):
        child.add_event("step", {"n": 1}, timestamp=1_767_225_600_000_000_123)
        child.set_status(Status(StatusCode.ERROR, "it broke"))
    spans = finished(exporter)
    sdk_child, sdk_parent = spans["child"], spans["parent"]
    span = to_span(sdk_child)
    assert sdk_child.context is not None and sdk_parent.context is not None
    assert span.trace_id == f"{sdk_child.context.trace_id:032x}" and len(span.trace_id) == 32
    assert span.span_id == f"{sdk_child.context.span_id:016x}" and len(span.span_id) == 16
    assert span.parent_span_id == f"{sdk_parent.context.span_id:016x}"
    assert span.trace_id == span.trace_id.lower()
    assert span.name == "child" and span.kind == "client"
    assert (span.start_unix_nano, span.end_unix_nano) == (sdk_child.start_time, sdk_child.end_time)
    assert span.end_unix_nano >= span.start_unix_nano > 1_700_000_000 * 10**9
    assert (span.status_code, span.status_message) == ("error", "it broke")
    assert span.attributes == {
        "text": "hé",
        "flag": True,
        "count": 3,
        "ratio": 0.25,
        "words": ["a", "b"],
        "numbers": [1, 2],
        "raw": base64.b64encode(b"\x00\x01\xff").decode(),  # AnyValue bytes: base64 text
        "nested": {"k": [1, base64.b64encode(b"ab").decode(), {"z": "y"}]},
    }
    assert span.resource["service.name"] == "checkout"
    assert span.resource["deployment.environment.name"] == "staging"
    assert span.resource["telemetry.sdk.language"] == "python"
    assert (span.scope_name, span.scope_version) == ("my.instrumentation", "2.1.0")
    assert [(e.name, e.time_unix_nano, e.attributes) for e in span.events] == [
        ("step", 1_767_225_600_000_000_123, {"n": 1})
    ]
    assert span.links == [
        {
            "trace_id": f"{other.trace_id:032x}",
            "span_id": f"{other.span_id:016x}",
            "attributes": {"why": "retry of"},
        }
    ]
    # The root has no parent; an unset status stays unset; kinds by name.
    root_span = to_span(spans["root"])
    assert root_span.parent_span_id is None
    assert (root_span.kind, root_span.status_code, root_span.status_message) == (
        "internal",
        "unset",
        "",
    )
    # The converted span maps like a decoded one: a plain failed span is an error event.
    mapped = map_span(span)
    assert mapped.event is not None and mapped.event["event_type"] == "error"
    assert mapped.event["run_id"] == span.trace_id
    assert mapped.event["event_id"] == f"{span.trace_id}-{span.span_id}"
    assert mapped.row.attributes["raw"] == span.attributes["raw"]


def test_genai_span_from_the_sdk_maps_to_a_prompt_call(
    memory: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = memory
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai_v2")
    with tracer.start_as_current_span(
        "chat gpt-4o",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.provider.name": "openai",
            "gen_ai.usage.input_tokens": 12,
            "gen_ai.usage.output_tokens": 7,
            "gen_ai.response.finish_reasons": ("stop",),
        },
    ):
        pass
    mapped = map_span(to_span(finished(exporter)["chat gpt-4o"]))
    event = mapped.event
    assert event is not None and event["event_type"] == "prompt_call"
    assert (event["model"], event["provider"]) == ("gpt-4o", "openai")
    assert (event["tokens_input"], event["tokens_output"]) == (12, 7)
    assert (event["env"], event["release"]) == ("staging", "1.4.2")
    assert event["response_metadata"] == {"gen_ai.response.finish_reasons": ["stop"]}
    assert event["metadata"]["otel.scope"] == "opentelemetry.instrumentation.openai_v2"


# --- the same span either way in --------------------------------------------------------------


def test_conversion_equals_the_receivers_decoding_of_the_otlp_encoding(
    memory: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The in-process exporter and the OTLP exporter -> receiver give the same spans: the
    SDK's spans through the OTLP exporter's own encoder, then the receiver's decoder, equal
    their direct conversion, field by field; a span over the receiver's bounds is refused
    by both."""
    provider, exporter = memory
    tracer = provider.get_tracer("my.instrumentation", "2.1.0")
    with tracer.start_as_current_span("root") as root:
        other = root.get_span_context()
        with tracer.start_as_current_span(
            "child",
            kind=SpanKind.PRODUCER,
            attributes={"a": "x", "n": [1, 2], "raw": b"\x01", "deep": {"k": {"v": 1.5}}},
            links=[Link(other, {"why": "follows"})],
        ) as child:
            child.add_event("exception", {"exception.message": "boom"})
            child.set_status(Status(StatusCode.ERROR, "failed"))
    sdk_spans = exporter.get_finished_spans()
    decoded = spans_of(encode_spans(sdk_spans))
    assert decoded.rejected == 0
    direct, problems = convert(sdk_spans)
    assert problems == []
    by_id = {s.span_id: s for s in decoded.spans}
    assert [by_id[s.span_id] for s in direct] == direct

    # Over the bounds: more attributes than the receiver keeps (a provider whose limits
    # allow them), a value nested deeper than it reads.
    wide = TracerProvider(span_limits=SpanLimits(max_span_attributes=2_000))
    wide_memory = InMemorySpanExporter()
    wide.add_span_processor(SimpleSpanProcessor(wide_memory))
    deep: Any = "leaf"
    for _ in range(MAX_VALUE_DEPTH + 1):
        deep = [deep]
    with wide.get_tracer("t").start_as_current_span("wide") as span:
        span.set_attributes({f"k{i}": i for i in range(MAX_ATTRIBUTES + 1)})
    with wide.get_tracer("t").start_as_current_span("deep", attributes={"d": deep}):
        pass
    with wide.get_tracer("t").start_as_current_span("fine", attributes={"ok": 1}):
        pass
    bad = wide_memory.get_finished_spans()
    decoded = spans_of(encode_spans(bad))
    direct, problems = convert(bad)
    assert decoded.rejected == len(problems) == 2
    assert [s.name for s in direct] == [s.name for s in decoded.spans] == ["fine"]
    assert "over the limit of 1024" in problems[0] and "'wide'" in problems[0]
    assert "nested deeper than 16" in problems[1] and "'deep'" in problems[1]
    wide.shutdown()


# --- a trace the tests send, and what the analytics API must show of it --------------------------


def send_trace(provider: TracerProvider) -> str:
    """An agent's trace: a root span, a GenAI chat call, a tool call and a failed database
    call under it. Returns the trace id."""
    tracer = provider.get_tracer("my.agent", "0.3.0")
    with tracer.start_as_current_span("handle request") as root:
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT) as llm:
            llm.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.usage.input_tokens": 1000,
                    "gen_ai.usage.output_tokens": 100,
                    "user.id": "alice",
                }
            )
            time.sleep(0.01)  # a latency worth measuring
        with tracer.start_as_current_span(
            "execute_tool weather",
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": "weather",
                "gen_ai.tool.call.arguments": '{"city": "Paris"}',
            },
        ):
            pass
        with tracer.start_as_current_span("SELECT orders") as db:
            db.record_exception(TimeoutError("the database timed out"))
            db.set_status(Status(StatusCode.ERROR, "the database timed out"))
        return f"{root.get_span_context().trace_id:032x}"


def check_trace(client: httpx.Client, headers: dict[str, str], trace_id: str) -> dict[str, Any]:
    """The trace as the analytics API shows it: the tree as sent, the events with their
    figures. Returns the prompt call's event."""
    answer = client.get(f"/v1/analytics/runs/{trace_id}", headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["span_count"] == 4 and not body["truncated"]
    (root,) = body["tree"]
    assert (root["kind"], root["span"]["name"]) == ("span", "handle request")
    children = {c["span"]["name"]: c for c in root["children"]}
    assert sorted(children) == ["SELECT orders", "chat gpt-4o", "execute_tool weather"]
    assert all(c["parent_id"] == root["id"] and not c["children"] for c in children.values())
    kinds = {name: (c["kind"], c["event"]["event_type"]) for name, c in children.items()}
    assert kinds == {
        "chat gpt-4o": ("event", "prompt_call"),
        "execute_tool weather": ("event", "tool_call"),
        "SELECT orders": ("event", "error"),
    }
    call = children["chat gpt-4o"]["event"]
    assert (call["model"], call["provider"], call["user_id"]) == ("gpt-4o", "openai", "alice")
    assert (call["tokens_input"], call["tokens_output"]) == (1000, 100)
    # The script sleeps 10 ms inside the span; Node's setTimeout may fire up to a millisecond
    # early against the span's clock (9.84 ms was seen).
    assert call["latency_ms"] >= 9 and call["cost_usd"] > 0 and call["cost_source"] == "computed"
    assert children["execute_tool weather"]["event"]["tool_name"] == "weather"
    assert children["SELECT orders"]["event"]["error_message"] == "the database timed out"
    assert body["run"]["event_count"] == 3 and body["run"]["error_count"] == 1
    assert body["run"]["cost"] == call["cost_usd"]
    return call


def stored_spans(server: Running, trace_id: str) -> list[dict[str, Any]]:
    return server.query(
        "SELECT span_id, parent_span_id, name, kind, status_code, service_name,"
        " attributes, resource_attributes FROM spans FINAL"
        " WHERE project_id = 'acme' AND trace_id = {t:String} ORDER BY start_time, span_id",
        {"t": trace_id},
    )


# --- OpenTelemetry's OTLP/HTTP exporter to a real server -----------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "deflate"])
def test_otlp_exporter_configured_by_the_environment_only(
    server: Running, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """An unchanged app: OTLPSpanExporter() made with no arguments reads everything from the
    OTEL_EXPORTER_OTLP_* variables the docs give (the key in the headers variable, its
    space as %20), in every compression the SDK offers."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.url)  # the SDK adds /v1/traces
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization=Bearer%20{server.key}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=staging")
    exporter = OTLPSpanExporter()
    # The variable was read (what goes over the wire is the receiver's test's business).
    assert exporter._compression.value == compression
    provider = TracerProvider()  # its resource from OTEL_SERVICE_NAME / _RESOURCE_ATTRIBUTES
    results: list[SpanExportResult] = []
    provider.add_span_processor(SimpleSpanProcessor(Recording(exporter, results)))
    trace_id = send_trace(provider)
    provider.shutdown()
    assert results == [SpanExportResult.SUCCESS] * 4
    server.flush()
    check_trace(server.client, server.headers(), trace_id)
    rows = stored_spans(server, trace_id)
    assert len(rows) == 4 and {r["service_name"] for r in rows} == {"checkout"}
    assert rows[0]["resource_attributes"]["deployment.environment.name"] == "staging"
    assert rows[0]["resource_attributes"]["telemetry.sdk.name"] == "opentelemetry"


def test_otlp_exporter_with_basic_auth_and_batches(server: Running) -> None:
    """Langfuse-style clients: Basic auth with the key as password, at the Langfuse path; the
    BatchSpanProcessor's batches; a wrong key is a failed export, nothing stored."""
    basic = base64.b64encode(f"pk-lf-anything:{server.key}".encode()).decode()
    exporter = OTLPSpanExporter(
        endpoint=server.url + "/api/public/otel/v1/traces",
        headers={"Authorization": f"Basic {basic}"},
        compression=Compression.Gzip,
    )
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=3))
    trace_ids = [send_trace(provider) for _ in range(5)]
    assert provider.force_flush(30_000)
    provider.shutdown()
    server.flush()
    for trace_id in trace_ids:
        check_trace(server.client, server.headers(), trace_id)
    (count,) = server.query("SELECT count() AS n FROM spans FINAL WHERE project_id = 'acme'")
    assert count["n"] == 20

    wrong = OTLPSpanExporter(
        endpoint=server.url + "/v1/traces", headers={"Authorization": "Bearer wllm_nope"}
    )
    results: list[SpanExportResult] = []
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(Recording(wrong, results)))
    refused = send_trace(provider)
    provider.shutdown()
    assert results == [SpanExportResult.FAILURE] * 4
    server.flush()
    assert stored_spans(server, refused) == []


class Recording(SpanExporter):
    """An exporter that records what the exporter it wraps returned (SimpleSpanProcessor
    drops the result)."""

    def __init__(self, inner: SpanExporter, results: list[SpanExportResult]) -> None:
        self.inner = inner
        self.results = results

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.results.append(result)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


# --- the OpenAI instrumentations around the real openai client -----------------------------------


def instrumentor(name: str) -> Any:
    if name == "openai-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        return OpenAIInstrumentor()
    from openinference.instrumentation.openai import OpenAIInstrumentor as OpenInference

    return OpenInference()


@pytest.mark.parametrize("instrumentation", ["openai-v2", "openinference"])
def test_instrumented_openai_client(
    server: Running, monkeypatch: pytest.MonkeyPatch, instrumentation: str
) -> None:
    """OpenTelemetry's own OpenAI instrumentation and OpenInference's, around the real
    `openai` client talking to the local fake provider (a JSON answer and a streamed one),
    exported over OTLP/HTTP: two prompt calls under the app's own span, with the model,
    tokens, latency, a cost from the price table, and the messages."""
    # openai-v2 records message content only when asked (OpenInference always does).
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    provider = TracerProvider(resource=RESOURCE)
    exporter = OTLPSpanExporter(endpoint=server.url + "/v1/traces", headers=server.headers())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    instrument = instrumentor(instrumentation)
    instrument.instrument(tracer_provider=provider)
    question = [{"role": "user", "content": "why is the sky blue"}]  # 5 words: 5 tokens
    try:
        with FakeLLM() as llm:
            client = OpenAI(api_key="sk-fake", base_url=llm.openai_url)
            with provider.get_tracer("my.app").start_as_current_span("answer") as root:
                done = client.chat.completions.create(model="gpt-4o-mini", messages=question)
                stream = client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=question,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            trace_id = f"{root.get_span_context().trace_id:032x}"
    finally:
        instrument.uninstrument()
    assert done.choices[0].message.content == streamed == llm.reply
    assert provider.force_flush(30_000)
    provider.shutdown()
    server.flush()
    answer = server.client.get(f"/v1/analytics/runs/{trace_id}", headers=server.headers())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    (top,) = body["tree"]
    assert (top["kind"], top["span"]["name"]) == ("span", "answer")
    calls = top["children"]
    assert len(calls) == 2 and body["span_count"] == 3
    for call in calls:
        event = call["event"]
        assert call["kind"] == "event" and event["event_type"] == "prompt_call"
        assert (event["model"], event["provider"]) == ("gpt-4o-mini", "openai")
        assert (event["tokens_input"], event["tokens_output"]) == (5, 5)
        assert event["latency_ms"] > 0 and event["status"] == "success"
        assert event["cost_usd"] > 0 and event["cost_source"] == "computed"
        # Tree nodes are named by span id; event ids by trace and span id.
        assert call["parent_id"] == top["id"] == top["span"]["span_id"]
        assert event["parent_event_id"] == f"{trace_id}-{top['id']}"
        assert event["event_id"] == f"{trace_id}-{call['id']}" and event["run_id"] == trace_id
        full = server.client.get(
            f"/v1/analytics/event/{event['event_id']}", headers=server.headers()
        ).json()["event"]
        assert full["response"] == llm.reply
        assert "why is the sky blue" in str(full["prompt"])
    assert body["run"]["cost"] == pytest.approx(sum(c["event"]["cost_usd"] for c in calls))
    # The analytics' figures count them like any prompt call.
    stats = server.client.get("/v1/analytics/stats", headers=server.headers()).json()
    assert stats["total_events"] == 2, stats


# --- the in-process exporter in a FastAPI host that mounts WatchLLM ------------------------------


def test_in_process_exporter_in_a_fastapi_host(tmp_path: Path) -> None:
    """A FastAPI app mounts WatchLLM and adds WatchLLMSpanExporter to its own TracerProvider:
    the spans its handlers make reach WatchLLM's writer with no HTTP hop, from the
    BatchSpanProcessor's thread and from a SimpleSpanProcessor ending spans on the event
    loop itself (an async handler); the mounted API shows the trees."""
    settings = make_settings(tmp_path)
    keys = KeyStore(settings.keys_path)
    ingest_key = keys.create("shop", scope="ingest")
    read_key = keys.create("shop", scope="read")
    watchllm = create_app(settings)
    batched = TracerProvider(resource=RESOURCE)
    batch_exporter = WatchLLMSpanExporter(api_key=ingest_key)  # the app running here
    batched.add_span_processor(BatchSpanProcessor(batch_exporter, schedule_delay_millis=50))
    simple = TracerProvider(resource=RESOURCE)
    simple_exporter = WatchLLMSpanExporter(watchllm, api_key=ingest_key)
    simple.add_span_processor(SimpleSpanProcessor(simple_exporter))
    host = FastAPI(lifespan=lifespan(watchllm))
    host.mount("/watchllm", watchllm)

    @host.post("/ask")
    async def ask(simple_processor: bool = False) -> dict[str, str]:
        tracer = (simple if simple_processor else batched).get_tracer("shop")
        with tracer.start_as_current_span("POST /ask", kind=SpanKind.SERVER) as root:
            with tracer.start_as_current_span("chat gpt-4o-mini", kind=SpanKind.CLIENT) as llm:
                llm.set_attributes(
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.request.model": "gpt-4o-mini",
                        "gen_ai.usage.input_tokens": 40,
                        "gen_ai.usage.output_tokens": 8,
                    }
                )
                await asyncio.sleep(0.005)
            return {"trace_id": f"{root.get_span_context().trace_id:032x}"}

    with ServerThread(host) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        traces = [client.post("/ask").json()["trace_id"] for _ in range(3)]
        traces += [client.post("/ask?simple_processor=true").json()["trace_id"] for _ in range(3)]
        assert batched.force_flush(10_000) and simple.force_flush(10_000)
        wl = watchllm.state.watchllm
        deadline = time.monotonic() + 30
        while wl.writer.lag_events():
            assert time.monotonic() < deadline, wl.writer.stats()
            time.sleep(0.02)
        headers = {"Authorization": f"Bearer {read_key}"}
        for trace_id in traces:
            answer = client.get(f"/watchllm/v1/analytics/runs/{trace_id}", headers=headers)
            assert answer.status_code == 200, answer.text
            (top,) = answer.json()["tree"]
            assert (top["kind"], top["span"]["name"], top["span"]["kind"]) == (
                "span",
                "POST /ask",
                "server",
            )
            (call,) = top["children"]
            assert call["event"]["event_type"] == "prompt_call"
            assert call["event"]["model"] == "gpt-4o-mini" and call["event"]["cost_usd"] > 0
            assert call["event"]["latency_ms"] >= 4  # the 5 ms sleep, as the loop clocks it
    batched.shutdown()
    simple.shutdown()
    for exporter in (batch_exporter, simple_exporter):
        assert (exporter.exported_spans, exporter.rejected_spans, exporter.failed_spans) == (
            6,
            0,
            0,
        )


# --- the in-process exporter: what it answers ----------------------------------------------------


def one_llm_trace(provider: TracerProvider, n: int = 1) -> list[str]:
    traces = []
    for i in range(n):
        with provider.get_tracer("t").start_as_current_span(
            f"chat {i}",
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
        ) as span:
            traces.append(f"{span.get_span_context().trace_id:032x}")
    return traces


def recorded(exporter: SpanExporter) -> tuple[TracerProvider, list[SpanExportResult]]:
    results: list[SpanExportResult] = []
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(Recording(exporter, results)))
    return provider, results


def wide_batch(n: int) -> tuple[list[ReadableSpan], list[str]]:
    """A span over the receiver's attribute limit (a provider whose limits allow it), then
    `n` LLM spans of their own traces: one batch as a BatchSpanProcessor hands it over."""
    memory = InMemorySpanExporter()
    wide = TracerProvider(span_limits=SpanLimits(max_span_attributes=2_000))
    wide.add_span_processor(SimpleSpanProcessor(memory))
    with wide.get_tracer("t").start_as_current_span("wide") as span:
        span.set_attributes({f"k{i}": i for i in range(MAX_ATTRIBUTES + 1)})
    traces = one_llm_trace(wide, n)
    wide.shutdown()
    return list(memory.get_finished_spans()), traces


class DenyOnce:
    """A quota plugin that refuses the first ingest (429, Retry-After 1 s), then allows."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def check_quota(self, n_events: int) -> QuotaDecision | None:
        self.calls += 1
        if self.calls == 1:
            return QuotaDecision(False, retry_after_s=1.0, reason="slow down")
        return None


def test_in_process_exporter_answers(server_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    quota = DenyOnce()
    server: Running = server_factory(plugin_objects=(quota,))
    # A 429 (or 503) is waited out as its Retry-After says, within the export's time.
    exporter = WatchLLMSpanExporter(server.app, api_key=server.key)
    provider, results = recorded(exporter)
    started = time.monotonic()
    (trace_id,) = one_llm_trace(provider)
    assert results == [SpanExportResult.SUCCESS] and quota.calls == 2
    assert time.monotonic() - started >= 1.0
    assert (exporter.exported_spans, exporter.failed_spans) == (1, 0)
    server.flush()
    assert len(stored_spans(server, trace_id)) == 1

    # A span over the receiver's bounds is refused and counted; the others are stored.
    exporter = WatchLLMSpanExporter(server.app, api_key=server.key)
    batch, traces = wide_batch(3)
    assert exporter.export(batch) == SpanExportResult.SUCCESS  # what a batch processor calls
    assert (exporter.exported_spans, exporter.rejected_spans) == (3, 1)
    server.flush()
    assert all(len(stored_spans(server, t)) == 1 for t in traces)
    # Every span of a batch refused: a failed export, as the receiver's 400.
    assert exporter.export(batch[:1]) == SpanExportResult.FAILURE
    assert (exporter.exported_spans, exporter.rejected_spans) == (3, 2)

    # Keys: unknown (401) and without the ingest scope (403) are failed exports.
    read_only = server.keys.create("acme", scope="read")
    for key in ("wllm_nope", read_only):
        exporter = WatchLLMSpanExporter(server.app, api_key=key)
        provider, results = recorded(exporter)
        (refused,) = one_llm_trace(provider)
        assert results == [SpanExportResult.FAILURE] and exporter.failed_spans == 1
        server.flush()
        assert stored_spans(server, refused) == []

    # After shutdown an export fails at once.
    exporter = WatchLLMSpanExporter(server.app, api_key=server.key)
    exporter.shutdown()
    provider, results = recorded(exporter)
    one_llm_trace(provider)
    assert results == [SpanExportResult.FAILURE]

    # Arguments that cannot work are refused when the exporter is made, naming the argument.
    with pytest.raises(ValueError, match=r"^app: "):
        WatchLLMSpanExporter(FastAPI(), api_key=server.key)
    monkeypatch.delenv("WATCHLLM_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"^api_key: "):
        WatchLLMSpanExporter(server.app)
    monkeypatch.setenv("WATCHLLM_API_KEY", server.key)
    assert WatchLLMSpanExporter(server.app)._key == server.key


def test_in_process_exporter_without_a_running_app(tmp_path: Path) -> None:
    """No WatchLLM runs in this process (not started, or stopped): the export fails within
    its timeout, instead of blocking the processor's thread."""
    exporter = WatchLLMSpanExporter(api_key="wllm_x", timeout_s=0.5)
    provider, results = recorded(exporter)
    started = time.monotonic()
    one_llm_trace(provider)
    assert results == [SpanExportResult.FAILURE] and exporter.failed_spans == 1
    assert 0.4 <= time.monotonic() - started < 3  # tried until its time was nearly up
    # An app that was made but not started (its lifespan never ran) is the same.
    stopped = WatchLLMSpanExporter(create_app(make_settings(tmp_path)), api_key="x", timeout_s=0.2)
    provider, results = recorded(stopped)
    one_llm_trace(provider)
    assert results == [SpanExportResult.FAILURE]


# --- the examples, run as their docstrings say ---------------------------------------------------


@pytest.mark.parametrize("instrumentation", ["openai-v2", "openinference"])
def test_otel_openai_example_as_documented(server: Running, instrumentation: str) -> None:
    """examples/otel_openai.py: an unchanged OpenTelemetry app, pointed at WatchLLM by the
    documented variables alone (its OpenAI calls go to the local fake provider)."""
    lines = documented("otel_openai.py")
    assert [line.split("=")[0] for line in lines[:3]] == [
        "export OTEL_EXPORTER_OTLP_ENDPOINT",
        "export OTEL_EXPORTER_OTLP_HEADERS",
        "export OTEL_SERVICE_NAME",
    ]
    script = "\n".join(lines).replace("http://127.0.0.1:8787", server.url)
    script = script.replace("openai-v2", instrumentation)
    with FakeLLM() as llm:
        done = shell(
            "set -e\n" + script,
            KEY=server.key,
            OPENAI_API_KEY="sk-fake",
            OPENAI_BASE_URL=llm.openai_url,
        )
        assert done.returncode == 0, done.stderr
        out = done.stdout.splitlines()
        assert out[:2] == [llm.reply, llm.reply] and out[2].startswith("trace ")
        assert [path for path, _ in llm.requests] == ["/v1/chat/completions"] * 2
    assert "Traceback" not in done.stderr and "Failed to export" not in done.stderr
    trace_id = out[2].split()[1]
    server.flush()
    body = server.client.get(f"/v1/analytics/runs/{trace_id}", headers=server.headers()).json()
    (top,) = body["tree"]
    assert top["span"]["name"] == "answer" and top["span"]["service_name"] == "otel-openai-example"
    calls = [c["event"] for c in top["children"]]
    assert [(c["event_type"], c["model"]) for c in calls] == [("prompt_call", "gpt-4o-mini")] * 2
    assert all(c["tokens_output"] == 5 and c["cost_usd"] > 0 for c in calls)


def test_otel_in_process_example_as_documented(tmp_path: Path) -> None:
    install, start, ask, runs = documented("otel_in_process.py")
    assert install == "pip install -e '.[examples]'"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    examples = extras["optional-dependencies"]["examples"]
    assert any(d.startswith("opentelemetry-instrumentation-openai-v2") for d in examples)
    app = App(start, tmp_path / "app")
    try:
        assert app.key.startswith("wllm_")
        done = app.run(ask)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["answer"].startswith("Sunlight") and len(answer["trace_id"]) == 32
        # The batch processor's delay (0.5 s), then the writer's: the run is listed soon.
        deadline = time.monotonic() + 30
        while True:
            done = app.run(runs, KEY=app.key)
            listed = json.loads(done.stdout)
            if listed["runs"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [r["run_id"] for r in listed["runs"]] == [answer["trace_id"]], listed
        tree = httpx.get(
            f"{app.url}/watchllm/v1/analytics/runs/{answer['trace_id']}",
            headers={"Authorization": f"Bearer {app.key}"},
        ).json()
        (top,) = tree["tree"]
        assert (top["kind"], top["span"]["name"]) == ("span", "POST /ask")
        (call,) = top["children"]
        assert call["event"]["event_type"] == "prompt_call"
        assert call["event"]["model"] == "gpt-4o-mini" and call["event"]["tokens_input"] == 5
        # Stopped (Ctrl-C) within the batch processor's delay of a call: its spans are
        # handed over at shutdown, while WatchLLM still runs.
        last = json.loads(app.run(ask).stdout)["trace_id"]
    finally:
        output = app.stop()
    assert "Traceback" not in output, output
    store = create_app(make_settings(tmp_path, data_dir=tmp_path / "app")).state.watchllm
    opened = store.open_store()
    try:
        found = opened.query(
            "SELECT trace_id, count() AS n FROM spans FINAL GROUP BY trace_id ORDER BY trace_id"
        )
        events = opened.query("SELECT count() AS n FROM events FINAL")
    finally:
        opened.close()
    assert found == sorted(
        [{"trace_id": answer["trace_id"], "n": 2}, {"trace_id": last, "n": 2}],
        key=lambda r: r["trace_id"],
    )
    assert events == [{"n": 2}]


# --- docs/OPENTELEMETRY.md says what the code does -----------------------------------------------


def test_the_docs_mapping_table_is_mapping_pys() -> None:
    """Each row of the doc's field table names a rule of mapping.py and lists exactly its
    keys, in its order; every key rule of mapping.py has a row; the event-type table lists
    each operation set; the `spans` table lists every column of SpanRow."""
    doc = (ROOT / "docs" / "OPENTELEMETRY.md").read_text()
    rows = [line.split("|")[1:-1] for line in doc.splitlines() if line.startswith("| `")]
    ruled = {
        # the keys come before any "; else ..." that names a fallback outside the rule
        cells[-1].strip().strip("`"): re.findall(r"`([^`]+)`", cells[-2].split(";")[0])
        for cells in rows
        if len(cells) == 3 and re.fullmatch(r"`[A-Z_]+_KEYS`", cells[-1].strip())
    }
    key_rules = {
        name: value
        for name, value in vars(mapping).items()
        if name.endswith("_KEYS") and isinstance(value, tuple) and name != "CLASSIFY_KEYS"
    }
    documented_elsewhere = {"RESPONSE_METADATA_KEYS"}  # listed in the text after the table
    assert set(ruled) == set(key_rules) - documented_elsewhere
    for name, keys in ruled.items():
        listed = [k.removeprefix("resource ") for k in keys]
        assert tuple(listed) == key_rules[name], name
    for key in mapping.RESPONSE_METADATA_KEYS:
        if "cache" not in key and "reasoning" not in key:  # named together in the text
            assert f"`{key}`" in doc, key
    for name in ("PROMPT_OPERATIONS", "TOOL_OPERATIONS", "AGENT_OPERATIONS"):
        row = next(line for line in doc.splitlines() if f"`{name}`" in line).split("|")[1]
        assert set(re.findall(r"`([a-z_]+)`", row)) - {"gen_ai.operation.name"} == set(
            getattr(mapping, name)
        ), name
    row = next(line for line in doc.splitlines() if "`OPENINFERENCE_KINDS`" in line)
    assert set(re.findall(r"`([A-Z]+)`", row)) == set(mapping.OPENINFERENCE_KINDS)
    columns = doc.split("## What `spans` keeps")[1].split("\n## ")[0]
    for column in SpanRow.__struct_fields__:
        assert f"`{column}`" in columns, column


def test_in_process_exporter_splits_a_batch_over_the_apps_limit(server_factory: Any) -> None:
    """A batch larger than the app's max_batch_events goes in several calls (the receiver
    would answer 413 to it whole); a span refused here is counted once, in the first."""
    server: Running = server_factory(max_batch_events=10)
    exporter = WatchLLMSpanExporter(server.app, api_key=server.key)
    batch, traces = wide_batch(25)
    assert exporter.export(batch) == SpanExportResult.SUCCESS
    assert (exporter.exported_spans, exporter.rejected_spans, exporter.failed_spans) == (25, 1, 0)
    server.flush()
    (count,) = server.query("SELECT count() AS n FROM spans FINAL WHERE project_id = 'acme'")
    assert count["n"] == 25 and all(len(stored_spans(server, t)) == 1 for t in traces)


@EVERY_STORE
def test_in_process_and_otlp_exporters_store_the_same(
    server: Running, memory: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """The same SDK spans through the in-process exporter (project acme) and through the
    OTLP/HTTP exporter to the receiver (project other): the same `spans` rows and the same
    events, column by column; the run tree as check_trace expects it."""
    provider, memory_exporter = memory
    trace_id = send_trace(provider)
    spans = memory_exporter.get_finished_spans()
    other = server.keys.create("other", scope="admin")
    in_process = WatchLLMSpanExporter(server.app, api_key=server.key)
    assert in_process.export(spans) == SpanExportResult.SUCCESS
    otlp = OTLPSpanExporter(
        endpoint=server.url + "/v1/traces", headers={"Authorization": f"Bearer {other}"}
    )
    assert otlp.export(spans) == SpanExportResult.SUCCESS
    server.flush()
    check_trace(server.client, server.headers(), trace_id)
    check_trace(server.client, server.headers(other), trace_id)

    def rows(table: str, project: str) -> list[dict[str, Any]]:
        found = server.query(
            f"SELECT * EXCEPT (project_id, ingested_at) FROM {table} FINAL"
            " WHERE project_id = {p:String} ORDER BY ALL",
            {"p": project},
        )
        return [{k: v for k, v in r.items() if k not in ("received_at",)} for r in found]

    assert len(rows("spans", "acme")) == 4
    assert rows("spans", "acme") == rows("spans", "other")
    assert len(rows("events", "acme")) == 3
    assert rows("events", "acme") == rows("events", "other")


# --- OpenTelemetry's JavaScript SDK: OTLP JSON from a real client -------------------------------

NODE_CLIENT = ROOT / "tests" / "otel_node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    """tests/otel_node with its packages exactly as its lock file says (`npm ci`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for OpenTelemetry's JavaScript SDK")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return NODE_CLIENT


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_javascript_sdk_sends_otlp_json(
    server: Running, node_client: Path, compression: str
) -> None:
    """OpenTelemetry's JavaScript SDK with its OTLP/HTTP exporter (OTLP JSON: hex ids, enum
    integers), configured by the environment alone as a Node app would be: the same trace
    as from Python, the same tree."""
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": server.url,
        "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{server.key}",
        "OTEL_EXPORTER_OTLP_COMPRESSION": compression,
    }
    done = subprocess.run(
        ["node", "send.mjs"],
        cwd=node_client,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["results"] == "0,0,0,0", done.stdout + done.stderr  # ExportResultCode.SUCCESS
    server.flush()
    check_trace(server.client, server.headers(), lines["trace"])
    rows = stored_spans(server, lines["trace"])
    assert {r["service_name"] for r in rows} == {"checkout"}
    assert rows[0]["resource_attributes"]["deployment.environment.name"] == "staging"


def test_in_process_exporter_made_before_the_app_starts(
    tmp_path: Path, server_factory: Any, memory: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """An exporter made at import, before the host app runs WatchLLM (app=None: whichever
    starts in this process): an export waiting meanwhile goes through once it has started."""
    key = KeyStore(make_settings(tmp_path).keys_path).create("acme", scope="ingest")
    provider, memory_exporter = memory
    trace_id = send_trace(provider)
    exporter = WatchLLMSpanExporter(api_key=key, timeout_s=60)
    results: list[SpanExportResult] = []
    waiting = threading.Thread(
        target=lambda: results.append(exporter.export(memory_exporter.get_finished_spans()))
    )
    waiting.start()
    time.sleep(0.3)
    assert results == []  # still waiting: no app yet
    server: Running = server_factory()
    waiting.join(60)
    assert results == [SpanExportResult.SUCCESS] and exporter.exported_spans == 4
    server.flush()
    assert len(stored_spans(server, trace_id)) == 4
