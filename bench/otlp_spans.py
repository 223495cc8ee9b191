"""Realistic OTLP bodies for bench_otlp.py, made with the real OpenTelemetry SDK and encoded
with the real exporter's encoder (what `OTLPSpanExporter` POSTs), in batches of 512 spans as
`BatchSpanProcessor` hands them to the exporter (spans in the order they end, so a trace can
straddle two batches).

A trace is an LLM app's request: an HTTP server span, an agent (`invoke_agent`) running one to
three model calls (`chat`) with tool calls (`execute_tool`) between them, the tools' database
and HTTP client spans, and plain internal spans. Most model calls carry the current GenAI
semantic conventions; some the deprecated keys (`gen_ai.system`, `gen_ai.usage.prompt_tokens`)
of older instrumentations; a quarter of the traces are OpenInference (`openinference.span.kind`,
`llm.*`), as Phoenix's own instrumentations send them. About 3% of model calls fail (status
error with an exception event).
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sample_text import PROMPT_WORDS, REPLY_WORDS, text

BATCH_SPANS = 512  # BatchSpanProcessor's default max_export_batch_size


@dataclass
class Made:
    """What one generation made: the bodies and what is in them."""

    bodies: list[bytes]
    spans: int
    llm_spans: int  # model, tool and agent spans (the ones that can also become v1 events)
    error_spans: int


def make_bodies(n_spans: int, seed: int) -> Made:
    """At least `n_spans` spans (whole batches of 512, the last one cut to `n_spans`), each
    with fresh trace and span ids, encoded as ExportTraceServiceRequest bodies."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class SeededIds(RandomIdGenerator):
        """Random ids from the run's seed, so two runs send the same stream."""

        def __init__(self, rng: random.Random) -> None:
            self.rng = rng

        def generate_span_id(self) -> int:
            return self.rng.getrandbits(64) or 1

        def generate_trace_id(self) -> int:
            return self.rng.getrandbits(128) or 1

    rng = random.Random(seed)
    resource = Resource.create(
        {
            "service.name": "support-bot",
            "service.version": "2026.11.3",
            "deployment.environment.name": "production",
            "host.name": "web-7",
        }
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource, id_generator=SeededIds(random.Random(seed)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracers = {
        "http": provider.get_tracer("opentelemetry.instrumentation.starlette", "0.66b2"),
        "genai": provider.get_tracer("opentelemetry.instrumentation.openai_v2", "2.4b0"),
        "oi": provider.get_tracer("openinference.instrumentation.openai", "0.1.30"),
        "app": provider.get_tracer("support_bot", "2026.11.3"),
    }
    # Times in nanoseconds: traces start a few ms apart, from ten minutes ago (recent, so
    # that no retention rule of a system under test applies to them).
    clock = [time.time_ns() - 600 * 10**9]
    made = 0
    while made < n_spans:
        made += _trace(rng, tracers, clock)
        clock[0] += rng.randrange(1_000_000, 20_000_000)
    spans = list(exporter.get_finished_spans())[:n_spans]
    bodies = [
        encode_spans(spans[i : i + BATCH_SPANS]).SerializePartialToString()
        for i in range(0, len(spans), BATCH_SPANS)
    ]
    llm = sum(1 for s in spans if _is_llm(s.attributes or {}))
    errors = sum(1 for s in spans if not s.status.is_ok)
    provider.shutdown()
    return Made(bodies=bodies, spans=len(spans), llm_spans=llm, error_spans=errors)


def _is_llm(attrs: object) -> bool:
    get = getattr(attrs, "get", None)
    if get is None:
        return False
    return get("gen_ai.operation.name") is not None or get("openinference.span.kind") in (
        "LLM",
        "TOOL",
        "AGENT",
    )


def _trace(rng: random.Random, tracers: dict[str, Any], clock: list[int]) -> int:
    """One request's trace; returns how many spans it made."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    openinference = rng.random() < 0.25
    deprecated = rng.random() < 0.3
    t = clock[0]
    ms = 1_000_000

    def child(tracer: str, name: str, kind: SpanKind, start: int, parent: object) -> object:
        return tracers[tracer].start_span(
            name, context=trace.set_span_in_context(parent), kind=kind, start_time=start
        )

    root = tracers["http"].start_span("POST /api/support/reply", kind=SpanKind.SERVER, start_time=t)
    root.set_attributes(
        {
            "http.request.method": "POST",
            "http.route": "/api/support/reply",
            "url.path": "/api/support/reply",
            "url.scheme": "https",
            "server.address": "support.example.com",
            "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
            "client.address": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}",
            "enduser.id": f"user-{rng.randint(1, 5_000)}",
            "session.id": f"sess-{rng.randrange(10**6):06d}",
        }
    )
    t += rng.randrange(1, 5) * ms
    agent = child(
        "oi" if openinference else "app", "invoke_agent support_agent", SpanKind.INTERNAL, t, root
    )
    if openinference:
        agent.set_attributes(
            {
                "openinference.span.kind": "AGENT",
                "agent.name": "support_agent",
                "input.value": text(rng, PROMPT_WORDS, 120),
                "session.id": f"s{rng.randrange(10**6)}",
            }
        )
    else:
        agent.set_attributes(
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "support_agent",
                "gen_ai.agent.id": "asst_5j66UpCpwteGg4YSxUnt7lPY",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o",
            }
        )
    steps = rng.randint(1, 3)
    made = 0
    for step in range(steps):
        t += rng.randrange(1, 10) * ms
        chat_ms = rng.randrange(300, 4_000)
        chat = child("oi" if openinference else "genai", "chat gpt-4o", SpanKind.CLIENT, t, agent)
        tokens_in = rng.randint(150, 2_500)
        tokens_out = rng.randint(20, 700)
        prompt = text(rng, PROMPT_WORDS, 200)
        reply = text(rng, REPLY_WORDS, 200)
        last = step == steps - 1
        if openinference:
            chat.set_attributes(
                {
                    "openinference.span.kind": "LLM",
                    "llm.model_name": "gpt-4o-2024-08-06",
                    "llm.provider": "openai",
                    "llm.system": "openai",
                    "llm.invocation_parameters": json.dumps(
                        {"temperature": 0.2, "max_tokens": 800}
                    ),
                    "llm.token_count.prompt": tokens_in,
                    "llm.token_count.completion": tokens_out,
                    "llm.token_count.total": tokens_in + tokens_out,
                    "llm.input_messages.0.message.role": "system",
                    "llm.input_messages.0.message.content": "You are a support agent.",
                    "llm.input_messages.1.message.role": "user",
                    "llm.input_messages.1.message.content": prompt,
                    "llm.output_messages.0.message.role": "assistant",
                    "llm.output_messages.0.message.content": reply,
                    "input.mime_type": "application/json",
                    "output.mime_type": "application/json",
                }
            )
        else:
            usage_in, usage_out, provider_key = (
                ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens", "gen_ai.system")
                if deprecated
                else (
                    "gen_ai.usage.input_tokens",
                    "gen_ai.usage.output_tokens",
                    "gen_ai.provider.name",
                )
            )
            chat.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    provider_key: "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.response.model": "gpt-4o-2024-08-06",
                    "gen_ai.request.temperature": 0.2,
                    "gen_ai.request.max_tokens": 800,
                    "gen_ai.response.id": f"chatcmpl-{rng.getrandbits(96):024x}",
                    "gen_ai.response.finish_reasons": ("stop",) if last else ("tool_calls",),
                    usage_in: tokens_in,
                    usage_out: tokens_out,
                    "gen_ai.input.messages": json.dumps(
                        [
                            {
                                "role": "system",
                                "parts": [{"type": "text", "content": "You are a support agent."}],
                            },
                            {"role": "user", "parts": [{"type": "text", "content": prompt}]},
                        ]
                    ),
                    "gen_ai.output.messages": json.dumps(
                        [
                            {
                                "role": "assistant",
                                "parts": [{"type": "text", "content": reply}],
                                "finish_reason": "stop" if last else "tool_call",
                            }
                        ]
                    ),
                    "server.address": "api.openai.com",
                    "server.port": 443,
                }
            )
        if rng.random() < 0.03:
            chat.record_exception(
                TimeoutError("Request timed out."),
                attributes={"exception.escaped": "True"},
                timestamp=t + chat_ms * ms,
            )
            chat.set_attribute("error.type", "openai.APITimeoutError")
            chat.set_status(Status(StatusCode.ERROR, "Request timed out."))
        t += chat_ms * ms
        chat.end(end_time=t)
        made += 1
        if last:
            break
        # A tool call between two model calls, with the tool's own client spans.
        t += rng.randrange(1, 3) * ms
        tool = child(
            "oi" if openinference else "genai",
            "execute_tool lookup_order",
            SpanKind.INTERNAL,
            t,
            agent,
        )
        args = json.dumps({"order_id": f"A{rng.randrange(10**7):07d}"})
        if openinference:
            tool.set_attributes(
                {
                    "openinference.span.kind": "TOOL",
                    "tool.name": "lookup_order",
                    "tool.description": "Find an order by its number",
                    "tool.parameters": args,
                    "input.value": args,
                }
            )
        else:
            tool.set_attributes(
                {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": "lookup_order",
                    "gen_ai.tool.type": "function",
                    "gen_ai.tool.call.id": f"call_{rng.getrandbits(64):016x}",
                    "gen_ai.tool.call.arguments": args,
                    "gen_ai.tool.call.result": json.dumps({"status": "shipped", "days_late": 3}),
                }
            )
        t += rng.randrange(1, 3) * ms
        db = child("app", "SELECT orders", SpanKind.CLIENT, t, tool)
        db.set_attributes(
            {
                "db.system.name": "postgresql",
                "db.namespace": "shop",
                "db.operation.name": "SELECT",
                "db.collection.name": "orders",
                "db.query.text": "SELECT id, status, shipped_at FROM orders WHERE id = $1",
                "server.address": "db-1",
                "server.port": 5432,
            }
        )
        t += rng.randrange(1, 20) * ms
        db.end(end_time=t)
        http = child("app", "GET", SpanKind.CLIENT, t, tool)
        http.set_attributes(
            {
                "http.request.method": "GET",
                "url.full": "https://carrier.example.com/track/1Z999",
                "server.address": "carrier.example.com",
                "http.response.status_code": 200,
            }
        )
        t += rng.randrange(20, 200) * ms
        http.end(end_time=t)
        t += ms
        tool.end(end_time=t)
        made += 3
    t += ms
    agent.end(end_time=t)
    render = child("app", "render_reply", SpanKind.INTERNAL, t, root)
    render.set_attribute("template", "reply.html")
    t += rng.randrange(1, 5) * ms
    render.end(end_time=t)
    t += ms
    root.set_attribute("http.response.status_code", 200)
    root.end(end_time=t)
    return made + 3  # the root, the agent and render_reply


# --- the bodies file the client processes read --------------------------------------------------


def write_bodies(path: Path, bodies: list[bytes]) -> None:
    with path.open("wb") as f:
        for body in bodies:
            f.write(struct.pack("<I", len(body)))
            f.write(body)


def read_bodies(path: Path) -> list[bytes]:
    return list(_iter_bodies(path.read_bytes()))


def _iter_bodies(data: bytes) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        (size,) = struct.unpack_from("<I", data, at)
        at += 4
        yield data[at : at + size]
        at += size
