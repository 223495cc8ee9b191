"""The store sink's insert fed in parts (StoreStream, chDB's open_insert, the writer's streamed
delivery): a burst's events go to the store as they come, parsed meanwhile, and land all at
once at the end, exactly once by id; a stream that fails is sent again as one batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import prompt_call
from stores import EVERY_STORE

from watchllm_ext.app import _decode_events, _encode_events
from watchllm_ext.builtins.store_sink import StoreSink, StoreStream
from watchllm_ext.delivery.spool import Spool
from watchllm_ext.delivery.writer import STREAM_MIN_EVENTS, Writer
from watchllm_ext.ingest.fast_validate import decode_stored, encode_events
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.store import Store, StoreError

pytestmark = EVERY_STORE


def structs(raw: list[dict[str, Any]]) -> list[Any]:
    """The events as the server hands them to the writer (its structs)."""
    models = EVENT_LIST_ADAPTER.validate_python([{**e, "project_id": "acme"} for e in raw])
    return decode_stored(encode_events(models))


def calls(first: int, n: int, minute: int = 0) -> list[Any]:
    at = f"2026-01-02T03:{minute:02d}:05.678Z"
    return structs([prompt_call(f"id-{i}", timestamp=at) for i in range(first, first + n)])


def tool_calls(first: int, n: int) -> list[Any]:
    raw = [
        {
            "event_id": f"tool-{i}",
            "event_type": "tool_call",
            "run_id": "r",
            "timestamp": "2026-01-02T03:04:05.678Z",
            "tool_name": "search",
            "tool_input": {"q": i},
            "tool_output": "found",
        }
        for i in range(first, first + n)
    ]
    return structs(raw)


def stored_minutes(store: Store) -> dict[str, list[str]]:
    """Every stored row of events by id: the minute of its timestamp (one row an id)."""
    rows = store.query(
        "SELECT event_id, toString(timestamp) AS ts FROM events WHERE project_id = 'acme'"
    )
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["event_id"], []).append(row["ts"][14:16])
    return found


def test_a_stream_lands_at_its_end_once_by_id_with_its_tool_calls(store: Store) -> None:
    sink = StoreSink(store)
    sink._write(calls(0, 10))  # stored before the stream (and the schema checked)
    stream = sink.open_stream()
    assert isinstance(stream, StoreStream)
    stream.feed(calls(5, 10, minute=1))  # 5 stored already, 5 new
    stream.feed(tool_calls(0, 3))
    stream.feed(calls(10, 10, minute=2) + calls(20, 2, minute=2))  # 5 sent already, 7 new
    assert len(stored_minutes(store)) == 10  # nothing of the stream before its end
    assert store.query("SELECT count() AS n FROM tool_calls")[0]["n"] == 0
    stream.finish()
    minutes = stored_minutes(store)
    assert len(minutes) == 25
    assert all(len(rows) == 1 for rows in minutes.values())  # one row an id
    assert {minutes[f"id-{i}"][0] for i in range(10)} == {"00"}  # the first copies won
    assert {minutes[f"id-{i}"][0] for i in range(10, 15)} == {"01"}
    assert {minutes[f"id-{i}"][0] for i in range(15, 22)} == {"02"}
    tools = store.query("SELECT event_id FROM tool_calls ORDER BY event_id")
    assert [row["event_id"] for row in tools] == ["tool-0", "tool-1", "tool-2"]
    # The filter of stored ids has what the stream stored: a later copy is kept out.
    sink._write(calls(0, 22, minute=3) + tool_calls(0, 3))
    assert stored_minutes(store) == minutes


def test_a_cancelled_stream_stores_nothing_and_a_later_batch_all(store: Store) -> None:
    sink = StoreSink(store)
    sink._write(calls(0, 1))
    stream = sink.open_stream()
    assert stream is not None
    stream.feed(calls(1, 50) + tool_calls(0, 2))
    stream.cancel()
    assert len(stored_minutes(store)) == 1
    assert store.query("SELECT count() AS n FROM tool_calls")[0]["n"] == 0
    # The ids it sent are not taken for stored: the same events, sent again, land.
    sink._write(calls(1, 50) + tool_calls(0, 2))
    assert len(stored_minutes(store)) == 53


def write_burst(
    store: Store, spool_dir: Path, bursts: list[list[Any]], max_events: int = 50_000
) -> dict[str, Any]:
    """Submit each burst's events as 500-event records through a Writer over a real spool and
    the store sink; returns the sink's stats once every event is delivered."""

    async def main() -> dict[str, Any]:
        sink = StoreSink(store, max_events)
        spool = Spool(spool_dir, fsync="never")
        async with Writer(
            [sink], spool, encode=_encode_events, decode=_decode_events, flush_interval_s=5.0
        ) as writer:
            for events in bursts:
                for i in range(0, len(events), 500):
                    await writer.submit(events[i : i + 500])
                    await anyio.sleep(0.005)  # a client's pace: the stream takes it as it comes
                await anyio.sleep(0.3)  # quiet: the burst is over
            assert await writer.flush(timeout_s=30)
            return writer.stats()["sinks"][sink.name]

    return anyio.run(main)


