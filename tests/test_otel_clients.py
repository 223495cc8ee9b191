"""OpenTelemetry's own clients into WatchLLM: the SDK's OTLP/HTTP exporter to a real server on
loopback, the OpenAI instrumentations (OpenTelemetry's openai-v2 and OpenInference's) around
the real `openai` client pointed at the local fake provider, and the in-process exporter
(watchllm_ext.otel.exporter) in a FastAPI host that mounts WatchLLM. What arrived is read
back through the analytics API and the `spans` table."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from watchllm_ext.otel.exporter import to_span
from watchllm_ext.otel.mapping import map_span

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
    with tracer.start_as_current_span("parent"):
        with tracer.start_as_current_span(
            "child",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            links=[Link(other, {"why": "retry of"})],
        ) as child:
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
    assert mapped.event["run_id"] == span.trace_id and mapped.event["event_id"] == span.span_id
    assert mapped.row["attributes"]["raw"] == span.attributes["raw"]


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
