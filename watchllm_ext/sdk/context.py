"""The run context shared by the SDK, the host middleware and the OpenTelemetry exporter.

One context variable holds the run the current code is part of: the SDK's `run()` and
`@observe` set it, the host middleware sets it for each request, and every event logged
meanwhile takes its `run_id` and `parent_event_id` from it. Context variables follow asyncio
tasks and `contextvars.copy_context()`, so nesting survives both.

It also knows the WatchLLM apps running in this process (`local_apps()`): an SDK client inside
a host app that mounts WatchLLM delivers to one of them with no HTTP hop. And it knows those
clients (`local_senders()`), so that an app stopping can have them deliver what they hold
while it still takes events.

Imports only the standard library: the SDK must stay light.
"""

from __future__ import annotations

import math
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol


class RunTally:
    """The LLM calls logged in a run context, counted as they are logged: the host middleware
    gives each request one, and its summary event reports the calls made inside the request.

    Whoever logs an event in a context that has a tally calls `count(event)` (the SDK's
    log calls and the middleware's recorder do); the context's children share it. A lock:
    a sync handler's threads and the event loop may log into one request at once.
    """

    __slots__ = (
        "_lock",
        "calls",
        "cost_usd",
        "events",
        "tokens_input",
        "tokens_output",
        "unpriced",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events = 0  # events of any type
        self.calls = 0  # prompt_call events
        self.tokens_input = 0
        self.tokens_output = 0
        self.cost_usd = 0.0  # the calls' own cost_estimate_usd
        # (provider, model, tokens_input, tokens_output) of the calls that gave no cost, as
        # given: the server prices them from the model (the summary does the same).
        self.unpriced: list[tuple[Any, Any, Any, Any]] = []

    def count(self, event: Mapping[str, Any]) -> None:
        """Count one event (a dict of the v1 contract). Values of the wrong type are not
        added up: the event itself is refused or reported by validation, not here."""
        with self._lock:
            self.events += 1
            if event.get("event_type") != "prompt_call":
                return
            self.calls += 1
            tokens_in = event.get("tokens_input")
            if type(tokens_in) is int and tokens_in > 0:
                self.tokens_input += tokens_in
            tokens_out = event.get("tokens_output")
            if type(tokens_out) is int and tokens_out > 0:
                self.tokens_output += tokens_out
            cost = event.get("cost_estimate_usd")
            if type(cost) in (int, float) and math.isfinite(cost) and cost >= 0:
                self.cost_usd += cost
            elif len(self.unpriced) < 1000:  # bounded, whatever a request does
                self.unpriced.append(
                    (event.get("provider"), event.get("model"), tokens_in, tokens_out)
                )


@dataclass(frozen=True, slots=True)
class RunContext:
    """Where new events belong: their run, the event they nest under, and who they are for."""

    run_id: str
    parent_event_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    # Counts what is logged in this run (None: nobody asked); `child()` contexts share it.
    tally: RunTally | None = field(default=None, compare=False, repr=False)

    def child(self, parent_event_id: str) -> RunContext:
        """The context of work nested under the event `parent_event_id`."""
        return replace(self, parent_event_id=parent_event_id)


_current: ContextVar[RunContext | None] = ContextVar("watchllm_run", default=None)


def current_run() -> RunContext | None:
    """The run the calling code is part of, or None outside any run."""
    return _current.get()


@contextmanager
def use_run(context: RunContext) -> Iterator[RunContext]:
    """Make `context` the current run inside the block (restored after, even on error)."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def new_id() -> str:
    """A fresh id for a run or an event (32 hex digits, valid in every id field)."""
    return uuid.uuid4().hex


class LocalApp(Protocol):
    """A WatchLLM app running in this process (watchllm_ext.app.WatchLLM implements it)."""

    def ingest_from_thread(
        self, api_key: str, events: list[dict[str, Any]], timeout_s: float
    ) -> dict[str, Any]:
        """Ingest from a thread other than the app's event loop; the batch route's answer
        body, or `errors.Problem` where that route answers 4xx/503."""
        ...

    async def ingest_with_key(self, api_key: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        """The same, from a coroutine running on the app's own event loop."""
        ...


_apps: list[LocalApp] = []
_apps_lock = threading.Lock()
# Whether an app ever ran here: with none now, the SDK then says it stopped, not how to
# reach a server.
_ever_ran = False


def register_local_app(app: LocalApp) -> None:
    global _ever_ran
    with _apps_lock:
        _apps.append(app)
        _ever_ran = True


def unregister_local_app(app: LocalApp) -> None:
    with _apps_lock:
        if app in _apps:
            _apps.remove(app)


def local_apps() -> list[LocalApp]:
    """The WatchLLM apps running in this process, oldest first."""
    with _apps_lock:
        return list(_apps)


def local_app_ever_ran() -> bool:
    """Whether a WatchLLM app has run in this process (now or earlier)."""
    return _ever_ran


class LocalSender(Protocol):
    """A client delivering into the apps above (the SDK's `WatchLLM` on its in-process
    transport implements it)."""

    def flush_before_app_stops(self, max_s: float) -> bool:
        """Deliver what was logged so far, waiting at most `max_s` seconds (blocking: called
        from a thread, never the app's event loop, which must stay free to take the events).
        True when everything was settled."""
        ...


# Weak: a sender lives as long as its owner keeps it.
_senders: weakref.WeakSet[LocalSender] = weakref.WeakSet()


def register_local_sender(sender: LocalSender) -> None:
    with _apps_lock:
        _senders.add(sender)


def local_senders() -> list[LocalSender]:
    """The clients that deliver into the apps running in this process: the app they deliver
    to flushes them before it stops taking events (through this list: the app needs nothing
    of the SDK's client, and the client nothing of the server)."""
    with _apps_lock:
        return list(_senders)
