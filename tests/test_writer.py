"""The writer on its own: batching, per-sink pace, retries, dead letters, back-pressure,
shutdown and replay from the spool."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from watchllm_ext.delivery.spool import HEADER_SIZE, Position, Spool
from watchllm_ext.delivery.writer import (
    MemoryLog,
    SinkError,
    Writer,
    WriterClosed,
    WriterFull,
    batch_json,
)


def encode(events: Sequence[Any]) -> bytes:
    return json.dumps(list(events)).encode()


def decode(payload: bytes) -> list[Any]:
    return json.loads(payload)


class ListSink:
    def __init__(self, name: str = "list") -> None:
        self.name = name
        self.batches: list[list[Any]] = []

    async def write(self, events: Sequence[Any]) -> None:
        self.batches.append(list(events))

    @property
    def events(self) -> list[Any]:
        return [e for b in self.batches for e in b]


class FlakySink(ListSink):
    """Fails the first `failures` writes, then works."""

    def __init__(self, failures: int) -> None:
        super().__init__("flaky")
        self.failures = failures
        self.calls = 0

    async def write(self, events: Sequence[Any]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("store down")
        await super().write(events)


class GatedSink(ListSink):
    """Blocks every write until the gate opens."""

    def __init__(self, name: str = "gated") -> None:
        super().__init__(name)
        self.gate = anyio.Event()

    async def write(self, events: Sequence[Any]) -> None:
        await self.gate.wait()
        await super().write(events)


def memory_writer(sinks: list[Any], **kw: Any) -> Writer:
    return Writer(sinks, MemoryLog(kw.pop("max_events", 1000)), encode=encode, decode=decode, **kw)


def spool_writer(sinks: list[Any], folder: Path, **kw: Any) -> Writer:
    spool = Spool(folder, max_bytes=kw.pop("max_bytes", 1 << 30))
    return Writer(sinks, spool, encode=encode, decode=decode, **kw)


def test_flushes_on_size_and_on_interval() -> None:
    async def main() -> None:
        sink = ListSink()
        async with memory_writer([sink], flush_max_events=3, flush_interval_s=0.1) as writer:
            await writer.submit([1, 2, 3, 4])  # reaches the size: delivered at once
            await anyio.sleep(0.05)
            assert sink.batches == [[1, 2, 3, 4]]
            await writer.submit([5])
            await anyio.sleep(0.03)
            assert sink.batches == [[1, 2, 3, 4]]  # waits for the interval...
            await anyio.sleep(0.2)
            assert sink.batches == [[1, 2, 3, 4], [5]]  # ...then goes

    anyio.run(main)


@pytest.mark.parametrize("log_kind", ["memory", "spool"])
def test_a_slow_sink_holds_back_no_other(log_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        fast, slow = ListSink("fast"), GatedSink()
        make = (
            (lambda s, **kw: memory_writer(s, **kw))
            if log_kind == "memory"
            else (lambda s, **kw: spool_writer(s, tmp_path, **kw))
        )
        async with make([fast, slow], flush_max_events=2, flush_interval_s=0.01) as writer:
            for i in range(5):
                await writer.submit([i * 2, i * 2 + 1])
            assert await writer.flush(timeout_s=0.5) is False  # the slow sink holds the flush
            assert fast.events == list(range(10))
            assert slow.events == []
            assert writer.stats()["sinks"]["gated"]["lag_events"] == 10
            assert writer.stats()["sinks"]["fast"]["lag_events"] == 0
            slow.gate.set()
            assert await writer.flush(timeout_s=5)
            assert slow.events == list(range(10))
            assert writer.lag_events() == 0

    anyio.run(main)


def test_failing_sink_is_retried_with_backoff() -> None:
    async def main() -> None:
        sink = FlakySink(failures=3)
        writer = memory_writer(
            [sink], flush_interval_s=0.01, retry_initial_s=0.01, retry_max_s=0.05
        )
        async with writer:
            await writer.submit(["a", "b"])
            assert await writer.flush(timeout_s=5)
            stats = writer.stats()["sinks"]["flaky"]
        assert sink.events == ["a", "b"]
        assert stats["retries_total"] == 3
        assert stats["delivered_events_total"] == 2
        assert "store down" in stats["last_error"]

    anyio.run(main)


def test_permanent_error_goes_to_the_dead_letters(tmp_path: Path) -> None:
    class Picky(ListSink):
        async def write(self, events: Sequence[Any]) -> None:
            if "poison" in events:
                raise SinkError("type mismatch in column x", permanent=True)
            await super().write(events)

    async def main() -> Writer:
        sink = Picky("picky")
        async with spool_writer([sink], tmp_path, flush_max_events=1) as writer:
            await writer.submit(["poison"])
            await writer.submit(["good"])
            assert await writer.flush(timeout_s=5)
        assert sink.events == ["good"]
        return writer

    writer = anyio.run(main)
    assert writer.stats()["sinks"]["picky"]["dead_letter_events_total"] == 1
    lines = (tmp_path / "dead-letter" / "picky.jsonl").read_text().splitlines()
    (entry,) = [json.loads(line) for line in lines]
    assert entry["events"] == ["poison"] and "type mismatch" in entry["reason"]


def test_full_log_refuses_instead_of_growing() -> None:
    async def main() -> None:
        slow = GatedSink()
        async with memory_writer(
            [slow], max_events=5, flush_max_events=2, flush_interval_s=0.01
        ) as writer:
            await writer.submit([1, 2, 3])
            with pytest.raises(WriterFull) as caught:
                await writer.submit([4, 5, 6])
            assert caught.value.retry_after_s >= 1
            await writer.submit([4, 5])  # exactly at the cap is fine
            slow.gate.set()
            assert await writer.flush(timeout_s=5)
            await writer.submit([6, 7, 8])  # room again once delivered
            assert await writer.flush(timeout_s=5)
        assert slow.events == [1, 2, 3, 4, 5, 6, 7, 8]

    anyio.run(main)


def test_close_flushes_and_then_refuses() -> None:
    async def main() -> ListSink:
        sink = ListSink()
        writer = memory_writer([sink], flush_interval_s=60)
        async with writer:
            await writer.submit(["x", "y"])
        with pytest.raises(WriterClosed):
            await writer.submit(["z"])
        return sink

    assert anyio.run(main).events == ["x", "y"]


def test_what_shutdown_could_not_deliver_is_replayed_at_the_next_start(tmp_path: Path) -> None:
    async def first_run() -> None:
        stuck = GatedSink("store")
        with anyio.fail_after(5):
            async with spool_writer(
                [stuck], tmp_path, shutdown_grace_s=0.2, flush_interval_s=0.01
            ) as writer:
                await writer.submit(["a", "b"])
                await writer.submit(["c"])

    async def second_run() -> ListSink:
        sink = ListSink("store")
        async with spool_writer([sink], tmp_path, flush_interval_s=0.01) as writer:
            assert writer.lag_events() == 3
            assert await writer.flush(timeout_s=5)
        return sink

    anyio.run(first_run)
    assert anyio.run(second_run).events == ["a", "b", "c"]


def test_a_sink_behind_the_memory_window_reads_the_spool(tmp_path: Path) -> None:
    async def main() -> None:
        slow = GatedSink("slow")
        async with spool_writer(
            [slow], tmp_path, memory_max_events=3, flush_max_events=100, flush_interval_s=0.01
        ) as writer:
            for i in range(10):
                await writer.submit([{"n": i}])
            assert writer.stats()["events_in_memory"] == 3
            slow.gate.set()
            assert await writer.flush(timeout_s=5)
        assert slow.events == [{"n": i} for i in range(10)]

    anyio.run(main)


def test_a_record_the_contract_now_refuses_loses_none_of_its_events(tmp_path: Path) -> None:
    """A spool record written under an older, looser contract (here a latency over today's
    30-day bound) is read back event by event: the valid ones reach the sink, the refused one
    goes to the dead letters with its project, where a project admin sees and can replay it.
    Before, the whole record became one raw entry that a replay reported and then dropped."""
    from conftest import prompt_call

    from watchllm_ext.app import _decode_events, _encode_events
    from watchllm_ext.delivery.dead_letters import read_dead_letters, take_dead_letters

    old = [
        prompt_call("ok-1", project_id="acme"),
        prompt_call("too-slow", project_id="acme", latency_ms=1e20),
        prompt_call("ok-2", project_id="acme"),
    ]
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.write(json.dumps(old).encode(), len(old))
    spool.write(b"not json at all", 1)  # a record no reader can parse stays raw
    spool.close()

    async def main() -> ListSink:
        sink = ListSink("store")
        log = Spool(tmp_path, max_bytes=1 << 30)
        async with Writer(
            [sink], log, encode=_encode_events, decode=_decode_events, flush_interval_s=0.01
        ) as writer:
            assert await writer.flush(timeout_s=5)
        return sink

    sink = anyio.run(main)
    assert [e.event_id for e in sink.events] == ["ok-1", "ok-2"]
    folder = tmp_path / "dead-letter"
    mine = read_dead_letters(folder, project="acme").entries
    assert [e["event_id"] for entry in mine for e in entry.events] == ["too-slow"]
    assert "1 of 3 events" in mine[0].reason and "latency_ms" in mine[0].reason
    everything = read_dead_letters(folder).entries
    assert len(everything) == 2 and sum(e.raw is not None for e in everything) == 1
    # A replay takes the refused event back, never the raw record (it has nothing to put back).
    taken = take_dead_letters(folder)
    assert [e["event_id"] for entry in taken.entries for e in entry.events] == ["too-slow"]
    assert [e.raw is not None for e in read_dead_letters(folder).entries] == [True]


class SpanSink(ListSink):
    """A sink that also takes span rows."""

    def __init__(self, name: str = "spans") -> None:
        super().__init__(name)
        self.rows: list[Any] = []

    async def write_spans(self, rows: Sequence[Any]) -> None:
        self.rows.extend(rows)


def span_row(span_id: str) -> Any:
    from datetime import UTC, datetime

    from watchllm_ext.otel.rows import SpanRow

    now = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
    return SpanRow(
        project_id="acme",
        trace_id="ab" * 16,
        span_id=span_id,
        name="chat gpt-4o",
        kind="client",
        start_time=now,
        end_time=now,
        duration_ms=0.0,
        status_code="ok",
        ingested_at=now,
    )


@pytest.mark.parametrize("crash", ["none", "inside the events", "between the two", "in the spans"])
def test_events_and_their_spans_land_together_or_not_at_all(crash: str, tmp_path: Path) -> None:
    """submit(events, spans) writes both records in one write: a crash that leaves only part
    of it on disk (cut here at a point of the segment) loses the request whole, never its
    spans alone (the client was not answered, and re-sends it)."""

    async def submit() -> None:
        held = GatedSink("spans")  # never delivers: the records stay in the spool
        async with spool_writer([held], tmp_path, shutdown_grace_s=0.01) as writer:
            await writer.submit(["before"])
            await writer.submit(["e1", "e2"], spans=[span_row("0" * 15 + "1")])

    anyio.run(submit)
    segment = next((tmp_path / "segments").iterdir())
    data = segment.read_bytes()
    records = Spool(tmp_path).read(Position(1, 0), 100)
    assert len(records) == 3
    events_record, spans_record = records[1], records[2]
    cut = {
        "none": len(data),
        "inside the events": events_record.start.offset + HEADER_SIZE + 3,
        "between the two": events_record.end.offset,  # the events' record whole and valid
        "in the spans": spans_record.end.offset - 1,
    }[crash]
    segment.write_bytes(data[:cut])

    async def restart() -> SpanSink:
        sink = SpanSink()
        async with spool_writer([sink], tmp_path, flush_interval_s=0.01) as writer:
            assert await writer.flush(timeout_s=5)
        return sink

    sink = anyio.run(restart)
    if crash == "none":
        assert sink.events == ["before", "e1", "e2"]
        assert [row.span_id for row in sink.rows] == ["0" * 15 + "1"]
    else:
        assert sink.events == ["before"] and sink.rows == []


def test_no_room_for_the_spans_refuses_the_events_too() -> None:
    async def main() -> None:
        sink = SpanSink()
        async with memory_writer([sink], max_events=3) as writer:
            with pytest.raises(WriterFull):
                await writer.submit(["e1", "e2"], spans=[span_row("0" * 15 + "2")] * 2)
            assert await writer.flush(timeout_s=5)
            assert sink.events == [] and sink.rows == []

    anyio.run(main)


class Tracked:
    """Records the thread that frees it."""

    freed_on: list[int] = []

    def __del__(self) -> None:
        Tracked.freed_on.append(threading.get_ident())


class CountingSink:
    name = "counting"

    def __init__(self) -> None:
        self.count = 0

    async def write(self, events: Sequence[Any]) -> None:
        self.count += len(events)  # keeps no reference to them


def test_delivered_events_are_freed_off_the_event_loop() -> None:
    """Freeing a delivered batch of 50,000 events holds the GIL for ~100 ms: on the event loop
    that would stop every request for as long, so the writer frees them on a worker thread."""
    Tracked.freed_on.clear()

    async def main() -> tuple[int, int]:
        sink = CountingSink()
        async with memory_writer([sink], flush_interval_s=0.01) as writer:
            await writer.submit([Tracked() for _ in range(100)])
            assert await writer.flush(timeout_s=5)
            loop_thread = threading.get_ident()
            with anyio.fail_after(5):  # freed right after the delivery
                while len(Tracked.freed_on) < 100:
                    await anyio.sleep(0.01)
        return loop_thread, sink.count

    loop_thread, count = anyio.run(main)
    assert count == 100
    assert len(Tracked.freed_on) == 100
    assert loop_thread not in Tracked.freed_on


class CountingSpool(Spool):
    """A spool that counts how often the writer reads records back from disk."""

    reads = 0

    def read(self, start: Position, max_events: int, max_bytes: int = 64 << 20) -> list[Any]:
        self.reads += 1
        return super().read(start, max_events, max_bytes)


class JsonSink(ListSink):
    """Keeps each batch's JSON as batch_json gives it (the spool's bytes for the writer's list)."""

    def __init__(self) -> None:
        super().__init__("json")
        self.bodies: list[bytes] = []

    async def write(self, events: Sequence[Any]) -> None:
        self.bodies.append(batch_json(events))
        await super().write(events)


