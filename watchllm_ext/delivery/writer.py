"""The writer: accepted events into a log, batches out of it to every sink.

HTTP handlers know only `await submit(events)`; sinks know only `write(events)`. Between
them sits a log of records, one per `submit`:

- `Spool` (the default): segment files on disk (spool.py). `submit` returns once the record
  is as durable as the fsync policy promises, so an answered request survives a crash.
- `MemoryLog`: the same interface in memory, for tests and for deployments where an
  upstream queue already gives durability; a crash loses what it holds.

Each sink has its own delivery task and cursor over the log: it reads records from its
cursor, batches them (by `flush_max_events` or `flush_interval_s`), writes, and commits the
new cursor. A failing sink is retried with exponential backoff and jitter, forever (the log
is the buffer); a batch it refuses for good goes to the dead-letter file with the reason. A
slow sink holds back neither the other sinks nor `submit`; the log is trimmed once every
cursor has passed a segment. When the log is full, `submit` raises WriterFull and the HTTP
layer answers 503 with Retry-After.

Recent records are kept in memory with their decoded events (up to `memory_max_events`),
so sinks that keep up never read the spool back nor decode it; a sink that falls behind
reads it back from disk. A batch is put together on a worker thread, not on the event loop
(for single events it is thousands of records a second). The server's events are msgspec
structs with `gc=False` (ingest/fast_validate.py): half a million of them in memory are not walked
by every full garbage collection.

A sink that needs the batch as JSON calls `batch_json(events)`: a JSON array of the events
(pydantic's `dump_json(exclude_none=True)` keys and values; ClickHouse reads it as
JSONEachRow). For the list the writer handed over, that is the spool records' own bytes
joined, with no encoding at all.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import anyio

from ..ingest.fast_validate import encode_event_lines, encode_events, read_stored, to_models
from ..otel.rows import RowsJson, SpanBatch, SpanRow, decode_rows, encode_rows
from .dead_letters import append_dead_letter, dead_letter
from .spool import HEADER_SIZE, Position, Record, SpoolFull

log = logging.getLogger("watchllm.writer")

# How soon a sink's batch goes once full (store_insert_max_events, flush_max_events) before
# flush_interval_s is over.
_BACKLOG_POLL_S = 0.05
# A batch of at least QUIET_MIN_EVENTS goes before flush_interval_s is over once nothing new
# has come for QUIET_S: the burst that brought it has ended (an exporter's or an SDK's batch,
# a load test), and waiting out the interval would only make it visible later. So does the
# rest of a burst, however small, after a batch of that size: what came during its insert.
# Fewer events after a small batch wait: a store insert has a fixed cost (tens of ms of
# CPU), and a trickle of single events would otherwise pay it for each.
QUIET_S = 0.1
QUIET_MIN_EVENTS = 4_096
# A sink that takes a batch in parts (Sink.open_stream) gets it fed from this many events
# waiting on: the insert's parsing then runs while the rest of the burst comes in, and what
# is left at its end is the rows' write (half a 50,000-event insert's time in chDB). Every
# _STREAM_POLL_S the events that came meanwhile are fed.
STREAM_MIN_EVENTS = QUIET_MIN_EVENTS
_STREAM_POLL_S = 0.05
# A stream ends at this much payload, as a batch read from the log does: ClickHouse writes
# an insert's rows before its end once they pass min_insert_block_size_bytes (256 MiB), and
# a stream's rows must land at its end, together.
STREAM_MAX_BYTES = 64 << 20
TARGETED = 1  # record flag: the record is for one sink only (a dead-letter replay)
SPANS = 2  # record flag: the record holds OpenTelemetry span rows (otel/rows.py), not events


@runtime_checkable
class Sink(Protocol):
    """Where batches go. `write` raises to have the batch retried; raise SinkError with
    permanent=True for a batch that can never be written (it goes to the dead letters).

    A sink that reads events by attribute only (the contract's field names) sets
    `reads_structs = True` and gets the server's event structs as they are; any other sink
    gets pydantic models, as sinks always did (converted on a worker thread, about 2 us an
    event: a sink that wants speed opts in).

    A sink that also stores or forwards OpenTelemetry spans defines
    `async def write_spans(self, rows: Sequence[SpanRow]) -> None` (same retry and dead-letter
    rules); a sink without it never sees span records. The spans that are LLM work reach
    `write` as events too. One that reads only the rows' JSON (the `payloads` of what it is
    given, as otel.rows.encode_rows does) sets `reads_span_payloads = True`: the writer then
    hands it the spool records' bytes and makes no row (a row read from them is decoded).

    A sink that reads events only as their JSON and their ids sets `reads_events_json =
    True`: a batch whose records a worker process made (ingest/worker.py; all of them kept in
    memory) then comes as an EventsJsonBatch, nothing decoded; any other batch as usual.

    A sink whose store can take a batch in parts defines `open_stream()`, returning None or
    an object with `feed(events)`, `finish()` and `cancel()` (called on worker threads, one
    at a time), and is asked while its `streaming` is true: when a burst is under way
    (STREAM_MIN_EVENTS waiting, fewer than a batch), the writer feeds it the events as they
    come, up to a batch, and then finishes it; the cursor moves only after `finish`, so what
    `cancel` (or a crash) leaves out is sent again, whole, the usual way (the store sink with
    store_insert_streamed: its insert is mostly parsed by the burst's end)."""

    name: str

    async def write(self, events: Sequence[Any]) -> None: ...


class EventBatch(list[Any]):
    """The events handed to a sink, with the JSON of the spool records they came from."""

    __slots__ = ("payloads",)
    payloads: list[bytes] | None


class EventsJson:
    """A record's events as a worker process made them (ingest/worker.py), none decoded: the
    spool record's JSON (`payload`), the events' project and ids, and the store's input
    bodies (`rows`: the events' input where it differs from payload; `parts`: the input of
    tool_calls and agent_steps, or None). The writer keeps it as it is; a sink that reads
    events gets them decoded from `payload`, one that reads JSON (`reads_events_json`: the
    store sink) gets an EventsJsonBatch."""

    __slots__ = ("event_ids", "parts", "payload", "project_id", "rows")

    def __init__(
        self,
        payload: bytes,
        project_id: str,
        event_ids: list[str],
        rows: bytes | None = None,
        parts: bytes | None = None,
    ) -> None:
        self.payload = payload
        self.project_id = project_id
        self.event_ids = event_ids
        self.rows = rows
        self.parts = parts

    def __len__(self) -> int:
        return len(self.event_ids)


class EventsJsonBatch:
    """The writer's batch for a sink that reads events as JSON (`reads_events_json`), when
    records a worker process made are in it (and memory holds every record): its `pieces`
    in order, each an EventsJson (none decoded) or an EventBatch of the other records' events
    with their spool bytes (consecutive records in one piece); in a sink's own selection
    (the store sink's, without copies), also a list of events without their bytes."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: list[EventsJson | EventBatch | list[Any]]) -> None:
        self.pieces = pieces

    def __len__(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def event_keys(self) -> list[tuple[str, str]]:
        """(project_id, event_id) of every event, in order."""
        keys: list[tuple[str, str]] = []
        for piece in self.pieces:
            keys += piece_keys(piece)
        return keys

    def payloads(self) -> list[bytes]:
        """The spool records' bytes, in order: each a JSON array of its events."""
        found: list[bytes] = []
        for piece in self.pieces:
            if type(piece) is EventsJson:
                found.append(piece.payload)
            elif type(piece) is EventBatch:
                assert piece.payloads is not None  # (the writer makes them so)
                found += piece.payloads
            else:
                found.append(encode_events(piece))
        return found

    def json(self) -> bytes:
        """The events as one JSON array (the records' payloads joined)."""
        return _joined_arrays(self.payloads())

    def events(self) -> list[Any]:
        """The events as structs, decoded where they are JSON (for the rare batch a sink
        must look into)."""
        found: list[Any] = []
        for piece in self.pieces:
            found += piece_events(piece)
        return found


def piece_keys(piece: EventsJson | Sequence[Any]) -> list[tuple[str, str]]:
    """(project_id, event_id) of each event of an EventsJsonBatch's piece, in order."""
    if type(piece) is EventsJson:
        project = piece.project_id
        return [(project, event_id) for event_id in piece.event_ids]
    return [(event.project_id, event.event_id) for event in piece]


def piece_events(piece: EventsJson | Sequence[Any]) -> Sequence[Any]:
    """The events of an EventsJsonBatch's piece, decoded where they are JSON."""
    return read_stored(piece.payload) if type(piece) is EventsJson else piece


_Batch = TypeVar("_Batch", EventBatch, SpanBatch)


def batch_json(events: Sequence[Any] | EventsJsonBatch) -> bytes:
    """The events as a JSON array, each as pydantic's `dump_json(exclude_none=True)` writes
    it (same keys and values; timestamps RFC 3339 with their zone). For the batch `write`
    was given, the spool's bytes; for any other list (a sink's own selection), encoded
    (msgspec, about 0.5 us an event)."""
    if type(events) is EventsJsonBatch:
        return events.json()
    if type(events) is EventBatch and events.payloads is not None:
        return _joined_arrays(events.payloads)
    return encode_events(events)


def _joined_arrays(payloads: Sequence[bytes]) -> bytes:
    """JSON arrays joined into one. Views and joins copy the bytes twice (slices, a join and
    `+` did four times)."""
    inner = [memoryview(p)[1:-1] for p in payloads if len(p) > 2]
    return b"".join((b"[", b",".join(inner), b"]"))


def batch_json_lines(events: Sequence[Any]) -> bytes:
    """The events as JSON, one object a line (each ending in a newline)."""
    return encode_event_lines(events)


class SinkError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class WriterFull(Exception):
    """The log cannot take these events now; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WriterTooLarge(Exception):
    """These events take more than the whole log holds (`size` > `limit` bytes): no wait makes
    room for them, unlike WriterFull; the client must send fewer at once."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, the log holds at most {limit}")
        self.size = size
        self.limit = limit


