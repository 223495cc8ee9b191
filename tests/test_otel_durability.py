"""The promise for spans: a span answered 200 is stored exactly once, whatever happens after.

Real `watchllm serve` processes killed with SIGKILL while OpenTelemetry's own exporter
(`OTLPSpanExporter`, protobuf over HTTP, gzip) sends SDK-made traces; a last start replays
the spool; then every span of every batch the exporter reported a success for is in `spans`
(FINAL) once, and each LLM span's event in `events` once. And overload is pushed back: with
the store down the spool fills, the receiver answers 503 with Retry-After in the request's
encoding, and everything it answered 200 arrives once the store is back.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Running, free_port
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_durability import ServeProcess, wait_delivered

from watchllm_ext.keys import KeyStore
from watchllm_plugins.chdb_store import ChdbStore

Ids = tuple[str, str]  # (trace id, span id), lowercase hex


def make_batch(tracer_provider: TracerProvider, memory: InMemorySpanExporter) -> list[Any]:
    """One agent run as an instrumented app makes it: a server span, an agent span, model
    calls (GenAI attributes: each also becomes an event) and plain spans between them."""
    tracer = tracer_provider.get_tracer("kill9")
    llm = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    with (
        tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER),
        tracer.start_as_current_span("agent", attributes={"agent.loop": 1}),
    ):
        for i in range(6):
            tokens = {"gen_ai.usage.input_tokens": 10 + i, "gen_ai.usage.output_tokens": 5}
            with (
                tracer.start_as_current_span(
                    "chat gpt-4o", kind=SpanKind.CLIENT, attributes={**llm, **tokens}
                ),
                tracer.start_as_current_span("parse answer"),
            ):
                pass
    spans = list(memory.get_finished_spans())
    memory.clear()
    return spans


def ids_of(spans: list[ReadableSpan]) -> tuple[set[Ids], set[Ids]]:
    """All span ids of a batch, and those of its LLM spans (the ones that become events)."""
    every, llm = set(), set()
    for span in spans:
        ids = (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")
        every.add(ids)
        if (span.attributes or {}).get("gen_ai.operation.name") == "chat":
            llm.add(ids)
    return every, llm


class Exporters:
    """Threads exporting SDK spans with OTLPSpanExporter; keeps the spans of each batch the
    exporter reported SUCCESS for (an HTTP 200)."""

    def __init__(self, url: str, key: str, threads: int = 2) -> None:
        self.url, self.key = url, key
        self.acked: set[Ids] = set()
        self.acked_llm: set[Ids] = set()
        self.batches = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource({"service.name": "kill9"}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        exporter = OTLPSpanExporter(
            endpoint=f"{self.url}/v1/traces",
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=3,
            compression=Compression.Gzip,
        )
        try:
            while not self.stop.is_set():
                batch = [s for _ in range(8) for s in make_batch(provider, memory)]
                result = exporter.export(batch)
                every, llm = ids_of(batch)
                with self.lock:
                    if result is SpanExportResult.SUCCESS:
                        self.acked |= every
                        self.acked_llm |= llm
                        self.batches += 1
                    else:
                        self.failed += 1
                if result is not SpanExportResult.SUCCESS:
                    time.sleep(0.05)  # the server is down: these spans were not acknowledged
        finally:
            exporter.shutdown()
            provider.shutdown()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
            assert not thread.is_alive()


def stored(data: Path) -> tuple[dict[Ids, int], dict[Ids, int], int]:
    """Rows per span in spans FINAL, per event in events FINAL, and spans rows without FINAL
    (copies not yet collapsed: a re-delivery after the crash shows there, not in FINAL)."""
    store = ChdbStore(data / "chdb")
    try:
        spans = store.query(
            "SELECT trace_id, span_id, count() AS n FROM spans FINAL GROUP BY trace_id, span_id"
        )
        events = store.query(
            "SELECT run_id, event_id, count() AS n FROM events FINAL GROUP BY run_id, event_id"
        )
        raw = store.query("SELECT count() AS n FROM spans")[0]["n"]
    finally:
        store.close()
    return (
        {(r["trace_id"], r["span_id"]): int(r["n"]) for r in spans},
        # An LLM span's event id is "<trace id>-<span id>" (otel/ids.py): keyed like its span.
        {(r["run_id"], r["event_id"].removeprefix(f"{r['run_id']}-")): int(r["n"]) for r in events},
        int(raw),
    )


@pytest.mark.slow
def test_sigkill_while_the_otel_exporter_sends_loses_no_acknowledged_span(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    key = KeyStore(data / "keys.sqlite3").create("acme", scope="admin")
    rng = random.Random(4321)
    acked: set[Ids] = set()
    acked_llm: set[Ids] = set()
    batches = 0
    for _round in range(4):
        serve = ServeProcess(data, free_port())
        senders = Exporters(serve.url, key)
        time.sleep(rng.uniform(1.0, 3.0))  # kill at a random moment under load
        assert serve.kill(signal.SIGKILL) == -signal.SIGKILL
        senders.join()
        acked |= senders.acked
        acked_llm |= senders.acked_llm
        batches += senders.batches
    assert batches >= 8 and len(acked) > 500, (batches, len(acked))
    # A last start replays what the killed processes left in the spool.
    serve = ServeProcess(data, free_port())
    wait_delivered(serve.url, key)
    serve.kill(signal.SIGTERM)
    spans, events, raw = stored(data)
    missing = acked - spans.keys()
    assert not missing, f"{len(missing)} acknowledged spans were lost, e.g. {sorted(missing)[:3]}"
    assert all(n == 1 for n in spans.values())
    missing_events = acked_llm - events.keys()
    assert not missing_events, f"{len(missing_events)} events of acknowledged LLM spans lost"
    assert all(n == 1 for n in events.values())
    # Every event stored is an LLM span's (the span is there too: nothing half stored).
    assert events.keys() <= spans.keys()
    print(f"{batches} batches, {len(acked)} spans acknowledged, {len(spans)} stored once,")
    print(f"{raw - len(spans)} copies in `spans` waiting for a merge (FINAL collapses them)")


def test_a_full_spool_answers_503_with_retry_after_and_loses_nothing(
    server_factory: Any,
) -> None:
    import faults

    server: Running = server_factory(
        plugin_objects=(faults,), spool_max_bytes=256 * 1024, sink_retry_max_s=0.2
    )
    marker = server.settings.data_dir / "store-down"
    marker.touch()
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "full"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    # The SDK's own encoder makes the bodies; sent with httpx to see each answer as is.
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    acked: set[Ids] = set()
    answer = None
    for _ in range(400):
        batch = make_batch(provider, memory)
        answer = httpx.post(
            f"{server.url}/v1/traces",
            content=encode_spans(batch).SerializeToString(),
            headers={**server.headers(), "Content-Type": "application/x-protobuf"},
            timeout=30,
        )
        if answer.status_code != 200:
            break
        acked |= ids_of(batch)[0]
    assert answer is not None and answer.status_code == 503, answer
    assert int(answer.headers["Retry-After"]) >= 1
    assert answer.headers["content-type"] == "application/x-protobuf"
    status = status_pb2.Status()
    status.ParseFromString(answer.content)
    assert status.code == 14 and "spool" in status.message  # UNAVAILABLE
    assert acked, "some batches went in before the spool filled"
    assert server.client.get("/healthz").status_code == 200

    marker.unlink()  # the store comes back: everything answered 200 arrives, once
    server.flush()
    rows = server.query(
        "SELECT trace_id, span_id, count() AS n FROM spans FINAL GROUP BY trace_id, span_id"
    )
    assert {(r["trace_id"], r["span_id"]) for r in rows} == acked
    assert all(r["n"] == 1 for r in rows)
    provider.shutdown()
