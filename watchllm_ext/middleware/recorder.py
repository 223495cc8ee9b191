"""The per-request recorder handlers use, and the outbox that takes events into WatchLLM.

A handler reaches its request's recorder as `request.state.watchllm`, through the FastAPI
dependency (`dependency.py`), or from any code the request runs with `current_recorder()`.
What it records joins the request's run, nested under the request's summary event.

Recording never waits: events go into an in-memory outbox that a background task hands to
`WatchLLM.ingest` in batches (the same validation, hooks and spool as POST /v1/events/batch)
every `flush_interval_s`. So a host request pays for building a dict, not for an ingest; the
dicts are plain JSON data, which `WatchLLM.ingest` validates with the request body's fast
validator (ingest/inprocess.py) rather than pydantic. A flush hands them over `batch_events` at a
time and lets the event loop run between batches: validating and spooling an event costs the
loop about 8 us, so one batch holds the host's requests up for a fraction of a millisecond
however many requests the last interval saw (the cost per event is the same from 16 events a
batch up, see docs/EMBEDDING.md).

Request summaries wait longer than recorded events. Each store insert has a large fixed cost
(tens of milliseconds of chDB CPU whatever its size, docs/EMBEDDING.md), so a host whose
requests record nothing would otherwise cause one insert per writer flush for summaries
alone. A summary therefore goes with the next flush that hands over anything else (it then
joins an insert that happens anyway) and otherwise at least every `summary_interval_s` (5 s,
the delay OpenTelemetry's batch span processor uses too); 10,000 waiting go at once.

What the outbox holds is not lost: a batch WatchLLM cannot take now (503: the writer is
full, or not running yet) stays in the outbox for the next flush; the owner's stop drains it
into WatchLLM (whose writer then flushes to the store, or leaves it in the spool for the next
start). Only these are not stored, each counted in `Outbox.stats` and logged: events past
`max_events` while WatchLLM cannot keep up, and batches WatchLLM refused otherwise or failed
on (a plugin that raised: `dropped`), events the contract refuses (`rejected`), and events
recorded after the final drain (`late`: a request still running when the host's shutdown had
already stopped WatchLLM).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from random import getrandbits as _bits
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from pydantic import ValidationError

from ..errors import Problem
from ..ingest.inprocess import plain_events
from ..schema import EVENT_ADAPTER
from ..sdk.context import RunContext, RunTally

if TYPE_CHECKING:
    from ..app import WatchLLM
    from ..auth import Principal

log = logging.getLogger("watchllm.middleware")

_current: ContextVar[Recorder | None] = ContextVar("watchllm_recorder", default=None)


def fast_id() -> str:
    """A fresh run or event id, 32 hex digits like `sdk.context.new_id()`, without its
    uuid4 (an os.urandom call): ids must be unique, not secret, and this is per request."""
    return f"{_bits(128):032x}"


def current_recorder() -> Recorder | None:
    """The recorder of the host request the calling code runs for (None outside one)."""
    return _current.get()


@contextmanager
def use_recorder(recorder: Recorder) -> Iterator[Recorder]:
    token = _current.set(recorder)
    try:
        yield recorder
    finally:
        _current.reset(token)


class Deferred(Protocol):
    """An event kept in another form until it is handed over (the middleware's summaries:
    plain values, which the garbage collector does not scan); `event()` builds it."""

    def event(self) -> dict[str, Any]: ...


class Outbox:
    """Events waiting to be ingested, bounded; the middleware's owner flushes it every
    `interval_s` (asgi.py, `_Owner`). An item is an event (a dict) or a `Deferred` one.

    Two queues: `put(event)` for what handlers record (handed over at every flush) and
    `put(summary, summary=True)` for the requests' summaries (handed over with the next
    flush that has anything else to hand over, else at least every `summary_interval_s`, or
    once `max_summaries` wait): see the module's docstring for why."""

    def __init__(
        self,
        max_events: int = 100_000,
        interval_s: float = 0.1,
        batch_events: int = 32,
        summary_interval_s: float = 5.0,
        max_summaries: int = 10_000,
    ) -> None:
        self.max_events = max_events
        self.interval_s = interval_s
        # Events per WatchLLM.ingest call: the event loop runs between two calls.
        self.batch_events = batch_events
        self.summary_interval_s = summary_interval_s
        self.max_summaries = max_summaries
        # Deques: handlers in worker threads append while the loop takes batches off the
        # front (append and popleft are atomic; a list swapped for a new one could lose one).
        self._events: deque[dict[str, Any] | Deferred] = deque()
        self._summaries: deque[dict[str, Any] | Deferred] = deque()
        # When the summaries were last handed over (monotonic seconds).
        self._summaries_at = time.monotonic()
        # What happened to the events, for tests, the docs' figures and a host's own metrics.
        self.stats = {"ingested": 0, "rejected": 0, "dropped": 0, "late": 0}
        # Set after the owner's final drain: nothing will flush what comes in afterwards.
        self.closed = False

    def put(self, event: dict[str, Any] | Deferred, summary: bool = False) -> None:
        if self.closed:
            self.stats["late"] += 1
            if self.stats["late"] == 1:
                log.warning("an event was recorded after WatchLLM stopped: not stored")
            return
        if len(self._events) + len(self._summaries) >= self.max_events:
            # WatchLLM is slower than the host (or stopped): drop rather than grow without
            # bound; counted, and logged once per flush.
            self.stats["dropped"] += 1
            return
        (self._summaries if summary else self._events).append(event)

    def __len__(self) -> int:
        return len(self._events) + len(self._summaries)

    @property
    def recorded(self) -> int:
        """How many recorded events (not summaries) wait."""
        return len(self._events)

    def waiting(self) -> list[dict[str, Any] | Deferred]:
        """What waits now, recorded events first (a copy; for tests and diagnostics)."""
        return [*self._events, *self._summaries]

    def summaries_due(self) -> bool:
        """Whether the periodic flush hands the summaries over too (see the class)."""
        return bool(self._summaries) and (
            bool(self._events)
            or len(self._summaries) >= self.max_summaries
            or time.monotonic() - self._summaries_at >= self.summary_interval_s
        )

    async def flush(self, wl: WatchLLM, principal: Principal, summaries: bool = True) -> bool:
        """Hand the recorded events and (with `summaries`) the summaries waiting to WatchLLM,
        `batch_events` at a time, the host's requests running between batches. False when
        WatchLLM cannot take events now (503): that batch is put back, in order, for the
        next flush."""
        if summaries:
            self._summaries_at = time.monotonic()
        limit = min(self.batch_events, wl.settings.max_batch_events)
        first = True
        for events in (self._events, self._summaries) if summaries else (self._events,):
            while events:
                if not first:
                    # Each ingest call runs on the event loop without a break until it awaits
                    # its spool fsync (with spool_fsync = never it never waits): let requests in.
                    await anyio.sleep(0)
                first = False
                taken = [events.popleft() for _ in range(min(limit, len(events)))]
                try:
                    batch = [e if isinstance(e, dict) else e.event() for e in taken]
                    answer = await wl.ingest(principal, batch)
                except Problem as exc:
                    if exc.status == 503:  # the writer is full or not running: later, not lost
                        events.extendleft(reversed(batch))
                        log.warning("WatchLLM cannot take recorded events now: %s", exc.message)
                        return False
                    n_bad = len(exc.extra.get("rejected") or ())
                    key = "rejected" if exc.status == 422 else "dropped"
                    self.stats[key] += len(batch) if key == "dropped" else n_bad
                    log.warning("WatchLLM refused %d recorded events: %s", len(batch), exc.body())
                    continue
                except Exception as exc:
                    # A plugin that raises (transform_events, say) or a bug: the same events
                    # fail the same way again, so a retry would only hold back everything
                    # behind them. Dropped, counted and logged (what can heal is a 503, above).
                    self.stats["dropped"] += len(taken)
                    log.error(
                        "WatchLLM failed on %d recorded events, dropped: %r",
                        len(taken),
                        exc,
                        exc_info=exc,
                    )
                    continue
                self.stats["ingested"] += answer["accepted"]
                rejected = answer.get("rejected") or []
                if rejected:
                    self.stats["rejected"] += answer.get("rejected_count", len(rejected))
                    log.warning("WatchLLM refused recorded events: %s", rejected[:3])
        return True