class WriterClosed(Exception):
    """The writer is not running (not started yet, or shutting down)."""


class Log(Protocol):
    """What the writer needs of a log; `Spool` and `MemoryLog` provide it."""

    next_seq: int
    dead_letter_dir: Path | None

    @property
    def end(self) -> Position: ...
    @property
    def bytes(self) -> int: ...
    def write(self, payload: bytes, count: int, flags: int = 0) -> Record: ...
    def write_many(self, items: Sequence[tuple[bytes, int, int]]) -> list[Record]: ...
    async def wait_durable(self, position: Position) -> None: ...
    async def wait_appended(self) -> None: ...
    def read(self, start: Position, max_events: int) -> list[Record]: ...
    def load_cursor(self, sink: str) -> tuple[Position, int]: ...
    def save_cursor(self, sink: str, position: Position, seq: int) -> None: ...
    def release(self, slowest: Position, unlink: bool = True) -> int: ...
    def unlink_released(self) -> None: ...
    def close(self) -> None: ...


class MemoryLog:
    """The log in memory: no durability, no decode. Positions are (0, record number)."""

    dead_letter_dir: Path | None = None
    needs_payload = False

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self.next_seq = 0
        self._records: list[Record] = []
        self._base = 0  # record number of self._records[0]
        self._held = 0
        self._cursors: dict[str, tuple[Position, int]] = {}
        self._appended = anyio.Event()

    @property
    def end(self) -> Position:
        return Position(0, self._base + len(self._records))

    @property
    def bytes(self) -> int:
        return 0

    def write(self, payload: bytes, count: int, flags: int = 0) -> Record:
        if self._held + count > self.max_events:
            raise SpoolFull(f"{self._held} events are held in memory, the cap is {self.max_events}")
        number = self._base + len(self._records)
        record = Record(
            Position(0, number),
            Position(0, number + 1),
            count,
            self.next_seq,
            int(time.time() * 1000),
            flags,
            payload,
        )
        self._records.append(record)
        self._held += count
        self.next_seq += count
        self._appended.set()
        self._appended = anyio.Event()
        return record

    def write_many(self, items: Sequence[tuple[bytes, int, int]]) -> list[Record]:
        """All the records or none (the cap is checked for all of them first)."""
        total = sum(count for _, count, _ in items)
        if self._held + total > self.max_events:
            raise SpoolFull(f"{self._held} events are held in memory, the cap is {self.max_events}")
        return [self.write(payload, count, flags) for payload, count, flags in items]

    async def wait_durable(self, position: Position) -> None:
        return None  # as durable as it gets

    async def wait_appended(self) -> None:
        await self._appended.wait()

    def read(self, start: Position, max_events: int) -> list[Record]:
        out: list[Record] = []
        events = 0
        for record in self._records[max(0, start.offset - self._base) :]:
            out.append(record)
            events += record.count
            if events >= max_events:
                break
        return out

    def load_cursor(self, sink: str) -> tuple[Position, int]:
        return self._cursors.get(sink, (Position(0, self._base), self.next_seq - self._held))

    def save_cursor(self, sink: str, position: Position, seq: int) -> None:
        self._cursors[sink] = (position, seq)

    def release(self, slowest: Position, unlink: bool = True) -> int:
        drop = max(0, slowest.offset - self._base)
        for record in self._records[:drop]:
            self._held -= record.count
        del self._records[:drop]
        self._base += drop
        return drop

    def unlink_released(self) -> None:
        return None  # no files

    def close(self) -> None:
        return None