def test_a_sink_that_keeps_up_reads_no_disk(tmp_path: Path) -> None:
    """Records in memory are delivered with their spool bytes, without reading the spool back;
    the segments every sink has passed are deleted all the same."""

    async def main() -> tuple[JsonSink, CountingSpool]:
        sink = JsonSink()
        spool = CountingSpool(tmp_path, segment_max_bytes=4096)
        async with Writer(
            [sink], spool, encode=encode, decode=decode, flush_max_events=25, flush_interval_s=0.01
        ) as writer:
            for i in range(40):
                await writer.submit([{"n": i, "k": "x" * 400}, {"n": i, "k": "y"}])
                # Delivered record by record at first: a cursor then stops at the end of a
                # segment, whose next record is at the start of the next one.
                if i < 20 or i % 10 == 9:
                    assert await writer.flush(timeout_s=5)
        return sink, spool

    sink, spool = anyio.run(main)
    assert spool.reads == 0
    assert [e["n"] for e in sink.events] == [i for i in range(40) for _ in range(2)]
    assert [json.loads(body) for body in sink.bodies] == sink.batches
    assert max(len(b) for b in sink.batches) <= 26  # batches of 25 events, records of 2
    assert spool._active >= 3  # the sink went across segments
    segments = list((tmp_path / "segments").iterdir())
    assert len(segments) <= 2  # the rolled ones were released and unlinked
    assert spool.bytes == sum(p.stat().st_size for p in segments)


