"""A stored span: one row of the `spans` table, as the spool carries it and sinks receive it.

The receiver maps each decoded span (mapping.Span) to a `SpanRow` for its key's project and
appends them to the spool as one record (flag SPANS in writer.py), beside the v1 events of
the spans that are LLM work. Sinks that implement `write_spans(rows)` get these rows; the
others never see them. The JSON of a row (msgspec) is what the store inserts into `spans`
(JSONEachRow, times RFC 3339 read with best_effort), so the spool's bytes go to ClickHouse as
they are.

A span is stored once per (project_id, trace_id, span_id): the exporter's re-send after a lost
answer carries the same span, and the table (ReplacingMergeTree ordered by start time, trace
and span id) collapses the copies; reads use FINAL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import msgspec


class SpanRow(msgspec.Struct, kw_only=True, gc=False):
    """The `spans` table's columns. Attribute values are their text (strings as they are,
    anything else as JSON), so every key sent is kept whatever its type."""

    project_id: str
    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    parent_span_id: str | None = None
    name: str
    kind: str  # unspecified, internal, server, client, producer, consumer
    start_time: datetime  # UTC, microseconds
    end_time: datetime
    duration_ms: float
    status_code: str  # unset, ok, error
    status_message: str = ""
    service_name: str = ""
    scope_name: str = ""  # the instrumentation scope (library) that made the span
    scope_version: str = ""
    event_type: str | None = None  # the v1 event this span also became, if any
    attributes: dict[str, str] = {}
    resource_attributes: dict[str, str] = {}
    span_events: str = "[]"  # JSON: [{"name", "time_unix_nano", "attributes"}]
    links: str = "[]"  # JSON: [{"trace_id", "span_id", "attributes"}]
    ingested_at: datetime  # the receipt time; the newest copy wins a collapse


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[SpanRow])


class EncodedRows(list[SpanRow]):
    """Rows with their JSON already made (on the worker thread that mapped them), so that the
    writer's encode_rows, called on the event loop, has nothing left to do."""

    __slots__ = ("payload",)
    payload: bytes


class RowsJson(Sequence[SpanRow]):
    """Rows as their JSON only: made in a worker process (worker.py), or the spool records of a
    writer's batch for a sink that reads only their bytes (`reads_span_payloads`: the store
    inserts them as they are). Decoded the first time something reads a row; `payloads` are
    JSON arrays, as a SpanBatch's."""

    __slots__ = ("_count", "_rows", "payloads")

    def __init__(self, payloads: list[bytes], count: int) -> None:
        self.payloads = payloads
        self._count = count
        self._rows: list[SpanRow] | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        return self.rows()[index]

    def __iter__(self) -> Iterator[SpanRow]:
        return iter(self.rows())

    def rows(self) -> list[SpanRow]:
        if self._rows is None:
            self._rows = [row for payload in self.payloads for row in decode_rows(payload)]
        return self._rows


class SpanBatch(list[SpanRow]):
    """The rows of spool records, as the writer hands them to a sink: `payloads` are the
    records' bytes when they are exactly these rows' JSON (the writer sets them, as for
    events: writer.EventBatch), so the store inserts them as they are instead of encoding
    every row again; None otherwise (then the rows are encoded)."""

    __slots__ = ("payloads",)
    payloads: list[bytes] | None

    def __init__(self, rows: Sequence[SpanRow] = ()) -> None:
        super().__init__(rows)
        self.payloads = None


def encoded(rows: list[SpanRow]) -> EncodedRows:
    out = EncodedRows(rows)
    out.payload = _encoder.encode(rows)
    return out


def encode_rows(rows: Sequence[SpanRow]) -> bytes:
    """A JSON array of rows (ClickHouse reads it as JSONEachRow)."""
    if type(rows) is EncodedRows:
        return rows.payload
    if type(rows) is RowsJson and len(rows.payloads) == 1:
        return rows.payloads[0]
    if type(rows) in (SpanBatch, RowsJson) and rows.payloads is not None:
        # Each payload is a JSON array ("[...]", no spaces: msgspec's): their insides joined.
        inner = [memoryview(p)[1:-1] for p in rows.payloads if len(p) > 2]
        return b"[" + b",".join(inner) + b"]"
    return _encoder.encode(rows)


def decode_rows(payload: bytes) -> list[SpanRow]:
    return _decoder.decode(payload)
