"""The run context shared by the SDK, the host middleware and the OpenTelemetry exporter.

One context variable holds the run the current code is part of: the SDK's `run()` and
`@observe` set it, the host middleware sets it for each request, and every event logged
meanwhile takes its `run_id` and `parent_event_id` from it. Context variables follow asyncio
tasks and `contextvars.copy_context()`, so nesting survives both.

It also knows the WatchLLM apps running in this process (`local_apps()`): an SDK client inside
a host app that mounts WatchLLM delivers to one of them with no HTTP hop.

Imports only the standard library: the SDK must stay light.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class RunContext:
    """Where new events belong: their run, the event they nest under, and who they are for."""

    run_id: str
    parent_event_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

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


def register_local_app(app: LocalApp) -> None:
    with _apps_lock:
        _apps.append(app)


def unregister_local_app(app: LocalApp) -> None:
    with _apps_lock:
        if app in _apps:
            _apps.remove(app)


def local_apps() -> list[LocalApp]:
    """The WatchLLM apps running in this process, oldest first."""
    with _apps_lock:
        return list(_apps)