def test_records_past_a_gap_in_memory_come_from_memory_again(tmp_path: Path) -> None:
    """Records that did not fit in memory (memory_max_events) are read from the spool, the
    ones before and after them from memory: in order, each once, two reads for two records."""

    class StepSink(ListSink):
        def __init__(self) -> None:
            super().__init__("step")
            self.steps = anyio.Semaphore(0)

        async def write(self, events: Sequence[Any]) -> None:
            await self.steps.acquire()
            await super().write(events)

    async def main() -> tuple[StepSink, CountingSpool]:
        sink = StepSink()
        spool = CountingSpool(tmp_path)
        async with Writer(
            [sink],
            spool,
            encode=encode,
            decode=decode,
            flush_max_events=1,
            memory_max_events=3,
            flush_interval_s=0.01,
        ) as writer:
            for i in range(5):  # 0, 1, 2 are kept; 3 and 4 are past the cap
                await writer.submit([i])
            assert writer.stats()["events_in_memory"] == 3
            sink.steps.release()  # 0 is delivered and leaves the memory
            with anyio.fail_after(5):
                while writer.stats()["events_in_memory"] != 2:
                    await anyio.sleep(0.01)
            await writer.submit([5])  # fits again
            assert writer.stats()["events_in_memory"] == 3
            for _ in range(5):
                sink.steps.release()
            assert await writer.flush(timeout_s=5)
            assert writer.stats()["events_in_memory"] == 0
        return sink, spool

    sink, spool = anyio.run(main)
    assert sink.batches == [[0], [1], [2], [3], [4], [5]]
    assert spool.reads == 2  # for 3 and 4