@dataclass
class SinkState:
    sink: Sink
    cursor: Position
    cursor_seq: int
    delivered_events_total: int = 0
    delivered_batches_total: int = 0
    streamed_batches_total: int = 0  # of them, fed in parts (Sink.open_stream)
    retries_total: int = 0
    dead_letter_events_total: int = 0
    last_error: str | None = None
    failing_since: float | None = None
    # When the record at the cursor was appended, on the monotonic clock (worked out from its
    # wall-clock append time when the writer takes it): a step of the wall clock afterwards
    # does not show as lag (a 25 s step read as 28 s of lag with 2,000 events behind).
    oldest_pending_at: float | None = None
    pending_since: float | None = None
    taken_at: float | None = None  # when the batch being written was taken
    last_taken: int = 0  # events and span rows in the last batch taken
    written_at: float = 0.0  # when the last batch's write ended (monotonic)
    # Set while the last batch's items are freed on a worker thread (the next batch does not
    # wait for it; the one after does, so at most one batch is being freed at a time).
    freeing: anyio.Event | None = None
    # (cursor, number of the record after it): a cursor at the end of a segment is no record's
    # start, yet the record the writer wrote next (in the next segment) may be in memory.
    resume: tuple[Position, int] | None = None
    cursor_error: str | None = None  # why the last save of the cursor failed, until one works
    # The last streamed insert failed: the next batch goes whole (with retries, dead letters).
    stream_failed: bool = False


class Reading(NamedTuple):
    """Where a streamed insert's next read starts (a cursor, its resume and sequence number)
    and how many events and bytes of payload it may take still."""

    cursor: Position
    resume: tuple[Position, int] | None
    seq: int
    max_events: int
    max_bytes: int


class StreamPart(NamedTuple):
    """Writer._stream_part's answer: the records, their events, the number of the last, and
    whether the stream must end after them."""

    records: list[Record]
    events: EventBatch | EventsJsonBatch
    last_number: int | None
    stop: bool


