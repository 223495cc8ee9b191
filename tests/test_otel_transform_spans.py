"""The `transform_spans` hook (docs/PLUGINS.md): the rows of OpenTelemetry spans go through
plugins before they are spooled, as events go through `transform_events`, whether the body
was mapped in the server or in a worker process (otel/worker.py runs no plugin).

The example plugin examples/redact_emails, loaded as a third party's would be, on a real
server on loopback with real chDB; real OTLP protobuf bodies from the OpenTelemetry SDK."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Running
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from test_otel_receiver import Collect
from test_otel_workers import wait_for_a_worker

from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
from watchllm_ext.otel import pool

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "redact_emails"
PROTOBUF = {"Content-Type": "application/x-protobuf"}
DOMAIN = "@example.com"


@pytest.fixture
def redacting(server_factory: Any) -> Iterator[Any]:
    """Start servers with the example plugin loaded from settings (a third party's module)."""
    sys.path.insert(0, str(EXAMPLE_DIR))
    yield lambda **overrides: server_factory(plugins=["watchllm_redact_emails"], **overrides)
    sys.path.remove(str(EXAMPLE_DIR))
    sys.modules.pop("watchllm_redact_emails", None)


def trace_with_addresses(padding: int = 0) -> tuple[bytes, str]:
    """One trace whose spans carry e-mail addresses everywhere a span can: an LLM chat span
    (its prompt, an attribute no rule reads), a plain span (its name, attributes, status
    message, a span event) and the resource. `padding`: bytes of an extra attribute, to make
    the body big enough for a worker process. The protobuf body and the trace id."""
    collect = Collect()
    resource = Resource.create({"service.name": "mailer", "team.owner": "frank@example.com"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(collect))
    tracer = provider.get_tracer("test.app", "0.1")
    with tracer.start_as_current_span("POST /send", kind=SpanKind.SERVER) as root:
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT) as chat:
            chat.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.prompt": "write to bob@example.com about the invoice",
                    "gen_ai.completion": "Dear bob@example.com, ...",
                    "app.reviewer": "carol@example.com",  # no rule reads it: otel.attributes
                }
            )
        with tracer.start_as_current_span("notify dave@example.com") as plain:
            plain.set_attribute("mail.to", "erin@example.com")
            # An address right after an escape in the row's JSON text (\n): redacted, and the
            # JSON still JSON.
            plain.add_event(
                "bounced", {"mail.from": "gina@example.com", "note": "to:\nhank@example.com"}
            )
            plain.set_status(Status(StatusCode.UNSET))
            if padding:
                plain.set_attribute("padding", "x" * padding)
        with tracer.start_as_current_span("retry") as failed:
            failed.set_status(Status(StatusCode.OK))
            failed.set_attribute("note", "no address here")
    provider.shutdown()
    return encode_spans(collect.spans).SerializeToString(), format(
        root.get_span_context().trace_id, "032x"
    )


def stored_text(server: Running, trace_id: str) -> tuple[str, str, str]:
    """The trace's span rows, its events and its run tree (the analytics API), as text."""
    server.flush()
    spans = server.query("SELECT * FROM spans FINAL WHERE trace_id = {t:String}", {"t": trace_id})
    events = server.query("SELECT * FROM events FINAL WHERE run_id = {t:String}", {"t": trace_id})
    assert len(spans) == 4 and len(events) == 1, (spans, events)
    run = server.client.get(f"/v1/analytics/runs/{trace_id}", headers=server.headers())
    assert run.status_code == 200, run.text
    return json.dumps(spans, default=str), json.dumps(events, default=str), run.text


@pytest.mark.parametrize("where", ["server", "worker"])
def test_redaction_reaches_span_rows_and_span_events(redacting: Any, where: str) -> None:
    server: Running = redacting(otel_worker_processes=1 if where == "worker" else 0)
    body, trace_id = trace_with_addresses(OFFLOAD_MIN_BYTES if where == "worker" else 0)
    if where == "worker":
        wait_for_a_worker()
    answered = pool.POOL.answered_total
    sent = server.client.post("/v1/traces", content=body, headers={**server.headers(), **PROTOBUF})
    assert sent.status_code == 200, sent.text
    assert pool.POOL.answered_total - answered == (1 if where == "worker" else 0)
    spans, events, run = stored_text(server, trace_id)
    for text in (spans, events, run):
        assert DOMAIN not in text
    # Redacted, not dropped: the span's name, its attributes, its span event, the resource,
    # and the event's prompt, response and metadata["otel.attributes"].
    assert "notify [email]" in spans and '"mail.to": "[email]"' in spans
    assert "team.owner" in spans and "bounced" in spans
    for row in json.loads(spans):
        for event in json.loads(row["span_events"]):
            if event["name"] == "bounced":
                assert event["attributes"] == {"mail.from": "[email]", "note": "to:\n[email]"}
    assert "write to [email] about" in events and "app.reviewer" in events
    # Rows: the resource's address in each of the 4, the chat span's 3 attributes, the plain
    # span's name, attribute and span event's 2; the event: its prompt, response and metadata.
    counted = server.client.get("/-/redactions", headers=server.headers()).json()
    assert counted["redacted_total"] == 4 + 3 + 4 + 3