def test_span_rows_come_with_their_spool_bytes(tmp_path: Path) -> None:
    """A sink's span rows carry their records' bytes (otel.rows.SpanBatch), which are exactly
    the rows' JSON: the store inserts those instead of encoding every row again."""
    from watchllm_ext.otel.rows import SpanBatch, encode_rows

    class BodySink(SpanSink):
        def __init__(self) -> None:
            super().__init__()
            self.bodies: list[tuple[bool, bytes, bytes]] = []

        async def write_spans(self, rows: Sequence[Any]) -> None:
            joined = type(rows) is SpanBatch and rows.payloads is not None
            self.bodies.append((joined, encode_rows(rows), encode_rows(list(rows))))
            await super().write_spans(rows)

    async def main() -> BodySink:
        sink = BodySink()
        async with spool_writer([sink], tmp_path, flush_interval_s=0.01) as writer:
            for i in range(3):
                await writer.submit([f"e{i}"], spans=[span_row(f"{i:016x}"), span_row("f" * 16)])
            assert await writer.flush(timeout_s=5)
        return sink

    sink = anyio.run(main)
    assert sink.events == ["e0", "e1", "e2"] and len(sink.rows) == 6
    assert sink.bodies and all(joined for joined, _, _ in sink.bodies)
    assert all(ours == encoded for _, ours, encoded in sink.bodies)


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_submit_is_as_durable_as_the_fsync_policy_says(policy: str, tmp_path: Path) -> None:
    """`always`: each submit returns after an fsync that covers it; `interval` and `never`
    (docs/DURABILITY.md): after the write only, the fsync (if any) comes on its own clock."""

    async def main() -> tuple[list[bool], int, bool]:
        spool = Spool(tmp_path, fsync=policy, fsync_interval_s=0.2)  # type: ignore[arg-type]
        sync_task = spool.sync_task()
        writer = Writer([ListSink()], spool, encode=encode, decode=decode, sync_task=sync_task)
        durable_on_return: list[bool] = []
        async with writer:
            for i in range(20):
                await writer.submit([{"i": i}])
                durable_on_return.append(spool._durable >= spool.end)
            fsyncs = spool.fsyncs_total
            with anyio.move_on_after(2):
                while spool._durable < spool.end:
                    await anyio.sleep(0.01)
            durable_later = spool._durable >= spool.end
        return durable_on_return, fsyncs, durable_later

    durable_on_return, fsyncs, durable_later = anyio.run(main)
    if policy == "always":
        assert durable_on_return == [True] * 20
        assert fsyncs >= 1
        assert durable_later
    else:
        assert fsyncs == 0  # within 20 quick submits no interval went by; none for `never`
        assert durable_on_return == [False] * 20
        assert durable_later is (policy == "interval")