class Writer:
    def __init__(
        self,
        sinks: Sequence[Sink],
        log_: Log,
        *,
        encode: Callable[[Sequence[Any]], bytes],
        decode: Callable[[bytes], list[Any]],
        flush_max_events: int = 10_000,
        flush_interval_s: float = 1.0,
        memory_max_events: int = 500_000,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 30.0,
        shutdown_grace_s: float = 30.0,
        sync_task: Callable[[], Any] | None = None,
    ) -> None:
        self.log = log_
        self.encode = encode
        self.decode = decode
        self.flush_max_events = flush_max_events
        self.flush_interval_s = flush_interval_s
        self.memory_max_events = memory_max_events
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.shutdown_grace_s = shutdown_grace_s
        self._sync_task = sync_task
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"two sinks share a name: {names}")
        self.sinks: list[SinkState] = []
        for sink in sinks:
            cursor, seq = log_.load_cursor(sink.name)
            self.sinks.append(SinkState(sink, cursor, seq))
        # Records in memory, by the number the writer gave them (in the order written): their
        # items, the record itself (with its payload: a sink that keeps up reads no disk), and
        # the number of each by start position (a sink's cursor). A record not kept (the
        # memory cap, a dead-letter replay) is a gap: the sink reads the spool there.
        self._cache: dict[int, Sequence[Any]] = {}  # a list, or rows as JSON (RowsJson)
        self._records: dict[int, Record] = {}
        self._numbers: dict[Position, int] = {}
        self._next_number = 0  # the number the next record written gets
        self._oldest = 0  # no record below this number is kept
        self._cached_events = 0
        self._running = False
        self._accepting = False
        self._progress = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self.accepted_events_total = 0
        self.full_total = 0
        self._last_write = 0.0  # monotonic time of the last write to the log (quiet rules)

    # --- the narrow interface ---------------------------------------------------------------

    async def submit(
        self, events: Sequence[Any] | EventsJson, spans: Sequence[SpanRow] = ()
    ) -> None:
        """Put events (and span rows: one more record) in the log; returns once they are as
        durable as the log promises.

        The events' record and the spans' go in one write (Log.write_many): after a crash
        both are read back or neither, so a request never half-lands. Raises WriterFull (no
        room now: nothing was written; or the fsync failed: written, not acknowledged, so
        possibly stored later, a retry stored once by its id) or WriterClosed (not running).
        """
        if not self._accepting:
            raise WriterClosed("the writer is not running")
        needs_payload = self.needs_payload
        batches: list[tuple[Sequence[Any] | EventsJson, int]] = []
        if events:
            batches.append((events, 0))
        if spans:
            batches.append((spans, SPANS))
        if not batches:
            return
        items: list[tuple[bytes, int, int]] = []
        for batch, flags in batches:
            payload = b""  # a memory log keeps the items, not their bytes
            if needs_payload:
                payload = encode_rows(batch) if flags & SPANS else self.encode(batch)
            items.append((payload, len(batch), flags))
        limit = getattr(self.log, "max_bytes", None)  # the spool's cap (a memory log has none)
        if limit is not None and needs_payload:
            size = sum(HEADER_SIZE + len(payload) for payload, _, _ in items)
            if size > limit:
                raise WriterTooLarge(size, limit)
        try:
            records = self.log.write_many(items)
        except SpoolFull as exc:
            self.full_total += 1
            raise WriterFull(str(exc), exc.retry_after_s) from None
        self._last_write = time.monotonic()
        for record, (batch, _) in zip(records, batches, strict=True):
            self._keep(record, batch)
        self.accepted_events_total += len(events)
        # As the fsync policy says (sync_to here fsynced with `interval` and `never` too).
        try:
            await self.log.wait_durable(records[-1].end)
        except OSError as exc:
            # A disk error on the fsync (ENOSPC can come only then, with delayed allocation):
            # not acknowledged, and answered as a write's disk error is (503, retry later).
            raise WriterFull(f"cannot make the spool durable: {exc.strerror or exc}", 5.0) from None

    def _keep(self, record: Record, items: Sequence[Any] | EventsJson) -> None:
        """Hold a new record and its items in memory for the sinks, within memory_max_events."""
        number = self._next_number
        if not self.sinks:
            self.log.release(record.end)  # nobody to deliver to: nothing to keep
        elif not self.needs_payload or (self._cached_events + len(items) <= self.memory_max_events):
            # Rows and events as JSON stay so, decoded only if a sink reads them (RowsJson,
            # EventsJson).
            kind = type(items)
            self._cache[number] = items if kind is RowsJson or kind is EventsJson else list(items)
            self._records[number] = record
            self._numbers[record.start] = number
            self._cached_events += len(items)
        # Counted last: a worker thread reading the memory trusts every number below this.
        self._next_number = number + 1

    async def submit_for(self, sink: str, payload: bytes, count: int, spans: bool = False) -> None:
        """Put a record for one sink only into the log (a dead-letter replay). Raises as
        `submit` does: WriterFull (no room, or the fsync failed), WriterClosed."""
        if not self._accepting:
            raise WriterClosed("the writer is not running")
        try:
            record = self.log.write(payload, count, TARGETED | SPANS if spans else TARGETED)
        except SpoolFull as exc:
            self.full_total += 1
            raise WriterFull(str(exc), exc.retry_after_s) from None
        self._last_write = time.monotonic()
        self._next_number += 1  # not kept: the sink it is for reads it from the log
        try:
            await self.log.wait_durable(record.end)
        except OSError as exc:  # as in submit: written, not acknowledged
            raise WriterFull(f"cannot make the spool durable: {exc.strerror or exc}", 5.0) from None

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every sink has everything written before this call. False on timeout."""
        target = self.log.next_seq  # sequence numbers survive segment rolls, positions do not
        with anyio.move_on_after(timeout_s) as scope:
            while self.sinks and min(s.cursor_seq for s in self.sinks) < target:
                await self._progress.wait()
        return not scope.cancelled_caught

    async def close(self) -> None:
        """Stop accepting, give sinks `shutdown_grace_s` to catch up; the rest stays in the
        log (on disk, for the next start, with a spool)."""
        self._accepting = False
        if not self._running:
            return
        if not await self.flush(self.shutdown_grace_s):
            log.warning(
                "shutdown grace of %.1fs ran out; %d events stay in the log for the next start",
                self.shutdown_grace_s,
                self.lag_events(),
            )
        self._running = False
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    async def __aenter__(self) -> Writer:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._running = True
        self._accepting = True
        if self._sync_task is not None:
            self._task_group.start_soon(self._sync_task)
        for state in self.sinks:
            self._task_group.start_soon(self._deliver, state)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        try:
            await self.close()
        finally:
            assert self._task_group is not None
            self._task_group.cancel_scope.cancel()
            result = await self._task_group.__aexit__(*exc_info)
            self._task_group = None
            self.log.close()
        return result

    # --- state ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def lag_events(self) -> int:
        if not self.sinks:
            return 0
        return self.log.next_seq - min(s.cursor_seq for s in self.sinks)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "running": self._running,
            "accepting": self._accepting,
            "log_bytes": self.log.bytes,
            "log_sync_error": getattr(self.log, "sync_error", None),
            "events_in_memory": self._cached_events,
            "accepted_events_total": self.accepted_events_total,
            "full_total": self.full_total,
            "sinks": {
                s.sink.name: {
                    "lag_events": self.log.next_seq - s.cursor_seq,
                    "lag_seconds": (
                        round(max(0.0, now - s.oldest_pending_at), 3)
                        if s.oldest_pending_at is not None and s.cursor < self.log.end
                        else 0.0
                    ),
                    "delivered_events_total": s.delivered_events_total,
                    "streamed_batches_total": s.streamed_batches_total,
                    "retries_total": s.retries_total,
                    "dead_letter_events_total": s.dead_letter_events_total,
                    "last_error": s.last_error,
                    "cursor_error": s.cursor_error,
                    "failing_for_s": (
                        round(time.monotonic() - s.failing_since, 3) if s.failing_since else 0.0
                    ),
                }
                for s in self.sinks
            },
        }

    # --- delivery ---------------------------------------------------------------------------

    async def _deliver(self, state: SinkState) -> None:
        """One sink's delivery, batch after batch, for the writer's life. A step that fails
        in a way nobody planned for (a bug, a disk that fails under the cursor) is logged and
        tried again after a pause: it must not stop the other sinks and every later request
        with them (the app's lifespan ended with it, and the server then answered every
        ingest request 503 until restarted by hand)."""
        pause = self.retry_initial_s
        while True:
            try:
                await self._deliver_step(state)
            except Exception as exc:
                state.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception(
                    "delivery to sink %s failed; trying again in %.1f s", state.sink.name, pause
                )
                await anyio.sleep(pause)
                pause = min(pause * 2, self.retry_max_s)
            else:
                pause = self.retry_initial_s

    async def _deliver_step(self, state: SinkState) -> None:
        """Wait for a batch for the sink, or deliver one and let go of what every sink has
        passed."""
        # Count what waits past the cursor without reading it: reading on every append
        # would make a batch cost the square of its records.
        backlog = self.log.next_seq - state.cursor_seq
        if backlog <= 0:
            state.pending_since = state.taken_at = None
            state.oldest_pending_at = None
            await self.log.wait_appended()
            return
        if backlog < self._batch_max(state) and self._accepting:
            if (
                backlog >= STREAM_MIN_EVENTS
                and not state.stream_failed
                and getattr(state.sink, "streaming", True)
                and hasattr(state.sink, "open_stream")
                and await self._deliver_streamed(state)
            ):
                return
            now = time.monotonic()
            if state.pending_since is None:
                # What came while the last batch was written has waited since it was
                # taken, at most: flush_interval_s counts from then, not from now.
                state.pending_since = state.taken_at or now
                state.oldest_pending_at = now
            wait = state.pending_since + self.flush_interval_s - now
            # The rest of a burst: what came while a big batch was written, and nothing
            # since (a stream that goes on, or a trickle after an idle sink, waits).
            rest = state.last_taken >= QUIET_MIN_EVENTS and self._last_write <= state.written_at
            if wait > 0 and (backlog >= QUIET_MIN_EVENTS or rest):
                # Quiet since the last write for QUIET_S: go now (or look again then).
                wait = min(wait, max(0.0, self._last_write + QUIET_S - now))
            if wait > 0:
                # A look at the backlog every _BACKLOG_POLL_S, not a wake-up per append:
                # with single events that was a task switch per request, for a batch
                # that fills only when flush_interval_s is over anyway.
                await anyio.sleep(min(wait, _BACKLOG_POLL_S))
                return
        state.pending_since = None
        state.taken_at = time.monotonic()
        # The batch is put together on a worker thread: for single events it is thousands
        # of records (dict look-ups and list extends) that stalled the loop for ms.
        batch = await anyio.to_thread.run_sync(self._next_batch, state)
        if batch is None:
            await self.log.wait_appended()
            return
        records, events, rows, last_number = batch
        state.last_taken = len(events) + len(rows)
        _waiting_since(state, records[0])
        events = await _for_sink(state, events)
        if events:
            await self._write_with_retry(state, events)
        # Spans after the events: once a span's row is stored, so is the event it became.
        if rows:
            await self._write_with_retry(state, rows, spans=True)
        state.stream_failed = False
        # The batch's items are let go of by _passed alone (see there): no reference here.
        batches, last = [events, rows], records[-1]
        del events, rows, batch, records
        await self._passed(state, last, last_number, batches)

    async def _deliver_streamed(self, state: SinkState) -> bool:
        """Feed the sink's stream (Sink.open_stream) the events from its cursor on as they
        come, up to its batch size (or STREAM_MAX_BYTES of payload), until flush_interval_s
        is over, nothing new came for QUIET_S or a record a stream does not take is next;
        then finish it and move the cursor. False (nothing changed) when no stream is to be
        had: the usual batch goes. A stream that fails is cancelled and the next batch goes
        whole, with the usual retries and dead letters (stored once, by id, whatever had
        landed)."""
        now = time.monotonic()
        deadline = (state.pending_since or state.taken_at or now) + self.flush_interval_s
        number = self._number_at(state.cursor, state.resume)
        record = self._records.get(number) if number is not None else None
        if now >= deadline or record is None or record.flags & (SPANS | TARGETED):
            return False  # late already, or not for a stream (a look on the loop: no hop)
        at = Reading(
            state.cursor, state.resume, state.cursor_seq, self._batch_max(state), STREAM_MAX_BYTES
        )
        stream: Any = None
        last: tuple[Record, int | None] | None = None  # the last record fed, its number
        items: list[Sequence[Any]] = []  # what was fed, freed by _passed
        fed = 0
        try:
            stream = await anyio.to_thread.run_sync(state.sink.open_stream)  # type: ignore[attr-defined]
            if stream is None:
                return False
            while True:
                part = await anyio.to_thread.run_sync(self._stream_part, state, at)
                if part is None:  # nothing new yet
                    now = time.monotonic()
                    if last is not None and now - self._last_write >= QUIET_S:
                        break  # the burst is over
                    if last is None or now >= deadline:
                        break
                    await anyio.sleep(min(_STREAM_POLL_S, deadline - now))
                    continue
                if part.records:
                    if last is None:  # the first: the batch is taken now
                        state.pending_since = None
                        state.taken_at = time.monotonic()
                        _waiting_since(state, part.records[0])
                    events = await _for_sink(state, part.events)
                    if events:
                        await anyio.to_thread.run_sync(stream.feed, events)
                    items.append(events)
                    fed += len(events)
                    del events
                    end = part.records[-1]
                    last = (end, part.last_number)
                    resume = (end.end, last[1] + 1) if last[1] is not None else None
                    at = Reading(
                        end.end,
                        resume,
                        end.seq + end.count,
                        at.max_events - (end.seq + end.count - at.seq),
                        at.max_bytes - sum(len(r.payload) for r in part.records),
                    )
                stop = part.stop
                del part
                if stop or at.max_events <= 0 or at.max_bytes <= 0 or not self._accepting:
                    break
                if time.monotonic() >= deadline:
                    break
            if last is None:
                await anyio.to_thread.run_sync(stream.cancel)
                return False
            await anyio.to_thread.run_sync(stream.finish)
        except BaseException as exc:
            if stream is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_cancel_quietly, stream)
            if not isinstance(exc, Exception):
                raise  # cancelled (shutdown): the cursor stays, the events wait in the log
            state.stream_failed = True
            state.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning(
                "a streamed insert into sink %s failed; its events go again as one batch: %s",
                state.sink.name,
                state.last_error,
            )
            return True
        state.last_taken = fed
        state.failing_since = None
        state.delivered_events_total += fed
        state.delivered_batches_total += 1
        state.streamed_batches_total += 1
        await self._passed(state, last[0], last[1], items)
        return True

    async def _passed(
        self,
        state: SinkState,
        last: Record,
        last_number: int | None,
        batches: list[Sequence[Any]],
    ) -> None:
        """The sink has everything up to `last` (numbered `last_number`): its cursor moves
        past it, and the records every sink has passed are let go, with `batches` (the items
        it was given, which the caller no longer refers to)."""
        state.written_at = time.monotonic()
        state.cursor, state.cursor_seq = last.end, last.seq + last.count
        state.resume = (last.end, last_number + 1) if last_number is not None else None
        slowest = min(s.cursor for s in self.sinks)
        # The cursor is saved before anything is let go; then the records every sink has
        # passed leave the memory, off the loop too.
        try:
            freed = await anyio.to_thread.run_sync(self._commit, state, slowest)
        except OSError as exc:
            # The cursor cannot be saved (the spool's disk is full): nothing is let go until
            # it can be, so memory and the spool fill and ingestion pushes back (503); what
            # was delivered since the last save is delivered again after a crash, and taken
            # once (by event id).
            if state.cursor_error is None:
                log.error(
                    "cannot save sink %s's cursor (%s); holding on to what it passed until it can",
                    state.sink.name,
                    exc,
                )
            state.cursor_error = str(exc)
        else:
            if state.cursor_error is not None:
                log.warning("sink %s's cursor is saved again", state.sink.name)
                state.cursor_error = None
            self._cached_events -= freed
            if self.log.release(slowest, unlink=False):
                await anyio.to_thread.run_sync(self.log.unlink_released)
        self._progress.set()
        self._progress = anyio.Event()
        # Once the cache has let go of them, the batch holds the last references to its
        # items: freeing 50,000 events takes ~100 ms of the GIL, done on a worker thread
        # in slices that requests interleave with, instead of stopping the event loop.
        # The writer's references go first, so that the worker's can be the last.
        # The next batch does not wait for it (a 15,000-event batch takes 50-150 ms to
        # free), the one after does: at most one batch is being freed at a time. (So a
        # sink may hold one batch more than memory_max_events counts, for that while.)
        if state.freeing is not None:
            await state.freeing.wait()
        state.freeing = anyio.Event()
        self._free_soon(batches, state.freeing)

    def _free_soon(self, batches: list[Sequence[Any]], done: anyio.Event) -> None:
        async def free() -> None:
            try:
                await anyio.to_thread.run_sync(_free, batches)
            finally:
                done.set()

        assert self._task_group is not None  # _deliver runs in it
        self._task_group.start_soon(free)

    @property
    def needs_payload(self) -> bool:
        """Does the log keep the records' bytes (the spool), so that `submit` must be given
        or make their JSON? (An in-memory log keeps the items only.)"""
        return getattr(self.log, "needs_payload", True)

    def _next_batch(
        self, state: SinkState
    ) -> tuple[list[Record], EventBatch | EventsJsonBatch, Sequence[SpanRow], int | None] | None:
        """(On a worker thread.) The records from the sink's cursor on, up to its batch size,
        with their events and span rows for it, and the writer's number of the last record
        (None if unknown); None when there is nothing to read."""
        max_events = self._batch_max(state)
        first = self._number_at(state.cursor, state.resume)
        kept = self._read_kept(first, max_events) if first is not None else None
        if kept:  # (empty: a record being kept right now; the log has it)
            records, last_number = kept, first + len(kept) - 1
        else:
            records = self.log.read(state.cursor, max_events)
            last_number = self._numbers.get(records[-1].start) if records else None
        if not records:
            return None
        span_records = [r for r in records if r.flags & SPANS]
        records_of_events = [r for r in records if not r.flags & SPANS] if span_records else records
        events = self._events_of(records_of_events, state, bool(kept))
        rows: Sequence[SpanRow] = []
        if span_records and hasattr(state.sink, "write_spans"):
            if (
                kept
                and getattr(state.sink, "reads_span_payloads", False)
                and all(r.payload and not r.flags & TARGETED for r in span_records)
            ):
                # Records this process wrote (memory holds them), whose bytes are all this sink
                # reads (the store inserts them): no row is made. Records read back from the
                # log (after a restart) are decoded, so that a row that does not read as a
                # SpanRow goes to the dead letters alone, not with its whole insert.
                rows = RowsJson(
                    [r.payload for r in span_records], sum(r.count for r in span_records)
                )
            else:
                # Rows, with the records' bytes as their `payloads` when they are exactly
                # these rows' JSON (a sink that inserts JSON sends those).
                rows = self._items_of(span_records, state.sink.name, SpanBatch())
        return records, events, rows, last_number

    def _stream_part(self, state: SinkState, at: Reading) -> StreamPart | None:
        """(On a worker thread.) What a streamed insert takes next from `at` on: the records
        memory holds, up to at.max_events events or at.max_bytes of payload, up to the first
        one a stream does not take (span rows, a dead-letter replay, one memory let go of),
        with their events; `stop` when such a record comes next. None when nothing more is
        there yet."""
        first = self._number_at(at.cursor, at.resume)
        if first is None or first >= self._next_number:
            if self.log.next_seq > at.seq:
                return StreamPart([], EventBatch(), None, True)  # not in memory: a gap
            return None
        kept = self._read_kept(first, at.max_events, at.max_bytes)
        if kept is None:
            return StreamPart([], EventBatch(), None, True)  # a gap: the log has it
        if not kept:
            return None  # a record being kept right now
        cut = next((i for i, r in enumerate(kept) if r.flags & (SPANS | TARGETED)), None)
        records = kept if cut is None else kept[:cut]
        if not records:
            return StreamPart([], EventBatch(), None, True)
        events = self._events_of(records, state, kept=True)
        return StreamPart(records, events, first + len(records) - 1, cut is not None)

    def _number_at(self, cursor: Position, resume: tuple[Position, int] | None) -> int | None:
        """The writer's number of the record at `cursor`, if memory knows it."""
        number = self._numbers.get(cursor)
        if number is None and resume is not None and resume[0] == cursor:
            number = resume[1]  # the cursor is at the end of a segment
        return number

    def _events_of(
        self, records: list[Record], state: SinkState, kept: bool
    ) -> EventBatch | EventsJsonBatch:
        """The events of `records` (of events) for the sink: as an EventsJsonBatch when it
        reads them so and memory (`kept`) holds them, as they are kept otherwise."""
        events: EventBatch | EventsJsonBatch | None = None
        if kept and records and getattr(state.sink, "reads_events_json", False):
            events = self._kept_json(records)
        if events is None:
            events = self._items_of(records, state.sink.name, EventBatch())
        return events

    def _kept_json(self, records: list[Record]) -> EventsJsonBatch | None:
        """The records as an EventsJsonBatch, when one at least is a worker's EventsJson and
        memory holds them all with their bytes; None otherwise (their events are read as
        usual)."""
        pieces: list[EventsJson | EventBatch] = []
        made_by_worker = False
        for record in records:
            number = self._numbers.get(record.start)
            items = self._cache.get(number) if number is not None else None
            if items is None or record.flags & TARGETED or not record.payload:
                return None  # read from the log, or no bytes kept (a memory log)
            if type(items) is EventsJson:
                made_by_worker = True
                pieces.append(items)
                continue
            if not pieces or type(pieces[-1]) is EventsJson:
                piece = EventBatch()
                piece.payloads = []
                pieces.append(piece)
            last = pieces[-1]
            assert type(last) is EventBatch and last.payloads is not None
            last.extend(items)
            last.payloads.append(record.payload)
        return EventsJsonBatch(pieces) if made_by_worker else None

    def _read_kept(
        self, number: int, max_events: int, max_bytes: int = 64 << 20
    ) -> list[Record] | None:
        """The records from the one numbered `number` on as the log would read them (up to
        `max_events` events or `max_bytes` of payload, at least one), when memory holds them
        all: no disk read, no copy. None when it does not (a gap: the log has them).

        Runs on a worker thread while the loop keeps new records: _keep fills a number's
        entries before it counts the number, so every number below _next_number is whole
        or a gap; records a sink has not passed are never dropped under it."""
        records: list[Record] = []
        events = size = 0
        end = self._next_number
        while number < end:
            record = self._records.get(number)
            if record is None:
                return None  # not kept: read the log
            records.append(record)
            events += record.count
            size += len(record.payload)
            if events >= max_events or size >= max_bytes:
                break
            number += 1
        return records

    def _commit(self, state: SinkState, slowest: Position) -> int:
        """(On a worker thread.) Save the sink's cursor, then drop the records every sink has
        passed from memory. Returns how many events were dropped."""
        self.log.save_cursor(state.sink.name, state.cursor, state.cursor_seq)
        freed = 0
        number, end = self._oldest, self._next_number
        while number < end:
            record = self._records.get(number)
            if record is not None:
                if record.start >= slowest:
                    break
                # pop, not del: two sinks' commits may walk the same records at once.
                items = self._cache.pop(number, None)
                self._records.pop(number, None)
                self._numbers.pop(record.start, None)
                freed += len(items) if items is not None else 0
            number += 1
        self._oldest = number
        return freed

    def _batch_max(self, state: SinkState) -> int:
        # A sink may size its own batches (`max_batch_events`: the store sink's inserts are
        # sized for ClickHouse, store_insert_max_events); the others take flush_max_events.
        return getattr(state.sink, "max_batch_events", None) or self.flush_max_events

    def _items_of(self, records: list[Record], sink: str, batch: _Batch) -> _Batch:
        """The items of `records` for `sink` into `batch` (events or span rows), with the
        records' bytes as its `payloads` when they are exactly its JSON."""
        # The records' own JSON is the batch's when each is a plain record with its bytes
        # (a memory log keeps none; a targeted record wraps its items).
        plain = all(r.payload and not r.flags & TARGETED for r in records)
        batch.payloads = [r.payload for r in records] if plain else None
        self._collect(records, sink, batch)
        if batch.payloads is not None and len(batch) != sum(r.count for r in records):
            batch.payloads = None  # items refused on reading went to the dead letters
        return batch

    def _collect(self, records: list[Record], sink: str, into: list[Any]) -> None:
        """(On a worker thread.) The items of `records` for `sink`, in order, into `into`:
        from memory, or decoded from their payloads (a sink behind the window, a targeted
        record)."""
        kept: list[Sequence[Any] | None] = []
        missing: list[Record] = []
        for record in records:
            number = self._numbers.get(record.start)
            items = self._cache.get(number) if number is not None else None
            if items is None:
                missing.append(record)
            kept.append(items)
        decoded = self._decode_records(missing, sink) if missing else {}
        for record, items in zip(records, kept, strict=True):
            if type(items) is EventsJson:  # a worker's record, for a sink that reads events
                into.extend(self.decode(items.payload))
                continue
            into.extend(items if items is not None else decoded.get(record.start, []))

    def _decode_records(self, records: list[Record], sink: str) -> dict[Position, list[Any]]:
        out: dict[Position, list[Any]] = {}
        for record in records:
            payload = record.payload
            spans = bool(record.flags & SPANS)
            try:
                if record.flags & TARGETED:
                    wrapper = json.loads(payload)
                    target = wrapper.get("sink")
                    if target != sink:
                        if sink == self._reader_of(spans) and not self._runs(target):
                            self._unclaimed(target, wrapper, spans)
                        continue
                    payload = json.dumps(wrapper["spans" if spans else "events"]).encode()
                out[record.start] = decode_rows(payload) if spans else self.decode(payload)
            except Exception as exc:
                log.error("spool record at %s cannot be decoded: %s", record.start, exc)
                out[record.start] = self._decode_each(sink, payload, exc, spans)
        return out

    def _reader_of(self, spans: bool) -> str | None:
        """The first sink that reads every record of this kind: it speaks for the others."""
        for state in self.sinks:
            if not spans or hasattr(state.sink, "write_spans"):
                return state.sink.name
        return None

    def _runs(self, sink: object) -> bool:
        return any(state.sink.name == sink for state in self.sinks)

    def _unclaimed(self, target: object, wrapper: dict[str, Any], spans: bool) -> None:
        """A replay for a sink this server does not run (an offline replay, then the sink's
        plugin left the settings): back to that sink's dead letters, not skipped by every
        sink and dropped with the segment."""
        items = wrapper.get("spans" if spans else "events")
        what = "spans" if spans else "events"
        reason = f"replayed for sink {target!r}, which this server does not run"
        log.warning("%d %s %s; they are back in its dead letters", len(items or ()), what, reason)
        self._dead_letter_raw(str(target), json.dumps(items).encode(), reason, spans)

    def _decode_each(
        self, sink: str, payload: bytes, whole: Exception, spans: bool = False
    ) -> list[Any]:
        """A record that does not decode as a whole (an event the contract now refuses, say
        after an upgrade tightened a range): the events that decode go on, the others go to
        the dead letters as they were, with their project, so none of an answered request
        is lost. Only a payload that is not a JSON array at all is kept as raw text."""
        try:
            items = json.loads(payload)
        except ValueError:
            items = None
        if not isinstance(items, list):
            self._dead_letter_raw(sink, payload, f"cannot decode: {whole}", spans)
            return []
        decode = decode_rows if spans else self.decode
        good: list[Any] = []
        bad: list[Any] = []
        first_error = ""
        for item in items:
            try:
                good.extend(decode(json.dumps([item]).encode()))
            except Exception as exc:
                bad.append(item)
                first_error = first_error or str(exc)
        if bad:
            what = "spans" if spans else "events"
            reason = f"cannot decode {len(bad)} of {len(items)} {what}: {first_error}"
            self._dead_letter_raw(sink, json.dumps(bad).encode(), reason[:2000], spans)
        return good

    async def _write_with_retry(
        self, state: SinkState, events: Sequence[Any], spans: bool = False
    ) -> None:
        attempt = 0
        while True:
            try:
                if spans:
                    await state.sink.write_spans(events)  # type: ignore[attr-defined]
                else:
                    await state.sink.write(events)
            except Exception as exc:
                state.last_error = f"{type(exc).__name__}: {exc}"[:500]
                if getattr(exc, "permanent", False):
                    state.failing_since = None
                    await anyio.to_thread.run_sync(self._dead_letter, state, events, spans)
                    return
                if state.failing_since is None:
                    state.failing_since = time.monotonic()
                    log.warning("sink %s failed, retrying: %s", state.sink.name, state.last_error)
                state.retries_total += 1
                attempt += 1
                # Full jitter: spread retries so a recovering store is not hit all at once.
                cap = min(
                    self.retry_max_s, self.retry_initial_s * math.pow(2, min(attempt, 30) - 1)
                )
                await anyio.sleep(random.uniform(cap / 2, cap))
                continue
            if state.failing_since is not None:
                log.info("sink %s recovered after %d retries", state.sink.name, attempt)
            state.failing_since = None
            state.delivered_events_total += len(events)
            state.delivered_batches_total += 1
            return

    def _dead_letter(self, state: SinkState, events: Sequence[Any], spans: bool = False) -> None:
        state.dead_letter_events_total += len(events)
        log.error(
            "sink %s refused %d %s for good (%s); they are in the dead letters",
            state.sink.name,
            len(events),
            "spans" if spans else "events",
            state.last_error,
        )
        if spans:
            payload = encode_rows(events)
        elif type(events) is EventsJsonBatch:
            payload = events.json()
        else:
            payload = self.encode(events)
        self._dead_letter_raw(state.sink.name, payload, state.last_error or "", spans)

    def _dead_letter_raw(self, sink: str, payload: bytes, reason: str, spans: bool = False) -> None:
        folder = self.log.dead_letter_dir
        if folder is None:
            return  # the memory log keeps no dead letters; they are counted and logged
        listed = payload.startswith(b"[")
        entry = dead_letter(
            sink,
            reason,
            json.loads(payload) if listed else None,
            None if listed else payload.decode(errors="replace"),
            "spans" if spans else "events",
        )
        # One fsynced line per entry; a torn tail from a crash is cut off first (dead_letters).
        append_dead_letter(folder / f"{_safe(sink)}.jsonl", entry)


