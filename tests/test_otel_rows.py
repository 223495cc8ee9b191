"""Span rows from the spool to the store: a `SpanBatch` carrying its spool records' bytes is
inserted as those bytes (no second encoding), and stores exactly the rows, once each, as the
rows themselves would; without the bytes (a memory log, a record read back per row) the rows
are encoded as before."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from stores import EVERY_STORE

from watchllm_ext.builtins.store_sink import StoreSink
from watchllm_ext.otel.mapping import Span, map_span
from watchllm_ext.otel.rows import SpanBatch, SpanRow, decode_rows, encode_rows, encoded
from watchllm_ext.store import Store
from watchllm_ext.store.rows import OWN_PIECE_BYTES, spool_pieces

RECEIVED = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
START_NS = 1_796_000_000_123_456_789


def rows(first: int, n: int) -> list[SpanRow]:
    """`n` rows as the receiver maps them: plain spans and a chat span, attributes of every
    kind of value (text, numbers, lists, a quote and a newline to escape)."""
    out = []
    for i in range(first, first + n):
        attrs: dict[str, object] = {"http.route": f'/items/"{i}"\n', "retry": i, "ok": True}
        if i % 2:
            attrs |= {"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 3}
        span = Span(
            trace_id=f"{i + 1:032x}",
            span_id=f"{i + 1:016x}",
            name=f"span {i}",
            start_unix_nano=START_NS + i * 1_000,
            end_unix_nano=START_NS + i * 1_000 + 2_500_000,
            attributes=attrs,
            resource={"service.name": "checkout", "tags": ["a", "b"]},
        )
        out.append(map_span(span, "acme", RECEIVED).row)
    return out


def test_the_joined_spool_bytes_are_the_rows_encoding() -> None:
    a, b = rows(0, 3), rows(3, 2)
    batch = SpanBatch([*a, *b])
    # As the spool holds them: one record a request (the receiver's EncodedRows), and an empty
    # record's "[]" among them.
    batch.payloads = [encoded(a).payload, encode_rows([]), encoded(b).payload]
    joined = encode_rows(batch)
    assert joined == msgspec.json.encode([*a, *b])
    assert decode_rows(joined) == [*a, *b]
    batch.payloads = None  # no bytes to reuse: encoded as before
    assert encode_rows(batch) == joined
    assert encode_rows(SpanBatch()) == b"[]"


@EVERY_STORE
def test_the_store_inserts_the_spool_bytes_and_keeps_each_span_once(store: Store) -> None:
    # The second request's record is big enough to go as a view of its own (spool_pieces).
    a, b = rows(0, 4), rows(4, 300)
    assert len(encoded(b).payload) >= OWN_PIECE_BYTES
    sink = StoreSink(store)
    batch = SpanBatch([*a, *b])
    batch.payloads = [encoded(a).payload, encoded(b).payload]
    assert spool_pieces(batch) is not None  # the insert takes the bytes as they are
    sink._write_spans(batch)
    # A re-send of the first request (the exporter's retry after a lost answer), as plain rows.
    sink._write_spans(a)
    got = store.query(
        "SELECT span_id, name, attributes, resource_attributes, start_time, duration_ms, "
        "event_type FROM spans FINAL WHERE project_id = 'acme' ORDER BY span_id"
    )
    assert [r["span_id"] for r in got] == [row.span_id for row in [*a, *b]]
    first = got[0]
    assert first["name"] == "span 0"
    assert first["attributes"] == {"http.route": '/items/"0"\n', "retry": "0", "ok": "true"}
    assert first["resource_attributes"] == {"service.name": "checkout", "tags": '["a","b"]'}
    assert first["duration_ms"] == 2.5
    assert [r["event_type"] for r in got[:2]] == [None, "prompt_call"]