def test_a_quiet_backlog_goes_before_the_interval_is_over() -> None:
    """QUIET_MIN_EVENTS or more waiting and nothing new for QUIET_S: a burst has ended, the
    batch goes at once; fewer wait out flush_interval_s (an insert has a fixed cost)."""
    from watchllm_ext.delivery.writer import QUIET_MIN_EVENTS, QUIET_S

    async def main() -> None:
        sink = ListSink()
        async with memory_writer(
            [sink], max_events=100_000, flush_max_events=50_000, flush_interval_s=30
        ) as writer:
            await writer.submit(list(range(QUIET_MIN_EVENTS - 1)))
            await anyio.sleep(QUIET_S * 4)
            assert sink.batches == []  # too few: they wait for the interval
            await writer.submit(["last"])
            with anyio.fail_after(2):  # far sooner than the 30 s interval
                while not sink.batches:
                    await anyio.sleep(0.01)
            assert len(sink.events) == QUIET_MIN_EVENTS

    anyio.run(main)


class FirstWriteGated(ListSink):
    """Its first write waits until `gate` is set (a long insert)."""

    def __init__(self) -> None:
        super().__init__("gated-once")
        self.entered = anyio.Event()
        self.gate = anyio.Event()

    async def write(self, events: Sequence[Any]) -> None:
        if not self.batches:
            self.entered.set()
            await self.gate.wait()
        await super().write(events)


def test_the_rest_of_a_burst_goes_when_quiet_after_a_big_batch() -> None:
    """What came while a big batch was written, and nothing since, is the rest of a burst:
    once quiet for QUIET_S it goes, however few. A trickle that starts after the sink has
    gone idle is no burst's rest: it waits for the interval."""
    from watchllm_ext.delivery.writer import QUIET_MIN_EVENTS, QUIET_S

    async def main() -> None:
        sink = FirstWriteGated()
        async with memory_writer(
            [sink], max_events=100_000, flush_max_events=50_000, flush_interval_s=30
        ) as writer:
            await writer.submit(list(range(QUIET_MIN_EVENTS)))
            with anyio.fail_after(5):
                await sink.entered.wait()
            await writer.submit(["tail"] * 10)  # during the big batch's write
            sink.gate.set()
            with anyio.fail_after(5):  # far sooner than the 30 s interval
                while len(sink.batches) < 2:
                    await anyio.sleep(0.01)
            assert len(sink.batches[1]) == 10

            await writer.submit(list(range(QUIET_MIN_EVENTS)))
            with anyio.fail_after(5):
                while len(sink.batches) < 3:
                    await anyio.sleep(0.01)
            await anyio.sleep(QUIET_S * 4)  # the sink idles
            await writer.submit(["trickle"] * 10)
            await anyio.sleep(QUIET_S * 4)
            assert len(sink.batches) == 3

    anyio.run(main)