# Events freed at once: about 0.4 ms of the GIL, under the 0.5 ms switch interval that
# `watchllm serve` sets (serving/tuning.py), so the event loop never waits much longer than that.
_FREE_SLICE = 200


def _refs_of_a_sole_owner() -> int:
    # What getrefcount says of a list held by one local name alone (the interpreter's own
    # count: versions differ in what the call adds), measured the way `_free` reads it.
    batches: list[list[Any]] = [[]]
    batch = batches.pop()
    return sys.getrefcount(batch)


_SOLE_OWNER = _refs_of_a_sole_owner()


def _free(batches: list[Sequence[Any]]) -> None:
    while batches:
        batch = batches.pop()
        if not isinstance(batch, list):
            continue  # rows as JSON (otel.rows.RowsJson): a few bytes objects, no items
        # A sink may keep the list it was given (a buffer, a test's record of its batches):
        # then it is the sink's, and left whole.
        if sys.getrefcount(batch) > _SOLE_OWNER:
            continue
        # Slice by slice: freeing is C code that keeps the GIL throughout; between slices
        # the event loop can take it (at the switch interval) instead of waiting for all.
        while batch:
            del batch[-_FREE_SLICE:]


def _waiting_since(state: SinkState, record: Record) -> None:
    """The sink's oldest pending event is `record`'s: on the monotonic clock, from its
    wall-clock append time (a step of the wall clock then does not show as lag)."""
    waited_s = max(0.0, time.time() - record.appended_ms / 1000)
    state.oldest_pending_at = time.monotonic() - waited_s


async def _for_sink(state: SinkState, events: Any) -> Any:
    """The events as the sink reads them: pydantic models unless it reads structs (or the
    batch is a worker's JSON), converted on a worker thread."""
    if (
        events
        and type(events) is not EventsJsonBatch
        and not getattr(state.sink, "reads_structs", False)
    ):
        return await anyio.to_thread.run_sync(_as_models, events)
    return events


def _cancel_quietly(stream: Any) -> None:
    try:
        stream.cancel()
    except Exception as exc:  # (the failure it follows is what is reported)
        log.debug("cancelling a streamed insert: %s", exc)


def _as_models(events: EventBatch) -> EventBatch:
    models = EventBatch(to_models(events))
    models.payloads = events.payloads
    return models


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