def _now() -> datetime:
    return datetime.now(UTC)


class Recorder:
    """What one host request records: its LLM calls, tool calls, errors, any v1 event.

    Every event gets the request's `run_id`, nests under the request's summary event
    (`parent_event_id` = `event_id`), carries the request's user, and is checked against the
    event contract at once (a bad field raises ValueError naming it, in the handler, rather
    than being refused later where nobody sees it). Its calls are counted in the request's
    `RunTally`, with those the SDK logs in the request's run.
    """

    __slots__ = (
        "_outbox",
        "context",
        "event_id",
        "metadata",
        "run_id",
        "session_id",
        "tags",
        "tally",
        "user_id",
    )

    def __init__(self, context: RunContext, event_id: str, outbox: Outbox | None) -> None:
        self.context = context
        self.run_id = context.run_id
        self.event_id = event_id  # the request's summary event, recorded when it ends
        self.user_id = context.user_id
        self.session_id = context.session_id
        self.tags: list[str] = list(context.tags)
        self.metadata: dict[str, Any] = {}  # added to the summary event's metadata
        # The request's counts: shared with the SDK through the run context.
        self.tally = context.tally if context.tally is not None else RunTally()
        self._outbox = outbox

    # The request's LLM calls so far (this recorder's and the SDK's).
    @property
    def calls(self) -> int:
        return self.tally.calls

    @property
    def tokens_input(self) -> int:
        return self.tally.tokens_input

    @property
    def tokens_output(self) -> int:
        return self.tally.tokens_output

    @property
    def cost_usd(self) -> float:
        """The calls' own `cost_estimate_usd` (the summary adds the price of the others)."""
        return self.tally.cost_usd

    def record(self, event_type: str, **fields: Any) -> str:
        """Record one event of the v1 contract (docs/EVENTS.md); returns its event_id."""
        event: dict[str, Any] = {
            "event_type": event_type,
            "event_id": fast_id(),
            "run_id": self.run_id,
            "parent_event_id": self.event_id,
            "timestamp": _now(),
        }
        if self.user_id is not None:
            event["user_id"] = self.user_id
        if self.session_id is not None:
            event["session_id"] = self.session_id
        event.update(fields)
        # The body validator when it can judge the event (plain JSON data), else pydantic,
        # which also says which field is wrong.
        if plain_events([event]) is None:
            try:
                EVENT_ADAPTER.validate_python(event)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"][1:]) or "(event)"
                raise ValueError(f"{event_type} event: {where}: {first['msg']}") from None
        if event["run_id"] == self.run_id:
            self.tally.count(event)
        if self._outbox is not None:
            self._outbox.put(event)
        return event["event_id"]

    def prompt_call(self, model: str, **fields: Any) -> str:
        """An LLM call made for this request (prompt, response, tokens, latency_ms, ...).
        Its cost is computed from the model's price when `cost_estimate_usd` is not given."""
        return self.record("prompt_call", model=model, **fields)

    def tool_call(self, tool_name: str, **fields: Any) -> str:
        return self.record("tool_call", tool_name=tool_name, **fields)

    def error(self, error: BaseException | str, **fields: Any) -> str:
        """An error the handler caught (an uncaught one is on the summary already)."""
        if isinstance(error, BaseException):
            fields.setdefault("error_type", type(error).__name__)
            message = str(error) or type(error).__name__
        else:
            fields.setdefault("error_type", "error")
            message = error
        return self.record("error", error_message=message[:10_000], **fields)