def test_the_interval_counts_from_when_the_last_batch_was_taken() -> None:
    """What comes while a batch is written has waited since that batch was taken: it goes
    flush_interval_s after then, not a whole interval after the write ended."""

    class SlowSink(ListSink):
        async def write(self, events: Sequence[Any]) -> None:
            await anyio.sleep(0.4)
            await super().write(events)

    async def main() -> None:
        sink = SlowSink()
        async with memory_writer([sink], flush_max_events=2, flush_interval_s=0.5) as writer:
            await writer.submit([1, 2])  # a full batch: taken at once, written in 0.4 s
            await anyio.sleep(0.05)
            await writer.submit([3])  # comes during the write
            started = anyio.current_time()
            while len(sink.batches) < 2:
                await anyio.sleep(0.01)
            # taken ~0.5 s after the first batch was taken, written 0.4 s later: ~0.85 s from
            # here; counted from the write's end it would be ~1.25 s.
            assert anyio.current_time() - started < 1.1
            assert sink.batches == [[1, 2], [3]]

    anyio.run(main)


def test_rows_as_json_reach_a_payload_sink_as_their_bytes_and_others_as_rows(
    tmp_path: Path,
) -> None:
    """Rows kept as JSON (otel.rows.RowsJson, a worker process's) reach a sink that reads only
    the bytes as those bytes, never decoded, and any other sink as SpanRows; a batch that
    goes to the dead letters is written there whole."""
    from watchllm_ext.otel.rows import RowsJson, encode_rows

    rows = [span_row(f"{i:016x}") for i in range(3)]
    payload = encode_rows(rows)

    class PayloadSink(SpanSink):
        reads_span_payloads = True

        def __init__(self) -> None:
            super().__init__("payloads")
            self.given: list[Any] = []

        async def write_spans(self, rows: Sequence[Any]) -> None:
            self.given.append(rows)
            if len(self.given) == 1:
                raise SinkError("cannot parse", permanent=True)

    async def main() -> tuple[PayloadSink, SpanSink]:
        bytes_only, plain = PayloadSink(), SpanSink("plain")
        async with spool_writer([bytes_only, plain], tmp_path, flush_interval_s=0.01) as writer:
            await writer.submit(["e0"], spans=RowsJson([payload], 3))
            assert await writer.flush(timeout_s=5)
            await writer.submit(["e1"], spans=RowsJson([payload], 3))
            assert await writer.flush(timeout_s=5)
        return bytes_only, plain

    bytes_only, plain = anyio.run(main)
    assert [type(given) for given in bytes_only.given] == [RowsJson, RowsJson]
    assert all(given._rows is None for given in bytes_only.given)  # never decoded
    assert [encode_rows(given) for given in bytes_only.given] == [payload, payload]
    assert plain.rows == rows + rows
    lines = (tmp_path / "dead-letter" / "payloads.jsonl").read_text().splitlines()
    (entry,) = [json.loads(line) for line in lines]
    assert entry["kind"] == "spans"
    assert [row["span_id"] for row in entry["events"]] == [row.span_id for row in rows]


