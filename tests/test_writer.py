"""The batch writer on its own: batching, per-sink pace, retries, back-pressure, shutdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from watchllm_ext.writer import BatchWriter, SinkError, WriterClosed, WriterFull


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

    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = anyio.Event()

    async def write(self, events: Sequence[Any]) -> None:
        await self.gate.wait()
        await super().write(events)


def run(fn: Any) -> Any:
    return anyio.run(fn)


def test_flushes_on_size_and_on_interval() -> None:
    async def main() -> None:
        sink = ListSink()
        async with BatchWriter([sink], flush_max_events=3, flush_interval_s=0.05) as writer:
            writer.submit([1, 2, 3, 4])  # seals one batch of 4 at once (size reached)
            await anyio.sleep(0.01)
            assert sink.batches == [[1, 2, 3, 4]]
            writer.submit([5])
            await anyio.sleep(0.2)  # the interval seals the partial batch
            assert sink.batches == [[1, 2, 3, 4], [5]]

    run(main)


def test_every_sink_gets_every_batch_and_a_slow_one_holds_back_no_other() -> None:
    async def main() -> None:
        fast, slow = ListSink("fast"), GatedSink()
        async with BatchWriter([fast, slow], flush_max_events=2, flush_interval_s=10) as writer:
            for i in range(5):
                writer.submit([i * 2, i * 2 + 1])
            assert await writer.flush(timeout_s=0.3) is False  # the slow sink holds the flush
            assert fast.events == list(range(10))
            assert slow.events == []
            assert writer.pending_events == 10  # kept until every sink has them
            slow.gate.set()
            assert await writer.flush(timeout_s=5)
            assert slow.events == list(range(10))
            assert writer.pending_events == 0

    run(main)


def test_failing_sink_is_retried_with_backoff() -> None:
    async def main() -> None:
        sink = FlakySink(failures=3)
        writer = BatchWriter([sink], flush_interval_s=0.01, retry_initial_s=0.01, retry_max_s=0.05)
        async with writer:
            writer.submit(["a", "b"])
            assert await writer.flush(timeout_s=5)
            stats = writer.stats()["sinks"]["flaky"]
        assert sink.events == ["a", "b"]
        assert stats["retries_total"] == 3
        assert stats["delivered_events_total"] == 2
        assert "store down" in stats["last_error"]

    run(main)


def test_permanent_error_drops_only_that_batch_and_counts_it() -> None:
    class Picky(ListSink):
        async def write(self, events: Sequence[Any]) -> None:
            if "poison" in events:
                raise SinkError("type mismatch", permanent=True)
            await super().write(events)

    async def main() -> None:
        sink = Picky("picky")
        async with BatchWriter([sink], flush_max_events=1) as writer:
            writer.submit(["poison"])
            writer.submit(["good"])
            assert await writer.flush(timeout_s=5)
            assert writer.stats()["sinks"]["picky"]["dropped_events_total"] == 1
        assert sink.events == ["good"]

    run(main)


def test_full_buffer_refuses_instead_of_growing() -> None:
    async def main() -> None:
        slow = GatedSink()
        async with BatchWriter([slow], buffer_max_events=5, flush_max_events=2) as writer:
            writer.submit([1, 2, 3])
            with pytest.raises(WriterFull) as caught:
                writer.submit([4, 5, 6])
            assert caught.value.retry_after_s >= 1
            writer.submit([4, 5])  # exactly at the cap is fine
            slow.gate.set()
            assert await writer.flush(timeout_s=5)
            writer.submit([6, 7, 8])  # room again once delivered
            assert await writer.flush(timeout_s=5)
        assert slow.events == [1, 2, 3, 4, 5, 6, 7, 8]

    run(main)


def test_close_flushes_and_then_refuses() -> None:
    async def main() -> ListSink:
        sink = ListSink()
        writer = BatchWriter([sink], flush_interval_s=60)
        async with writer:
            writer.submit(["x", "y"])
        with pytest.raises(WriterClosed):
            writer.submit(["z"])
        return sink

    assert run(main).events == ["x", "y"]


def test_shutdown_grace_bounds_close() -> None:
    async def main() -> BatchWriter:
        stuck = GatedSink()
        writer = BatchWriter([stuck], shutdown_grace_s=0.2)
        with anyio.fail_after(5):
            async with writer:
                writer.submit(["lost"])
        return writer

    writer = run(main)
    assert writer.lost_at_shutdown_total == 1
    assert not writer.running