def test_the_writer_streams_a_burst_into_the_store(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[int] = []
    real_finish = StoreStream.finish

    def counted(stream: StoreStream) -> None:
        real_finish(stream)
        finished.append(len(stream.keys))

    monkeypatch.setattr(StoreStream, "finish", counted)
    first = calls(0, STREAM_MIN_EVENTS + 3_000)
    # A second burst: copies of the first's last 1,000 ids, then 6,000 new ones with tool calls.
    second = calls(STREAM_MIN_EVENTS + 2_000, 5_000, minute=1) + tool_calls(0, 2_000)
    stats = write_burst(store, tmp_path / "spool", [first, second], max_events=6_000)
    assert stats["delivered_events_total"] == len(first) + len(second)  # copies included
    assert stats["last_error"] is None
    # Inserts of up to 6,000 events, streamed from STREAM_MIN_EVENTS waiting on.
    assert len(finished) >= 2 and all(n <= 6_000 for n in finished)
    minutes = stored_minutes(store)
    assert len(minutes) == STREAM_MIN_EVENTS + 3_000 + 4_000 + 2_000
    assert all(len(rows) == 1 for rows in minutes.values())
    assert {minutes[f"id-{i}"][0] for i in range(STREAM_MIN_EVENTS + 3_000)} == {"00"}
    assert store.query("SELECT count() AS n FROM tool_calls FINAL")[0]["n"] == 2_000


def test_a_stream_that_fails_is_sent_again_as_one_batch(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store refuses the stream's first part once (a server going away, a full disk): the
    # stream is cancelled and its events go again as the usual batch.
    failures = []
    real = type(store).open_insert
    lock = threading.Lock()

    def failing_once(self: Any, table: str, settings: Any) -> Any:
        with lock:
            if not failures:
                failures.append(time.monotonic())
                raise StoreError("the store went away (test)")
        return real(self, table, settings)

    monkeypatch.setattr(type(store), "open_insert", failing_once)
    events = calls(0, STREAM_MIN_EVENTS + 4_000)
    stats = write_burst(store, tmp_path / "spool", [events])
    assert failures
    assert stats["delivered_events_total"] == len(events)
    assert stats["streamed_batches_total"] == 0  # the next batch went whole (write)
    minutes = stored_minutes(store)
    assert len(minutes) == len(events) and all(len(rows) == 1 for rows in minutes.values())


def test_an_insert_refused_at_its_end_leaves_the_store_usable(store: Store) -> None:
    # A value ClickHouse refuses, after rows enough that it is parsed while the insert is
    # still open: the error comes with a later part or at the end. The insert ends all the
    # same (chDB: its handle is free again, or every later insert on it is refused), and
    # later inserts in parts work, more of them than the store has handles for.
    store.execute("CREATE TABLE refused (a UInt64, b String) ENGINE = MergeTree ORDER BY a")
    good = b"[" + b",".join(b'{"a":%d,"b":"%s"}' % (i, b"x" * 100) for i in range(20_000)) + b"]"
    insert = store.open_insert("refused", {})  # type: ignore[attr-defined]
    with pytest.raises(StoreError):
        try:
            insert.append(good)
            insert.append(b'[{"a":"not a number","b":"x"}]')
        except StoreError:
            insert.cancel()  # as StoreStream does after a failed feed
            raise
        time.sleep(0.5)  # parsed meanwhile: the error comes with the end's "]"
        insert.finish()
    for n in range(3):
        insert = store.open_insert("refused", {})  # type: ignore[attr-defined]
        insert.append(b'[{"a":%d,"b":"y"}]' % n)
        insert.finish()
    assert store.query("SELECT count() AS n FROM refused")[0]["n"] == 3