def test_rows_read_back_from_the_log_are_decoded_for_a_payload_sink(tmp_path: Path) -> None:
    """After a restart the rows come from the spool, not from what this process wrote: they
    are decoded, so a record whose row does not read as a SpanRow loses only that row (dead
    letters), not the good rows inserted beside it."""
    from watchllm_ext.otel.rows import RowsJson, SpanBatch, encode_rows

    good = encode_rows([span_row("a" * 16)])
    bad = good.replace(b'"duration_ms":0.0', b'"duration_ms":"not a number"')
    assert bad != good

    class PayloadSink(SpanSink):
        reads_span_payloads = True

        def __init__(self) -> None:
            super().__init__("payloads")
            self.kinds: list[type] = []

        async def write_spans(self, rows: Sequence[Any]) -> None:
            self.kinds.append(type(rows))
            await super().write_spans(rows)

    async def write() -> None:
        held = GatedSink("payloads")  # never delivers: the records stay in the spool
        async with spool_writer([held], tmp_path, shutdown_grace_s=0.01) as writer:
            await writer.submit(["e0"], spans=RowsJson([bad], 1))
            await writer.submit(["e1"], spans=RowsJson([good], 1))

    anyio.run(write)

    async def restart() -> PayloadSink:
        sink = PayloadSink()
        async with spool_writer([sink], tmp_path, flush_interval_s=0.01) as writer:
            assert await writer.flush(timeout_s=5)
        return sink

    sink = anyio.run(restart)
    assert set(sink.kinds) == {SpanBatch}
    assert [row.span_id for row in sink.rows] == ["a" * 16]
    dead = [
        json.loads(line)
        for f in (tmp_path / "dead-letter").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert len(dead) == 1 and "not a number" in (dead[0]["raw"] or json.dumps(dead[0]["events"]))


def test_lag_seconds_is_not_moved_by_a_step_of_the_wall_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink's lag_seconds counts on the monotonic clock once the writer has taken the
    record: the wall clock stepping 25 s forward (NTP, a VM resumed) is no lag. The step is
    simulated (time.time in the writer's module): a test cannot move the machine's clock."""
    import time as real_time

    from watchllm_ext.delivery import writer as writer_module

    async def main() -> None:
        slow = GatedSink()
        async with spool_writer([slow], tmp_path, flush_interval_s=0.01) as writer:
            await writer.submit([1, 2])
            await anyio.sleep(0.2)  # taken: the sink's write waits at the gate
            before = writer.stats()["sinks"]["gated"]["lag_seconds"]
            assert 0.1 <= before < 5

            class Stepped:
                def __getattr__(self, name: str) -> Any:
                    return getattr(real_time, name)

                def time(self) -> float:
                    return real_time.time() + 25.0

            monkeypatch.setattr(writer_module, "time", Stepped())
            after = writer.stats()["sinks"]["gated"]["lag_seconds"]
            assert before <= after < before + 1, (before, after)
            slow.gate.set()
            assert await writer.flush(timeout_s=5)
            assert writer.stats()["sinks"]["gated"]["lag_seconds"] == 0.0

    anyio.run(main)


def test_a_replay_for_a_sink_this_server_does_not_run_goes_back_to_its_dead_letters(
    tmp_path: Path,
) -> None:
    """An offline `dead-letter replay` wrote records for sink "picky"; the next start runs
    without it. Every sink used to skip them and they went with their segment: now they are
    the dead letters of "picky" again, once, and the sinks that do run get none of them."""
    from watchllm_ext.delivery.dead_letters import read_dead_letters, targeted_payload
    from watchllm_ext.delivery.writer import SPANS, TARGETED

    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.write(targeted_payload("picky", [{"n": 1}, {"n": 2}], "events"), 2, TARGETED)
    spool.write(targeted_payload("gone-export", [{"span_id": "s1"}], "spans"), 1, TARGETED | SPANS)
    spool.write(encode([{"n": 3}]), 1, 0)
    spool.close()

    class SpanSink(ListSink):
        async def write_spans(self, rows: Sequence[Any]) -> None:
            self.batches.append(list(rows))

    async def main() -> tuple[ListSink, ListSink]:
        store, other = SpanSink("store"), ListSink("other")
        async with spool_writer([other, store], tmp_path, flush_interval_s=0.01) as writer:
            assert await writer.flush(timeout_s=5)
        return store, other

    store, other = anyio.run(main)
    assert other.events == [{"n": 3}] and store.events == [{"n": 3}]
    found = read_dead_letters(tmp_path / "dead-letter").entries
    by_sink = {entry.sink: entry for entry in found}
    assert len(found) == 2, found
    assert by_sink["picky"].events == [{"n": 1}, {"n": 2}] and by_sink["picky"].kind == "events"
    assert by_sink["gone-export"].events == [{"span_id": "s1"}]
    assert by_sink["gone-export"].kind == "spans"
    assert "does not run" in by_sink["picky"].reason


def test_a_cursor_that_cannot_be_saved_holds_the_spool_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    """The spool's disk full under the cursor file: the save raised ENOSPC, out of the
    writer's task group, and the app's lifespan ended with it (every later request 503 until
    a restart by hand). Now nothing is let go until a save works, and delivery goes on."""
    import errno

    class FullDisk(Spool):
        failing = True

        def save_cursor(self, sink: str, position: Position, seq: int) -> None:
            if self.failing:
                raise OSError(errno.ENOSPC, "No space left on device")
            super().save_cursor(sink, position, seq)

    async def main() -> None:
        sink = ListSink("store")
        spool = FullDisk(tmp_path, max_bytes=1 << 30, segment_max_bytes=4096)
        writer = Writer([sink], spool, encode=encode, decode=decode, flush_interval_s=0.01)
        async with writer:
            for n in range(50):
                await writer.submit([{"n": n, "pad": "x" * 200}])
            with anyio.fail_after(5):
                while len(sink.events) < 50:
                    await anyio.sleep(0.01)
            stats = writer.stats()
            assert writer.running and "No space left" in stats["sinks"]["store"]["cursor_error"]
            assert len(list((tmp_path / "segments").glob("*.seg"))) > 1  # none released
            spool.failing = False
            await writer.submit([{"n": 50}])
            assert await writer.flush(timeout_s=5)
            assert writer.stats()["sinks"]["store"]["cursor_error"] is None
        assert [e["n"] for e in sink.events] == list(range(51))

    anyio.run(main)


class StreamSink(SpanSink):
    """Takes bursts in parts (Sink.open_stream): what each stream was fed lands at its finish;
    the order of landings (events, spans) is kept in `landed`."""

    def __init__(self, fail_first: bool = False) -> None:
        super().__init__("stream")
        self.landed: list[tuple[str, list[Any]]] = []
        self.fail_first = fail_first
        self.streams = 0  # finished with events
        self.whole = 0  # batches written whole (write)

    def open_stream(self) -> Any:
        sink = self

        class Stream:
            def __init__(self) -> None:
                self.fed: list[Any] = []

            def feed(self, events: Sequence[Any]) -> None:
                if sink.fail_first:
                    sink.fail_first = False
                    raise ConnectionError("store down")
                self.fed.extend(events)

            def finish(self) -> None:
                sink.batches.append(self.fed)
                sink.landed.append(("events", self.fed))
                sink.streams += 1

            def cancel(self) -> None:
                self.fed = []

        return Stream()

    async def write(self, events: Sequence[Any]) -> None:
        await super().write(events)
        self.landed.append(("events", list(events)))
        self.whole += 1

    async def write_spans(self, rows: Sequence[Any]) -> None:
        await super().write_spans(rows)
        self.landed.append(("spans", list(rows)))


@pytest.mark.parametrize("fail_first", [False, True])
def test_a_burst_is_streamed_up_to_span_rows_and_each_event_lands_once(
    fail_first: bool, tmp_path: Path
) -> None:
    """From STREAM_MIN_EVENTS waiting on, a sink with open_stream is fed events as they come;
    span rows are not streamed (the stream ends before them, and they land after the events
    before them); a stream that fails is sent again as one batch; every event lands once."""
    from watchllm_ext.delivery.writer import STREAM_MIN_EVENTS

    async def main() -> tuple[StreamSink, dict[str, Any]]:
        sink = StreamSink(fail_first)
        async with spool_writer([sink], tmp_path, flush_interval_s=5.0) as writer:
            n = 0
            for _ in range(2):
                for _ in range(STREAM_MIN_EVENTS // 100 + 20):
                    await writer.submit(list(range(n, n + 100)))
                    n += 100
                    await anyio.sleep(0.002)
                await writer.submit([n], spans=[span_row(f"{n:016x}")])
                n += 1
                await anyio.sleep(0.3)  # quiet: what the stream left goes as a batch
            assert await writer.flush(timeout_s=10)
            return sink, writer.stats()["sinks"]["stream"]

    sink, stats = anyio.run(main)
    # Each burst streamed up to its span rows; the first one's stream failed and went whole.
    assert sink.streams == stats["streamed_batches_total"] == (1 if fail_first else 2)
    assert (sink.whole > 0) == fail_first  # (span rows alone go to write_spans only)
    assert sink.events == list(range(len(sink.events)))  # in order, each once
    assert len(sink.events) == 2 * ((STREAM_MIN_EVENTS // 100 + 20) * 100 + 1)
    # Each span row lands after every event submitted before it.
    for at, (kind, rows) in enumerate(sink.landed):
        if kind == "spans":
            n = int(rows[0].span_id, 16)
            before = [e for k, batch in sink.landed[:at] if k == "events" for e in batch]
            assert n in before
    assert sink.rows and len(sink.rows) == 2


def test_records_with_span_rows_keep_the_flush_interval() -> None:
    """Each request's events and span rows (an OpenTelemetry export): the record at the cursor
    is often span rows, which a stream does not take. The batch still goes once the interval
    is over, while requests keep coming (not only when they stop)."""
    from watchllm_ext.delivery.writer import STREAM_MIN_EVENTS

    async def main() -> tuple[int, int]:
        sink = StreamSink()
        async with memory_writer(
            [sink], max_events=1_000_000, flush_max_events=1_000_000, flush_interval_s=0.3
        ) as writer:
            n = 0
            started = time.monotonic()
            landed_by_1s = 0
            while time.monotonic() - started < 1.5:
                await writer.submit(list(range(n, n + 100)), spans=[span_row(f"{n:016x}")])
                n += 100
                await anyio.sleep(0.005)
                if not landed_by_1s and time.monotonic() - started >= 1.0:
                    landed_by_1s = len(sink.landed)
            assert await writer.flush(timeout_s=10)
        assert n > 2 * STREAM_MIN_EVENTS
        return landed_by_1s, len(sink.events)

    landed_by_1s, events = anyio.run(main)
    assert landed_by_1s >= 2  # events and span rows, within about the 0.3 s interval
    assert events > 0
