"""Hook specifications: one stub per hook, saying what it is for and how results combine.

pluggy runs no coroutines: where a hook says it may return an awaitable, the caller awaits it.
Anything that does I/O is an object returned once by a `register_*` hook, so the framework
owns its timeouts, retries and error isolation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.routing import BaseRoute

    from .auth import Principal
    from .delivery.writer import Sink
    from .quota import QuotaDecision
    from .settings import Settings
    from .store.base import Store

# An async function run beside the server for its whole life (register_background_tasks).
BackgroundTask = Callable[[], Awaitable[None]]

hookspec = pluggy.HookspecMarker("watchllm")
hookimpl = pluggy.HookimplMarker("watchllm")


@hookspec(firstresult=True)
def authenticate(token: str, request: Request | None) -> Principal | None:
    """Turn the bearer token of a request into a Principal (project id and scopes).

    First non-None wins. Return None for "not my kind of token"; the request is then refused
    with 401 if no implementation recognises it. The built-in implementation (trylast) looks
    the key up in the key file.
    """


@hookspec
def check_quota(
    principal: Principal, n_events: int, user_id: str | None, route: str | None
) -> QuotaDecision | Awaitable[QuotaDecision | None] | None:
    """Allow or deny work for this principal before it is done.

    Two callers: ingestion asks before validating `n_events` (>= 1) more events (`user_id`
    and `route` are None); the host middleware asks before a host request's handler runs,
    with `n_events=0`, the request's user (or None) and its route template (a budget check:
    "has this user spent their daily USD?"). The server's own events (Guardian's alerts) are
    not asked about. An implementation declares only the arguments it needs. Implementations
    are awaited in order; the first denial wins and is answered 429 with its Retry-After and
    rate-limit headers (the ones after it are not run). Return None (or an allowing decision)
    to let the work through.
    """


@hookspec
def refund_quota(principal: Principal, n_events: int) -> Awaitable[None] | None:
    """Give back `n_events` that a `check_quota` of ingestion allowed but that were not
    accepted: the invalid events of a 207, all of a batch refused after the check (422, 403,
    503). Usage then counts accepted events only. Every implementation is called (an
    awaitable result is awaited); one that counts nothing ignores it.
    """


@hookspec
def validate_event(
    event: Any, principal: Principal
) -> Sequence[str | Mapping[str, str]] | str | Mapping[str, str] | None:
    """Add rules to the schema. Return a problem (or a list of problems) to reject the event:
    a string about the whole event, or `{"field": "metadata.user_id", "message": "..."}` to
    name the field, as the schema's own problems do.

    Every result is used: any problem from any implementation rejects that event, and the
    answer names each problem under the event's index. Called only for events that passed
    the schema. Must not do I/O.
    """


@hookspec
def transform_events(events: list[Any], principal: Principal) -> None:
    """Change accepted events before they are handed to the writer (redaction, enrichment,
    cost). Implementations change the events (or the list) in place; each sees the result of
    the ones called before it. The return value is ignored. Must not do I/O.
    """


@hookspec
def transform_spans(spans: list[Any], principal: Principal) -> None:
    """Change the OpenTelemetry span rows of one request before they are spooled (redaction,
    counting). Each row is a `watchllm_ext.otel.rows.SpanRow`, a msgspec struct read and set by
    attribute, the `spans` table's columns: project_id, trace_id, span_id, parent_span_id,
    name, kind, start_time, end_time (datetimes, UTC), duration_ms, status_code,
    status_message, service_name, scope_name, scope_version, event_type (the v1 event the span
    also became, or None), attributes and resource_attributes (dicts of str to str: every
    value as its text), span_events and links (JSON text), ingested_at. Keep each field's
    type. Implementations change the rows' fields in place, not the list; each sees the result
    of the ones called before it. The return value is ignored. Called after the spans' events
    went through `validate_event` and `transform_events` (a span whose event was refused is
    not in the list), only when some plugin implements it, always in the server's process
    (possibly on a worker thread: thread-safe, no I/O).
    """


@hookspec(firstresult=True)
def register_store(settings: Settings) -> Store | None:
    """Return the Store (migrate, insert, query) that the app reads and writes.

    Called once at start; first non-None wins. The embedded chDB store is registered with
    trylast so that a plugin naming another store (a ClickHouse server) takes precedence.
    """


@hookspec
def register_sinks(settings: Settings, store: Store | None) -> Sequence[Sink] | Sink | None:
    """Return the sinks that every accepted batch is delivered to.

    Called once at start; every result is used. Each sink gets every batch, at its own pace,
    with retries; one failing sink does not hold back the others or the HTTP path.
    """


@hookspec
def register_routes(settings: Settings) -> Sequence[BaseRoute] | None:
    """Return extra Starlette routes to add to the app. Called once at start; every result is
    used. Routes are added after the built-in ones, under the same prefix when mounted.
    """


@hookspec
def register_background_tasks(
    settings: Settings, store: Store | None
) -> Sequence[BackgroundTask] | BackgroundTask | None:
    """Return async functions (no arguments) to run beside the server for its whole life.

    Called once at start, after the store is open and migrated (if the store was down at
    start, its schema is applied once it is back: a task must tolerate StoreError meanwhile);
    every result is used. Each
    task runs in the app's task group and is cancelled at shutdown. A task that raises is
    logged and started again after 1 s, doubled at each failure in a row up to 300 s; it
    never stops the server. Blocking work belongs in
    `anyio.to_thread.run_sync`. Work that must be done before the first request (a first
    sync) can be done in the hook itself.
    """


@hookspec(firstresult=True)
def feature_enabled(
    name: str, principal: Principal, user_id: str | None, default: bool
) -> bool | None:
    """Is feature flag `name` on for this principal's project (and `user_id`, when the caller
    has one)? First non-None wins; return None for a flag you do not know. The built-in
    provider (settings and the flags file, trylast) answers last. Called on the event loop,
    possibly per request: must not do network I/O (providers evaluate a local copy).
    Callers use `watchllm_ext.flags.feature_enabled`, which caches the value per request.
    """


@hookspec
def on_alert(alert: Any) -> Awaitable[None] | None:
    """A Guardian rule fired or recovered: `alert` is a `watchllm_ext.guardian.Alert`
    (`state` "firing" or "recovered", the rule, project, subject and figures). Called once per
    episode start and once at its recovery; every implementation is called (an awaitable
    result is awaited), and one that raises is logged without stopping the others.
    """
