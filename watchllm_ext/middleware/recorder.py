"""The per-request recorder handlers use, and the outbox that takes events into WatchLLM.

A handler reaches its request's recorder as `request.state.watchllm`, through the FastAPI
dependency (`dependency.py`), or from any code the request runs with `current_recorder()`.
What it records joins the request's run, nested under the request's summary event.

Recording never waits: events go into an in-memory outbox that a background task hands to
`WatchLLM.ingest` in batches (the same validation, hooks and spool as POST /v1/events/batch)
every `flush_interval_s`. So a host request pays for building a dict, not for an ingest.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from random import getrandbits as _bits
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import Problem
from ..schema import EVENT_ADAPTER
from ..sdk.context import RunContext

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


class Outbox:
    """Events waiting to be ingested, bounded; the middleware's owner flushes it every
    `interval_s` (asgi.py, `_Owner`)."""

    def __init__(self, max_events: int = 100_000, interval_s: float = 0.1) -> None:
        self.max_events = max_events
        self.interval_s = interval_s
        # A deque: handlers in worker threads append while the loop takes batches off the
        # front (append and popleft are atomic; a list swapped for a new one could lose one).
        self._events: deque[dict[str, Any]] = deque()
        # What happened to the events, for tests, the docs' figures and a host's own metrics.
        self.stats = {"ingested": 0, "rejected": 0, "dropped": 0}

    def put(self, event: dict[str, Any]) -> None:
        if len(self._events) >= self.max_events:
            # WatchLLM is slower than the host (or stopped): drop rather than grow without
            # bound; counted, and logged once per flush.
            self.stats["dropped"] += 1
            return
        self._events.append(event)

    def __len__(self) -> int:
        return len(self._events)

    async def flush(self, wl: WatchLLM, principal: Principal) -> None:
        """Hand everything waiting to WatchLLM (several batches if it holds more than one
        request may carry)."""
        limit = wl.settings.max_batch_events
        events = self._events
        while events:
            batch = [events.popleft() for _ in range(min(limit, len(events)))]
            try:
                answer = await wl.ingest(principal, batch)
            except Problem as exc:
                n_bad = len(exc.extra.get("rejected") or ())
                key = "rejected" if exc.status == 422 else "dropped"
                self.stats[key] += len(batch) if key == "dropped" else n_bad
                log.warning("WatchLLM refused %d recorded events: %s", len(batch), exc.body())
                continue
            self.stats["ingested"] += answer["accepted"]
            rejected = answer.get("rejected") or []
            if rejected:
                self.stats["rejected"] += answer.get("rejected_count", len(rejected))
                log.warning("WatchLLM refused recorded events: %s", rejected[:3])


def _now() -> datetime:
    return datetime.now(UTC)


class Recorder:
    """What one host request records: its LLM calls, tool calls, errors, any v1 event.

    Every event gets the request's `run_id`, nests under the request's summary event
    (`parent_event_id` = `event_id`), carries the request's user, and is checked against the
    event contract at once (a bad field raises ValueError naming it, in the handler, rather
    than being refused later where nobody sees it).
    """

    __slots__ = (
        "_outbox",
        "calls",
        "context",
        "cost_usd",
        "event_id",
        "metadata",
        "run_id",
        "session_id",
        "tags",
        "tokens_input",
        "tokens_output",
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
        self.calls = 0
        self.tokens_input = 0
        self.tokens_output = 0
        self.cost_usd = 0.0
        self._outbox = outbox

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
        try:
            EVENT_ADAPTER.validate_python(event)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"][1:]) or "(event)"
            raise ValueError(f"{event_type} event: {where}: {first['msg']}") from None
        if event_type == "prompt_call":
            self.calls += 1
            self.tokens_input += event.get("tokens_input") or 0
            self.tokens_output += event.get("tokens_output") or 0
            self.cost_usd += event.get("cost_estimate_usd") or 0.0
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
