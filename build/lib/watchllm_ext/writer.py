"""The in-process batch writer: accepted events in, batches out to every sink.

HTTP handlers know only `submit(events)`; sinks know only `write(batch)`. Between them the
writer owns a bounded buffer of sealed batches and one delivery task per sink, each with its
own cursor over the batches (the shape a disk spool takes later: the buffer becomes segment
files, the cursors become committed positions). A batch is dropped from memory once every
sink's cursor has passed it. A failing sink is retried with exponential backoff and jitter
and never blocks `submit` or the other sinks; when the buffer is full, `submit` refuses
(the HTTP layer answers 503 with Retry-After) instead of growing.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anyio

log = logging.getLogger("watchllm.writer")


@runtime_checkable
class Sink(Protocol):
    """Where batches go. `write` raises to have the batch retried; raise SinkError with
    permanent=True for a batch that can never be written."""

    name: str

    async def write(self, events: Sequence[Any]) -> None: ...


class SinkError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class WriterFull(Exception):
    """The buffer cannot take these events now; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the writer's buffer is full")
        self.retry_after_s = retry_after_s


class WriterClosed(Exception):
    """The writer is not running (not started yet, or shutting down)."""


@dataclass(slots=True)
class _Batch:
    seq: int
    events: list[Any]


@dataclass(slots=True)
class SinkState:
    sink: Sink
    cursor: int = 0  # seq of the next batch to deliver
    delivered_events_total: int = 0
    delivered_batches_total: int = 0
    retries_total: int = 0
    dropped_events_total: int = 0
    last_error: str | None = None
    failing_since: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BatchWriter:
    def __init__(
        self,
        sinks: Sequence[Sink],
        *,
        flush_max_events: int = 10_000,
        flush_interval_s: float = 1.0,
        buffer_max_events: int = 500_000,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 30.0,
        shutdown_grace_s: float = 30.0,
    ) -> None:
        self.flush_max_events = flush_max_events
        self.flush_interval_s = flush_interval_s
        self.buffer_max_events = buffer_max_events
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.shutdown_grace_s = shutdown_grace_s
        self.sinks = [SinkState(sink) for sink in sinks]
        self._open: list[Any] = []
        self._open_since = 0.0
        self._sealed: deque[_Batch] = deque()
        self._next_seq = 0
        self._pending_events = 0
        self._running = False
        self._accepting = False
        self._changed = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self.accepted_events_total = 0
        self.lost_at_shutdown_total = 0

    # --- the narrow interface ---------------------------------------------------------------

    def submit(self, events: Sequence[Any]) -> None:
        """Take ownership of validated events. Raises WriterFull or WriterClosed; never blocks."""
        if not self._accepting:
            raise WriterClosed("the writer is not running")
        n = len(events)
        if self._pending_events + n > self.buffer_max_events:
            raise WriterFull(self._retry_after_estimate())
        was_empty = not self._open
        if was_empty:
            self._open_since = time.monotonic()
        self._open.extend(events)
        self._pending_events += n
        self.accepted_events_total += n
        if len(self._open) >= self.flush_max_events:
            self._seal()
        elif was_empty:
            self._notify()  # start the flush timer

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every event submitted before this call reached every sink.

        Returns False if `timeout_s` passed first.
        """
        self._seal()
        target = self._next_seq
        with anyio.move_on_after(timeout_s) as scope:
            while self.sinks and min(s.cursor for s in self.sinks) < target:
                await self._wait_change()
        return not scope.cancelled_caught

    async def close(self) -> None:
        """Stop accepting, give sinks `shutdown_grace_s` to take what is buffered, stop."""
        self._accepting = False
        if not self._running:
            return
        delivered = await self.flush(self.shutdown_grace_s)
        if not delivered:
            self.lost_at_shutdown_total = self._pending_events
            log.error(
                "shutdown grace of %.1fs ran out with %d events not yet delivered to every sink",
                self.shutdown_grace_s,
                self._pending_events,
            )
        self._running = False
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    # --- running ----------------------------------------------------------------------------

    async def __aenter__(self) -> BatchWriter:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._running = True
        self._accepting = True
        self._task_group.start_soon(self._flush_timer)
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
        return result

    @property
    def running(self) -> bool:
        return self._running

    @property
    def pending_events(self) -> int:
        return self._pending_events

    def stats(self) -> dict[str, Any]:
        newest = self._next_seq
        return {
            "running": self._running,
            "accepting": self._accepting,
            "pending_events": self._pending_events,
            "buffer_max_events": self.buffer_max_events,
            "accepted_events_total": self.accepted_events_total,
            "sinks": {
                s.sink.name: {
                    "lag_batches": newest - s.cursor,
                    "delivered_events_total": s.delivered_events_total,
                    "retries_total": s.retries_total,
                    "dropped_events_total": s.dropped_events_total,
                    "last_error": s.last_error,
                    "failing_for_s": (
                        round(time.monotonic() - s.failing_since, 3) if s.failing_since else 0.0
                    ),
                }
                for s in self.sinks
            },
        }

    # --- internals --------------------------------------------------------------------------

    def _seal(self) -> None:
        if not self._open:
            return
        if not self.sinks:  # nowhere to deliver: nothing to keep
            self._pending_events -= len(self._open)
            self._open = []
            return
        self._sealed.append(_Batch(self._next_seq, self._open))
        self._next_seq += 1
        self._open = []
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _retry_after_estimate(self) -> float:
        failing = [s for s in self.sinks if s.failing_since is not None]
        return min(self.retry_max_s, 5.0) if failing else 1.0

    async def _flush_timer(self) -> None:
        while True:
            if self._open:
                due = self._open_since + self.flush_interval_s - time.monotonic()
                if due <= 0:
                    self._seal()
                    continue
                with anyio.move_on_after(due):
                    await self._wait_change()
            else:
                await self._wait_change()

    def _batch_at(self, seq: int) -> _Batch | None:
        if not self._sealed:
            return None
        index = seq - self._sealed[0].seq
        return self._sealed[index] if 0 <= index < len(self._sealed) else None

    async def _deliver(self, state: SinkState) -> None:
        while True:
            batch = self._batch_at(state.cursor)
            if batch is None:
                await self._wait_change()
                continue
            await self._write_with_retry(state, batch)
            state.cursor = batch.seq + 1
            self._release_passed()
            self._notify()

    async def _write_with_retry(self, state: SinkState, batch: _Batch) -> None:
        attempt = 0
        while True:
            try:
                await state.sink.write(batch.events)
            except Exception as exc:
                permanent = bool(getattr(exc, "permanent", False))
                state.last_error = f"{type(exc).__name__}: {exc}"[:500]
                if permanent:
                    state.dropped_events_total += len(batch.events)
                    log.error(
                        "sink %s refused a batch of %d events for good: %s",
                        state.sink.name,
                        len(batch.events),
                        state.last_error,
                    )
                    state.failing_since = None
                    return
                if state.failing_since is None:
                    state.failing_since = time.monotonic()
                    log.warning("sink %s failed, retrying: %s", state.sink.name, state.last_error)
                state.retries_total += 1
                attempt += 1
                # Full jitter: spread retries so a recovering store is not hit all at once.
                cap = min(self.retry_max_s, self.retry_initial_s * math.pow(2, attempt - 1))
                await anyio.sleep(random.uniform(cap / 2, cap))
                continue
            if state.failing_since is not None:
                log.info("sink %s recovered after %d retries", state.sink.name, attempt)
            state.failing_since = None
            state.delivered_events_total += len(batch.events)
            state.delivered_batches_total += 1
            return

    def _release_passed(self) -> None:
        slowest = min(s.cursor for s in self.sinks)
        while self._sealed and self._sealed[0].seq < slowest:
            self._pending_events -= len(self._sealed.popleft().events)
