"""The ASGI app: `create_app(settings)` builds it; read this file top to bottom for the flow.

request -> authenticate (hook) -> quota (hook) -> read + parse + validate (ingest/)
        -> transform (hook) -> writer.submit (delivery/) -> 202 / 207
The store and the writer start with the app's lifespan (or the host's, when mounted: see
serving/hosting.py) and stop with it, flushing what is buffered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec
import pluggy
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route

from . import __version__
from .analytics.reads import StoreReads
from .analytics.routes import routes as analytics_routes
from .auth import Principal, Scope, bearer_token
from .delivery.dead_letters import (
    done,
    put_back,
    read_dead_letters,
    summary,
    take_dead_letters,
    targeted_payload,
)
from .delivery.spool import Spool
from .delivery.writer import (
    EventsJson,
    Log,
    MemoryLog,
    Sink,
    Writer,
    WriterClosed,
    WriterFull,
    WriterTooLarge,
)
from .errors import (
    Problem,
    answer_for,
    echo,
    not_a_project_id,
    other_project,
    problem_handler,
    unauthorized,
)
from .hookspecs import BackgroundTask
from .ingest.admission import BodyBudget, BodyBudgetMiddleware, wait_for_place
from .ingest.body import IngestHeaders, check_content_type, read_request_body
from .ingest.fast_validate import encode_events, read_stored
from .ingest.fill_in import receipt_time
from .ingest.inprocess import plain_events
from .ingest.lane import IngestLane, LaneApp
from .ingest.parse import parse_events_json
from .ingest.validate import (
    DETAILED_OFFLOAD_MIN_BYTES,
    MAX_REJECTIONS_LISTED,
    OFFLOAD_MIN_BYTES,
    Outcome,
    Rejection,
    batch_sent_as_event,
    body_items,
    check_projects,
    events_at,
    finish_fast,
    say_batch_route,
    validate_fast,
    validate_items,
    validate_sliced,
)
from .ingest.worker import decode_answer as decode_worker_answer
from .ingest.worker import encode_job, worker_twins
from .locks import FolderLock, FolderLocked, with_advice
from .observability.metrics import RequestMetrics, counting_rejections, ops_metrics, time_queries
from .observability.registry import make_registry, metrics_endpoint
from .observability.sentry import ensure_sentry
from .openapi import openapi_endpoint
from .otel.pool import map_in_worker
from .otel.rows import SpanRow
from .plugins import (
    CHOSEN_ANSWERS,
    PluginError,
    PluginFailed,
    answered_wrongly,
    call_hook,
    describe_plugins,
    each_result,
    get_plugin_manager,
    plugin_failed,
)
from .quota import QuotaDecision
from .route_params import Query, accepts, refuse_query
from .schema import PROJECT_ID_RE, require_server_filled
from .sdk.context import local_apps, local_senders, register_local_app, unregister_local_app
from .serving.tuning import freeze_startup_heap
from .settings import Settings, load_settings
from .slots import FairSlots
from .store import Store, apply_migrations
from .store.base import StoreError, StoreLockedError, StoreUnavailable
from .store.folders import DataFolderError, concerns, folder_error, open_store
from .store.retention import apply_payload_ttl

log = logging.getLogger("watchllm.app")

# The tables /v1/admin/count counts (by project): the event tables, not the store's others.
STORE_TABLES = ("events", "tool_calls", "agent_steps", "spans", "traces")
MAX_RUN_CHARS = 256  # /v1/admin/count's `run`: the schema's bound on an id
MAX_SINK_CHARS = 128  # /v1/admin/dead-letters' `sink`: far over any sink's name


_KEY_AUTH = "watchllm_ext.builtins.key_auth"  # its name in the plugin manager


@dataclass
class WatchLLM:
    """Everything one app instance holds; hung on `app.state.watchllm`."""

    settings: Settings
    pm: pluggy.PluginManager
    store: Store | None = None
    writer: Writer | None = None
    migrations_applied: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "rejected": 0})
    registry: Any = None
    openapi: dict[str, Any] | None = None
    _opened_store: Store | None = None
    # Big bodies in work at once (ingest_threads); made on first use, inside the event loop.
    _big_bodies: FairSlots | None = None
    # The event loop the app runs on, while it runs (for ingest_from_thread).
    _loop: asyncio.AbstractEventLoop | None = None
    _reads: StoreReads | None = None
    # Why the running app stopped on an error (the writer's tasks): /healthz is 503 with it,
    # so that a supervisor restarts a process that would otherwise answer 503 to every event.
    failed: str | None = None

    @property
    def reads(self) -> StoreReads:
        """The analytics API's store queries: their threads, shares and time limit."""
        if self._reads is None:
            s = self.settings
            self._reads = StoreReads(
                s.analytics_threads,
                s.analytics_queries_per_project,
                s.analytics_queue_timeout_s,
                s.analytics_query_timeout_s,
            )
        return self._reads

    def open_store(self) -> Store | None:
        """Open the store ahead of the lifespan (so the CLI can report a busy folder plainly).
        A data folder that cannot be used is a DataFolderError, one line naming it."""
        if self._opened_store is None:
            self._opened_store = open_store(self.pm, self.settings)
        return self._opened_store

    @asynccontextmanager
    async def running(self) -> AsyncIterator[WatchLLM]:
        """Open the store, apply migrations, start the writer; undo all of it on exit."""
        if self.writer is not None:
            raise RuntimeError("this WatchLLM app is already running")
        serving = False
        try:
            async with self._run() as running:
                serving = True
                yield running
        except Exception as exc:
            if not serving:  # a start that failed is said by the lifespan, in one line
                raise
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
                cause = cause.exceptions[0]  # a task group's: the error itself
            self.failed = f"{type(cause).__name__}: {cause}"[:500]
            log.error("WatchLLM stopped (%s): /healthz answers 503 until a restart", self.failed)
            raise

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[WatchLLM]:
        try:
            store = self.open_store()
        except (StoreLockedError, DataFolderError) as exc:
            raise _as_host_app(exc) from None
        self._opened_store = None
        try:
            schema_pending = False
            if store is not None:
                try:
                    await anyio.to_thread.run_sync(self._prepare_store, store)
                except StoreUnavailable as exc:
                    # Accept into the spool meanwhile; the store sink retries, and applies the
                    # schema itself before its first insert, until the store is back.
                    log.warning("%s: accepting events into the spool until it is back", exc)
                    schema_pending = True
            sinks: list[Sink] = _flatten(
                self.pm.hook.register_sinks(settings=self.settings, store=store)
            )
            _check_sinks(sinks)
            tasks = await anyio.to_thread.run_sync(self._background_tasks, store)
            if schema_pending and store is not None:
                tasks.insert(0, partial(self._prepare_when_back, store))
            if not sinks:
                log.warning("no sink is registered: accepted events will not be kept anywhere")
            s = self.settings
            try:
                log_, lock = _open_log(s)
            except (StoreLockedError, DataFolderError) as exc:
                raise _as_host_app(exc) from None
            try:
                writer = Writer(
                    sinks,
                    log_,
                    encode=_encode_events,
                    decode=_decode_events,
                    flush_max_events=s.flush_max_events,
                    flush_interval_s=s.flush_interval_s,
                    memory_max_events=s.buffer_max_events,
                    retry_initial_s=s.sink_retry_initial_s,
                    retry_max_s=s.sink_retry_max_s,
                    shutdown_grace_s=s.shutdown_grace_s,
                    sync_task=log_.sync_task() if isinstance(log_, Spool) else None,
                )
                self.store = store
                time_queries(self, store)  # /metrics: store query latency
                async with writer, anyio.create_task_group() as background:
                    self.writer = writer
                    for task in tasks:
                        background.start_soon(_run_background, task)
                    self._loop = asyncio.get_running_loop()
                    register_local_app(self)
                    if self.settings.gc_freeze_at_start:
                        freeze_startup_heap()  # no full collection of start-up objects
                    try:
                        yield self
                        # Stopping (not failing): SDK clients delivering here in process hand
                        # over what they hold while we still take it, then the writer flushes.
                        await self._flush_local_senders()
                    finally:
                        unregister_local_app(self)
                        self._loop = None
                        self.writer = None
                        background.cancel_scope.cancel()
            finally:
                log_.close()
                if lock is not None:
                    lock.release()
        finally:
            self.store = None
            if store is not None:
                store.close()

    async def _flush_local_senders(self) -> None:
        """Have the in-process SDK clients that deliver to this app (`local_senders`; they send
        to the first app of `local_apps`) deliver what they hold, each waiting at most its
        `flush_at_exit_s` and `shutdown_grace_s`. On threads: their events come in through
        this event loop, which must stay free meanwhile."""
        apps = local_apps()
        senders = local_senders()
        if not senders or not apps or apps[0] is not self:
            return
        grace = self.settings.shutdown_grace_s

        async def flush(sender: Any) -> None:
            try:
                done = await anyio.to_thread.run_sync(
                    sender.flush_before_app_stops, grace, abandon_on_cancel=True
                )
            except Exception:  # a client's bug must not keep the writer from flushing
                log.exception("flushing an in-process SDK client at shutdown failed")
                return
            if not done:
                log.warning("an in-process SDK client did not deliver everything before shutdown")

        async with anyio.create_task_group() as flushing:
            for sender in senders:
                flushing.start_soon(flush, sender)

    def _prepare_store(self, store: Store) -> None:
        self.migrations_applied = prepare_store(store, self.settings)

    async def _prepare_when_back(self, store: Store) -> None:
        """Apply the schema once a store that was down at start can be reached."""
        wait = self.settings.sink_retry_initial_s
        while True:
            await anyio.sleep(wait)
            try:
                await anyio.to_thread.run_sync(self._prepare_store, store)
            except StoreError as exc:
                if exc.permanent:
                    raise
                log.warning("applying the schema failed (%s); trying again", exc)
                wait = min(wait * 2, self.settings.sink_retry_max_s)
                continue
            log.info("the store is back: schema applied")
            return

    def _background_tasks(self, store: Store | None) -> list[BackgroundTask]:
        return _flatten(self.pm.hook.register_background_tasks(settings=self.settings, store=store))

    def authenticate(self, request: Request, scope: Scope | None) -> Principal:
        """The principal of the request's bearer key, which must have `scope` (None: any
        valid key): 401 without a key or with an unknown one, 403 without the scope."""
        return self.authenticate_header(request.headers.get("authorization"), scope, request)

    def authenticate_header(
        self, authorization: str | None, scope: Scope | None, request: Request | None = None
    ) -> Principal:
        """`authenticate`, from the value of the request's Authorization header."""
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("send your API key as 'Authorization: Bearer <key>'")
        return self.principal_for(token, scope, request)

    def unknown_key_message(self, what: str = "the API key") -> str:
        """A 401's words for a key no plugin knows. With the key file alone, the hint that a
        key belongs to the data folder it was made for: a key made with another --data-dir
        (or WATCHLLM_DATA_DIR) is a first run's most common 401."""
        names = [impl.plugin_name for impl in self.pm.hook.authenticate.get_hookimpls()]
        if self.settings.key_store == "file" and names == [_KEY_AUTH]:
            return (
                f"{what} is not valid (unknown or revoked); a key made with `watchllm keys"
                " create` is known to the servers on the data folder it was made in"
            )
        return f"{what} is not valid (unknown or revoked)"

    def principal_for(
        self,
        token: str,
        scope: Scope | None,
        request: Request | None = None,
        field: str = "Authorization",
    ) -> Principal:
        """The principal of a key (`authenticate` hook), checked as `authenticate` says;
        `field` names where the key came from in a 403."""
        principal = self.find_principal(token, request)
        if principal is None:
            raise unauthorized(self.unknown_key_message())
        if scope is not None and not principal.can(scope):
            raise Problem(
                403,
                "forbidden",
                f"this key has no {scope!r} scope (it has: {', '.join(sorted(principal.scopes))})",
                field=field,
            )
        return principal

    def find_principal(self, token: str | None, request: Request | None) -> Principal | None:
        """The `authenticate` hook's answer for `token` (None: no plugin knows it). An answer
        that is not a Principal of a valid project id is the plugin's failure (PluginFailed)."""
        principal = call_hook(self.pm.hook.authenticate, token=token, request=request)
        if principal is None:
            return None
        valid = isinstance(principal, Principal) and PROJECT_ID_RE.fullmatch(principal.project_id)
        if not valid:
            raise _not_a_principal(self.pm, principal)
        return principal

    async def check_quota(
        self,
        principal: Principal,
        n_events: int,
        user_id: str | None = None,
        route: str | None = None,
    ) -> None:
        """Ask every `check_quota` implementation; raise Problem 429 at the first denial."""
        # One implementation at a time: those after the first denial are not called (a
        # quota plugin must not count a batch refused anyway).
        hook = self.pm.hook.check_quota
        for impl, result in each_result(
            hook, principal=principal, n_events=n_events, user_id=user_id, route=route
        ):
            decision = await _awaited(hook.name, impl, result)
            if decision is not None and not isinstance(decision, QuotaDecision):
                why = f"it returned {type(decision).__name__}, not a QuotaDecision or None"
                raise answered_wrongly(hook, why, [impl])
            if decision is not None and not decision.allowed:
                ops_metrics(self).quota_denials.labels("host" if n_events == 0 else "ingest").inc()
                raise Problem(
                    429,
                    "quota_exceeded",
                    decision.reason,
                    headers=decision.headers(),
                    **dict(decision.extra or {}),
                )

    async def refund_quota(self, principal: Principal, n_events: int) -> None:
        """Give back (the `refund_quota` hook) events `check_quota` counted that were not
        accepted: usage counts accepted events only."""
        if n_events <= 0:
            return
        # Each is called whatever the others do: a refund comes after the answer is decided
        # (a 207's accepted events are in the spool), so a plugin's failure is logged only.
        arguments = {"principal": principal, "n_events": n_events}
        for impl in reversed(self.pm.hook.refund_quota.get_hookimpls()):
            try:
                result = impl.function(*[arguments[name] for name in impl.argnames])
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("plugin %r failed in its refund_quota hook", impl.plugin_name)

    async def ingest(
        self,
        principal: Principal,
        events: list[dict[str, Any]],
        received_at: datetime | None = None,
        *,
        quota: bool = True,
    ) -> dict[str, Any]:
        """Ingest events (dicts of the v1 contract) from inside the process, with no HTTP hop:
        the same count limit, quota, validation, hooks and spool as `POST /v1/events/batch`.

        Returns that route's answer body (`accepted`, `event_ids`, and `rejected` when some
        events were refused); raises `Problem` where the route answers 4xx or 503 (its
        `.status` and `.body()` say why). Used by the SDK's in-process transport, the host
        middleware and the OpenTelemetry in-process exporter. `quota=False` is for the
        server's own events (Guardian's alerts): not charged to, nor refused by, the
        `check_quota` of ingestion, whose callers are clients and the host middleware.
        """
        if not events:
            raise Problem(422, "empty_batch", "'events' holds no event", field="events")
        _check_count(self, len(events))
        check_projects(events, principal)
        if quota:
            await self.check_quota(principal, len(events))
        received = received_at or receipt_time()
        try:
            # Plain JSON data (what the middleware and the SDK build): the body validator, as
            # a request's events; anything else, or any invalid event, is pydantic's.
            structs = plain_events(events)
            if structs is not None:
                outcome = finish_fast(structs, principal, self.pm, received)
            else:
                outcome = validate_items(events, principal, self.pm, received)
            body = await _accept(self, outcome)
        except CHOSEN_ANSWERS:  # a plugin may answer with an HTTPException
            if quota:
                await self.refund_quota(principal, len(events))  # refused whole: nothing taken
            raise
        if quota and outcome.not_accepted:  # a 207's invalid events, those a plugin dropped
            await self.refund_quota(principal, outcome.not_accepted)
        return body

    async def ingest_with_key(self, api_key: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        """`ingest` for the holder of an API key (its project, its ingest scope), on this
        app's event loop: how an in-process SDK client delivers (sdk/context.py)."""
        principal = self.principal_for(api_key, "ingest", field="api_key")
        return await self.ingest(principal, events)

    def ingest_from_thread(
        self, api_key: str, events: list[dict[str, Any]], timeout_s: float
    ) -> dict[str, Any]:
        """`ingest_with_key` from another thread (an SDK worker): runs on the app's loop and
        waits at most `timeout_s` (TimeoutError after; the events may still be accepted)."""
        loop = self._loop
        if loop is None or self.writer is None:
            raise Problem(
                503, "not_running", "the app is not running", headers={"Retry-After": "5"}
            )
        future = asyncio.run_coroutine_threadsafe(self.ingest_with_key(api_key, events), loop)
        return future.result(timeout_s)

    async def submit(
        self, events: Sequence[Any] | EventsJson, spans: Sequence[SpanRow] = ()
    ) -> None:
        """Events (and OpenTelemetry span rows) into the spool: 503 when it cannot take them."""
        if self.writer is None:
            raise Problem(
                503,
                "not_running",
                "the writer is not running; a host app that mounts WatchLLM must run its "
                "lifespan (see watchllm_ext.lifespan)",
                headers={"Retry-After": "5"},
            )
        try:
            await self.writer.submit(events, spans)
        except (WriterTooLarge, WriterFull, WriterClosed) as exc:
            raise writer_refusal(exc) from None


def writer_refusal(exc: WriterTooLarge | WriterFull | WriterClosed, done: str = "") -> Problem:
    """The answer to a writer's refusal; `done`: what the request had done before it."""
    if isinstance(exc, WriterTooLarge):
        # Bigger than the whole spool: a retry never fits, so no 503 + Retry-After (which
        # SDKs and OpenTelemetry exporters retry for ever).
        return Problem(
            413,
            "payload_too_large",
            f"the request's events take {exc.size} bytes in the spool, more than all of"
            f" spool_max_bytes ({exc.limit} bytes); send them in smaller batches",
            field="body",
        )
    if isinstance(exc, WriterFull):
        return Problem(
            503,
            "overloaded",
            f"the server cannot take more events now ({exc}){done}; retry later",
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        )
    return Problem(
        503,
        "shutting_down",
        f"the server is shutting down{done}",
        headers={"Retry-After": "5"},
    )


# What a process that runs the app (a host app, under uvicorn) can do about a folder another
# process holds: it has no --url to ask that one with, and `watchllm serve` checks first.
HOST_APP_LOCKED = "stop that process, or give this app a data folder of its own (data_dir)"


def _as_host_app(exc: StoreError) -> StoreError:
    """A start-up failure about a folder, with what a host app can do about it."""
    if isinstance(exc, DataFolderError):
        return exc.for_host_app()
    return StoreLockedError(with_advice(str(exc), HOST_APP_LOCKED))


def prepare_store(store: Store, settings: Settings) -> list[str]:
    """Bring the store's schema up to date (migrations, then the payload TTL); returns the
    migrations applied now. What `serve` does at start and `watchllm migrate` does."""
    applied = apply_migrations(store)
    apply_payload_ttl(store, settings.payload_ttl_days)
    return applied


# A background task that raises is started again after this delay, doubled at every failure
# in a row up to the maximum; a run that lasted longer than the maximum starts the count over.
BACKGROUND_RESTART_INITIAL_S = 1.0
BACKGROUND_RESTART_MAX_S = 300.0


async def _run_background(
    task: BackgroundTask,
    *,
    initial_s: float = BACKGROUND_RESTART_INITIAL_S,
    max_s: float = BACKGROUND_RESTART_MAX_S,
) -> None:
    """Run a plugin's background task until it returns; one that raises is logged and
    restarted with backoff (never fatal to the server, never silently dead)."""
    delay = initial_s
    while True:
        started = anyio.current_time()
        try:
            await task()
            return
        except Exception:
            if anyio.current_time() - started > max_s:
                delay = initial_s
            log.exception("background task %s failed; restarting it in %.1f s", _name(task), delay)
        await anyio.sleep(delay)
        delay = min(delay * 2, max_s)


def _name(task: BackgroundTask) -> str:
    return getattr(task, "__qualname__", repr(task))


def _open_log(settings: Settings) -> tuple[Log, FolderLock | None]:
    if settings.durability == "memory":
        return MemoryLog(settings.buffer_max_events), None
    return open_spool(settings)


def open_spool(settings: Settings) -> tuple[Spool, FolderLock]:
    """The spool of these settings, locked for this process (StoreLockedError if taken; a
    DataFolderError if its folder cannot be used)."""
    lock = _lock_spool(settings)
    try:
        spool = Spool(
            settings.spool_path,
            fsync=settings.spool_fsync,
            fsync_interval_s=settings.spool_fsync_interval_s,
            segment_max_bytes=min(settings.spool_segment_bytes, settings.spool_max_bytes // 4),
            max_bytes=settings.spool_max_bytes,
            fsync_process=settings.spool_fsync_process,
        )
    except OSError as exc:
        lock.release()
        _raise_spool_folder_error(settings, exc)
        raise
    except BaseException:
        lock.release()
        raise
    return spool, lock


def check_spool(settings: Settings) -> None:
    """What open_spool would refuse about the spool's folder (another process holds it:
    StoreLockedError; it cannot be used: DataFolderError), found without opening the spool:
    so that `watchllm serve` says it in one line before its lifespan starts."""
    if settings.durability == "memory":
        return
    _lock_spool(settings).release()


def _lock_spool(settings: Settings) -> FolderLock:
    """The spool folder's lock for this process: StoreLockedError if another holds it, a
    DataFolderError if the folder cannot be used."""
    try:
        return FolderLock(settings.spool_path, "spool")
    except FolderLocked as exc:
        raise StoreLockedError(str(exc)) from None
    except OSError as exc:
        _raise_spool_folder_error(settings, exc)
        raise


def _raise_spool_folder_error(settings: Settings, exc: OSError) -> None:
    """If the spool's folder cannot be used: a DataFolderError naming the folder that the
    settings name (spool_dir, or the data folder). Another OSError is the caller's."""
    if not concerns(exc, settings.spool_path):
        return
    if settings.spool_dir is not None:
        raise folder_error("spool_dir", settings.spool_path, exc) from None
    raise folder_error("data_dir", settings.data_dir, exc) from None


# Events go into the spool as JSON (msgspec, from the structs: fast_validate.encode_events)
# and come back as the same structs. Records written by earlier versions (pydantic's
# dump_json of the models) have the same keys and are read alike.


def _encode_events(events: Any) -> bytes:
    if isinstance(events, _Encoded | EventsJson):
        return events.payload  # encoded on a worker thread, or in a worker process, already
    return encode_events(events)


class _Encoded(list[Any]):
    """Events with their spool encoding, made off the event loop for a big body."""

    __slots__ = ("payload",)
    payload: bytes


_ENCODE_SLICE = 2_000  # events per encode call (~1 ms): the event loop runs between calls


def encoded_for_spool(events: list[Any]) -> list[Any]:
    """The events (structs or models) with their spool encoding made now, for a caller on a
    worker thread (the OpenTelemetry path): `WatchLLM.submit` then writes that payload as it
    is, instead of encoding them on the event loop."""
    return _encode_sliced(events)


def _encode_sliced(events: list[Any]) -> _Encoded:
    encoded = _Encoded(events)
    if len(events) <= _ENCODE_SLICE:
        encoded.payload = encode_events(events)
        return encoded
    # The encoder writes a list as "[a,b]" with no spaces: the slices join into the same bytes.
    # One join of views, one copy of the batch: slicing off each part's brackets and then
    # adding the outer ones copied megabytes three times more (fresh pages to fault in).
    pieces: list[bytes | memoryview] = [b"["]
    for i in range(0, len(events), _ENCODE_SLICE):
        pieces += (memoryview(encode_events(events[i : i + _ENCODE_SLICE]))[1:-1], b",")
    pieces[-1] = b"]"
    encoded.payload = b"".join(pieces)
    return encoded


def _decode_events(payload: bytes) -> list[Any]:
    # The stored form always has event_id and timestamp (the input form may leave them out).
    # A record that is not stored events raises the reason the writer logs (_decode_each).
    return require_server_filled(read_stored(payload))


def _plugin_routes(pm: pluggy.PluginManager, settings: Settings, core: list[Any]) -> list[Any]:
    """The register_routes hook's routes, in call order. A route whose path and method are
    taken already (by WatchLLM or an earlier plugin) is refused at start: Starlette would
    serve only the first, so one plugin's route silently hid another's (a built-in's page,
    the OTLP receiver) or was itself never served. A built-in's route is replaced by
    disabling that plugin."""
    taken: dict[str, dict[str, str]] = {}  # path -> method ("*": a mount's, any) -> owner

    def claim(route: Any, owner: str) -> None:
        path = getattr(route, "path", None)
        if path is None:
            return
        owners = taken.setdefault(path, {})
        for method in sorted(getattr(route, "methods", None) or {"*"}):
            clash = owners.get(method) or owners.get("*") or (method == "*" and owners)
            if clash:
                first = clash if isinstance(clash, str) else next(iter(owners.values()))
                what = f"{'' if method == '*' else method + ' '}{path}"
                if first == "WatchLLM":
                    raise PluginError(f"{owner} has a route {what}, which is WatchLLM's own")
                raise PluginError(
                    f"{first} and {owner} both have a route {what}, and only one would be"
                    " served (to replace a built-in plugin's route, disable that plugin:"
                    " disable_plugins)"
                )
            owners[method] = owner

    for route in core:
        claim(route, "WatchLLM")
    routes: list[Any] = []
    for impl in reversed(pm.hook.register_routes.get_hookimpls()):
        owner = f"plugin {impl.plugin_name!r}"
        arguments = {"settings": settings}
        for route in impl.function(*[arguments[name] for name in impl.argnames]) or []:
            claim(route, owner)
            routes.append(route)
    return routes


def _check_sinks(sinks: list[Any]) -> None:
    """Refuse at start a sink the writer cannot use (a plugin's bug): found at the first
    batch, a `write` that is not async failed every delivery, for ever, and a sink without
    a name failed with an AttributeError that named nothing."""
    names: set[str] = set()
    for sink in sinks:
        what = f"the sink {type(sink).__module__}.{type(sink).__qualname__} (register_sinks)"
        name = getattr(sink, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{what} has no name: set a `name` string attribute on it")
        if name in names:
            raise PluginError(f"{what} is named {name!r}, as another sink is: names are unique")
        names.add(name)
        for method in ("write", "write_spans"):
            function = getattr(sink, method, None)
            if method == "write" and function is None:
                raise PluginError(f"{what} has no `async def write(self, events)` method")
            if function is not None and not inspect.iscoroutinefunction(function):
                raise PluginError(f"{what}: its `{method}` must be an `async def` method")


def _flatten(results: Iterable[Any]) -> list[Any]:
    """The results of a hook whose implementations return one object, a list, or None."""
    found: list[Any] = []
    for result in results:
        items = result if isinstance(result, list | tuple) else [result]
        found.extend(item for item in items if item is not None)
    return found


def _state(request: Request) -> WatchLLM:
    return request.app.state.watchllm


# --- ingestion -----------------------------------------------------------------------------


async def _read(
    request: Request, wl: WatchLLM, headers: IngestHeaders, principal: Principal
) -> bytes:
    check_content_type(headers.content_type)
    return await read_request_body(request, wl.settings, headers, tenant=principal.project_id)


class _BigBodySlot:
    """A place among `ingest_threads` for a body whose CPU work runs on a worker thread
    (OFFLOAD_MIN_BYTES and up; a small one is handled inline, cheaper than the thread hop). The
    bound keeps big batches from all holding their events at once. When all are held, a freed
    place goes to the next project in turn (slots.FairSlots): one project's stream of big
    batches does not make another's wait behind all of it.

    Given back once the request's events are written to the log (`release`, in `_accept`),
    not at its end: the wait for their fsync then holds no place. Held through the fsync, it
    made big requests take turns at the disk as well as at the CPU, which idled through every
    fsync (1,000-event batches into the spool, 4 connections, a sink that keeps up, load
    8-10: 15-23k events/s -> 31-50k, alternating runs; before, four places gave 71k vs 54k)."""

    __slots__ = ("_held", "_places", "_project", "_timeout_s")

    def __init__(self, wl: WatchLLM, principal: Principal) -> None:
        if wl._big_bodies is None:
            wl._big_bodies = FairSlots(wl.settings.ingest_threads)
        self._places = wl._big_bodies
        self._project = principal.project_id
        self._timeout_s = wl.settings.ingest_queue_timeout_s
        self._held = False

    async def __aenter__(self) -> _BigBodySlot:
        # 503 when no place comes in time (ingest/admission.py): under overload, push back.
        await wait_for_place(partial(self._places.acquire, self._project), self._timeout_s)
        self._held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._places.release()


async def _cpu(off_loop: bool, fn: Callable[..., Any], *args: Any) -> Any:
    if off_loop:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)


def _check_count(wl: WatchLLM, n: int) -> None:
    limit = wl.settings.max_batch_events
    if n > limit:
        raise Problem(
            413,
            "too_many_events",
            f"{n} events in one request is over the limit of {limit}",
            field="events",
        )


async def _in_worker(
    wl: WatchLLM,
    principal: Principal,
    body: bytes,
    shape: Literal["batch", "events"],
    received_at: datetime,
) -> Response | None:
    """A big body validated, finished and encoded in a worker process (ingest/worker.py),
    then spooled here: its answer, also the detailed one for a body the worker's fast
    validator declined. None: no worker did it (none set, ready or alive, or a hook must see
    the events here): the server does it all."""
    processes = wl.settings.ingest_worker_processes
    twins = worker_twins(wl.pm) if processes and wl.writer is not None else None
    counted = ops_metrics(wl).ingest_bodies
    if twins is None:
        counted.labels("server").inc()
        return None
    limit = wl.settings.max_batch_events
    job = encode_job(body, shape, principal.project_id, received_at, twins, limit)
    answer = await map_in_worker(job, processes, decode_worker_answer)
    if answer is None or answer.crash is not None:
        if answer is not None:
            log.error("a worker process failed on an events body; done here:\n%s", answer.crash)
        counted.labels("server").inc()
        return None
    counted.labels("declined" if answer.detailed else "worker").inc()
    # In the order of the server's own paths: a body that is no JSON or of the wrong shape,
    # the count, another project's event (the detailed path's check comes before the quota),
    # the quota, then the fill-in's refusals (the fast path's 403) and the rest.
    if answer.problem is not None and answer.problem_before == "count":
        raise Problem(*answer.problem[:3], field=answer.problem[3])
    _check_count(wl, answer.count)
    if answer.problem is not None and answer.problem_before == "quota":
        raise Problem(*answer.problem[:3], field=answer.problem[3])
    await wl.check_quota(principal, answer.count)
    events = EventsJson(
        answer.payload, answer.project_id, answer.event_ids, answer.rows, answer.parts
    )
    if answer.detailed:
        outcome = Outcome(
            accepted=events,  # type: ignore[arg-type]  # _accept spools it as it is
            rejected=[Rejection(*r) for r in answer.rejected],
            dropped=answer.dropped,
            project_id=principal.project_id,
        )
        try:
            response = await _answer(wl, outcome)
        except CHOSEN_ANSWERS as refused:
            await wl.refund_quota(principal, answer.count)  # refused whole (422, 503)
            if answer.batch_hint and isinstance(refused, Problem):
                say_batch_route(refused)
            raise
        if outcome.not_accepted:  # a 207's invalid events, those a plugin dropped
            await wl.refund_quota(principal, outcome.not_accepted)
        return response
    try:
        if answer.problem is not None:
            raise Problem(*answer.problem[:3], field=answer.problem[3])
        await wl.submit(events)
    except Problem:
        await wl.refund_quota(principal, answer.count)  # refused whole (403, 503)
        raise
    wl.counters["accepted"] += answer.count
    accepted = {"project_id": answer.project_id, "accepted": answer.count}
    return _Accepted(_ENCODE_JSON({**accepted, "event_ids": answer.event_ids}))


async def _ingest_fast(
    wl: WatchLLM,
    principal: Principal,
    events: list[Any],
    slot: _BigBodySlot | None = None,
    received_at: datetime | None = None,
    at: str = "",
) -> Response:
    """`at`: where the body holds its events (ingest.check_projects), for a 403's field."""
    _check_count(wl, len(events))
    await wl.check_quota(principal, len(events))
    try:
        if slot is None:
            outcome = finish_fast(events, principal, wl.pm, received_at, at)
        else:
            # A big body: its fill-in, hooks and spool encoding in one trip to a worker thread
            # (a trip each cost a batch two thread hops more than it needs).
            writer = wl.writer
            encode = writer is not None and writer.needs_payload
            outcome = await anyio.to_thread.run_sync(
                _finish_and_encode, events, principal, wl.pm, received_at, encode, at
            )
        response = await _answer(wl, outcome, slot)
    except CHOSEN_ANSWERS:
        await wl.refund_quota(principal, len(events))  # refused whole (403, 422, 503)
        raise
    if outcome.not_accepted:  # a 207's invalid events, those a plugin dropped
        await wl.refund_quota(principal, outcome.not_accepted)
    return response


def _finish_and_encode(
    events: list[Any],
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None,
    encode: bool,
    at: str = "",
) -> Outcome:
    """finish_fast, then the accepted events' spool encoding (unless made on the way)."""
    outcome = finish_fast(events, principal, pm, received_at, at)
    if encode and outcome.payload is None and outcome.accepted:
        outcome.payload = _encode_sliced(outcome.accepted).payload
    return outcome


async def _ingest(
    wl: WatchLLM,
    principal: Principal,
    items: list[Any],
    slot: _BigBodySlot | None = None,
    received_at: datetime | None = None,
    at: str = "",
    too_long: bool = False,
) -> Response:
    """`at`: where the body holds its events (ingest.check_projects); `too_long`: the items
    may hold integers too long to parse (ingest.parse_events_json)."""
    _check_count(wl, len(items))
    check_projects(items, principal, at)
    await wl.check_quota(principal, len(items))
    try:
        outcome = await _cpu(
            slot is not None,
            validate_items,
            items,
            principal,
            wl.pm,
            received_at,
            too_long,
        )
        response = await _answer(wl, outcome, slot)
    except CHOSEN_ANSWERS:
        await wl.refund_quota(principal, len(items))  # refused whole (422, 503)
        raise
    if outcome.not_accepted:  # a 207's invalid events, those a plugin dropped
        await wl.refund_quota(principal, outcome.not_accepted)
    return response


async def _answer(wl: WatchLLM, outcome: Outcome, slot: _BigBodySlot | None = None) -> Response:
    body = await _accept(wl, outcome, slot)
    if "rejected" in body:
        return JSONResponse(body, status_code=207)
    # A 202 holds a project id, a count and event ids (the schema's id alphabet): msgspec
    # writes the same bytes as JSONResponse's json.dumps, in a fraction of the time.
    return _Accepted(_ENCODE_JSON(body))


_ENCODE_JSON = msgspec.json.Encoder().encode


class _Accepted(Response):
    """A 202 with a JSON body: what Response(body, 202, media_type="application/json")
    sends, its two headers set here (Starlette works them out from the media type and the
    arguments, about 1 us, as much as the rest of a single event's answer)."""

    media_type = "application/json"

    def __init__(self, body: bytes) -> None:
        self.status_code = 202
        self.background = None
        self.body = body
        self.raw_headers = [
            (b"content-length", str(len(body)).encode("latin-1")),
            (b"content-type", b"application/json"),
        ]


def _not_a_principal(pm: pluggy.PluginManager, result: object) -> PluginFailed:
    """authenticate's answer of a type other than Principal (or None), naming the plugins
    that implement the hook (the first answer wins; which one gave it is not known here)."""
    if isinstance(result, Principal):
        why = f"its Principal's project_id {echo(result.project_id)!r} is not a project id"
    else:
        why = f"it returned {type(result).__name__}, not a Principal or None"
    return answered_wrongly(pm.hook.authenticate, why)


async def _awaited(hook: str, impl: Any, result: Any) -> Any:
    """A hook implementation's result, awaited when it is awaitable; what it raises as the
    PluginFailed that names it."""
    if not inspect.isawaitable(result):
        return result
    try:
        return await result
    except CHOSEN_ANSWERS:
        raise
    except Exception as exc:
        raise plugin_failed(hook, impl, exc) from exc


async def _accept(
    wl: WatchLLM, outcome: Outcome, slot: _BigBodySlot | None = None
) -> dict[str, Any]:
    """Hand the valid events to the writer; the answer body (202 without "rejected", 207
    with it). Raises Problem 422 when nothing was valid, 503 when the writer cannot take them."""
    n_rejected = len(outcome.rejected)
    rejected = [r.as_dict() for r in outcome.rejected[:MAX_REJECTIONS_LISTED]]
    # Past the listed ones, a count: the answer stays bounded whatever the batch holds.
    more = {"rejected_count": n_rejected} if n_rejected > len(rejected) else {}
    wl.counters["rejected"] += n_rejected
    if not outcome.accepted and outcome.dropped:
        # A transform_events plugin took out every event that was valid (sampling, say):
        # nothing to spool, and nothing the client should send again.
        body = {"project_id": outcome.project_id, "accepted": 0, "event_ids": []}
        return {**body, "rejected": rejected, **more} if rejected else body
    if not outcome.accepted:
        raise Problem(
            422,
            "validation_failed",
            f"no event was valid ({n_rejected} rejected); see 'rejected' for each field",
            accepted=0,
            rejected=rejected,
            **more,
        )
    writer = wl.writer
    accepted = outcome.accepted
    if isinstance(accepted, EventsJson):  # made by a worker process: spooled as it is
        pass
    elif outcome.payload is not None:
        encoded = _Encoded(outcome.accepted)  # made on the way (models, or a worker thread)
        encoded.payload = outcome.payload
        outcome.accepted = encoded
    elif slot is not None and writer is not None and writer.needs_payload:
        outcome.accepted = await anyio.to_thread.run_sync(_encode_sliced, outcome.accepted)
    if slot is not None:
        # The CPU work is done: the next big body may start. submit writes the events before
        # its first await (the fsync wait), so the next one starts after the write.
        slot.release()
    await wl.submit(outcome.accepted)
    wl.counters["accepted"] += len(outcome.accepted)
    body: dict[str, Any] = {
        "project_id": accepted.project_id
        if isinstance(accepted, EventsJson)
        else outcome.accepted[0].project_id,
        "accepted": len(outcome.accepted),
        "event_ids": accepted.event_ids
        if isinstance(accepted, EventsJson)
        else [e.event_id for e in outcome.accepted],
    }
    if rejected:
        body["rejected"] = rejected
        body.update(more)
    return body


async def project_events(request: Request) -> Response:
    """POST /v1/projects/{project_id}/events: one event, or a JSON array of events."""
    received_at = receipt_time()  # the timestamp of this request's events that have none
    wl = _state(request)
    headers = IngestHeaders.of(request)
    principal = wl.authenticate_header(headers.authorization, "ingest", request)
    refuse_query(request)
    project_id = request.path_params["project_id"]
    if project_id != principal.project_id:
        if not PROJECT_ID_RE.fullmatch(project_id):
            raise not_a_project_id(project_id, "project_id")  # 400, the value shortened
        raise other_project(principal.project_id, project_id)
    body = await _read(request, wl, headers, principal)
    return await _by_size(wl, principal, body, "events", received_at, _project_events)


async def _by_size(
    wl: WatchLLM,
    principal: Principal,
    body: bytes,
    shape: Literal["batch", "events"],
    received_at: datetime,
    handle: Callable[..., Awaitable[Response]],
) -> Response:
    """A small body is validated here, on the event loop, and its events go straight to
    _ingest_fast (the frames a single event's every call and wait goes through are ~2% of its
    time: bench_request_path.py), or when declined to `handle` (_batch_events,
    _project_events) for the detailed answer. A big one (OFFLOAD_MIN_BYTES and up) goes to a
    worker process first (_in_worker), and to `handle` in a big body's place when no worker
    did it (with `fast` off when the worker's fast validator declined it)."""
    if len(body) < OFFLOAD_MIN_BYTES:
        events = validate_fast(body, shape)
        if events is not None:
            return await _ingest_fast(wl, principal, events, None, received_at, events_at(shape))
        return await handle(wl, principal, body, None, received_at, fast=False)
    done = await _in_worker(wl, principal, body, shape, received_at)
    if done is not None:
        return done
    async with _BigBodySlot(wl, principal) as slot:
        return await handle(wl, principal, body, slot, received_at)


async def _fast_events(
    off_loop: bool, body: bytes, shape: Literal["batch", "events"]
) -> list[Any] | None:
    """The fast validator's events (None: declined), in slices on a worker thread for a big
    body, at once on the event loop for a small one."""
    validate = validate_sliced if off_loop else validate_fast
    result: list[Any] | None = await _cpu(off_loop, validate, body, shape)
    return result


async def _project_events(
    wl: WatchLLM,
    principal: Principal,
    body: bytes,
    slot: _BigBodySlot | None,
    received_at: datetime,
    fast: bool = True,
) -> Response:
    off_loop = slot is not None
    events = await _fast_events(off_loop, body, "events") if fast else None
    if events is not None:
        return await _ingest_fast(wl, principal, events, slot, received_at, events_at("events"))
    if not off_loop and len(body) >= DETAILED_OFFLOAD_MIN_BYTES:
        # Declined by the fast validator: the detailed answer costs up to ~10x (ingest/validate.py),
        # so it is a big body's work, on a worker thread in a big body's place.
        async with _BigBodySlot(wl, principal) as big:
            return await _project_events(wl, principal, body, big, received_at, fast=False)
    payload, too_long = await _cpu(off_loop, parse_events_json, body)
    items = body_items(payload, "events")
    try:
        return await _ingest(wl, principal, items, slot, received_at, events_at("events"), too_long)
    except Problem as problem:
        if batch_sent_as_event(payload, "events"):
            say_batch_route(problem)
        raise


async def batch_events(request: Request) -> Response:
    """POST /v1/events/batch: {"events": [...]}."""
    received_at = receipt_time()  # the timestamp of this request's events that have none
    wl = _state(request)
    headers = IngestHeaders.of(request)
    principal = wl.authenticate_header(headers.authorization, "ingest", request)
    refuse_query(request)
    body = await _read(request, wl, headers, principal)
    return await _by_size(wl, principal, body, "batch", received_at, _batch_events)


async def _batch_events(
    wl: WatchLLM,
    principal: Principal,
    body: bytes,
    slot: _BigBodySlot | None,
    received_at: datetime,
    fast: bool = True,
) -> Response:
    off_loop = slot is not None
    events = await _fast_events(off_loop, body, "batch") if fast else None
    if events is not None:
        return await _ingest_fast(wl, principal, events, slot, received_at, events_at("batch"))
    if not off_loop and len(body) >= DETAILED_OFFLOAD_MIN_BYTES:
        # Declined by the fast validator: the detailed answer costs up to ~10x (ingest/validate.py),
        # so it is a big body's work, on a worker thread in a big body's place.
        async with _BigBodySlot(wl, principal) as big:
            return await _batch_events(wl, principal, body, big, received_at, fast=False)
    payload, too_long = await _cpu(off_loop, parse_events_json, body)
    items = body_items(payload, "batch")
    return await _ingest(wl, principal, items, slot, received_at, events_at("batch"), too_long)


# --- health -----------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    failed = _state(request).failed
    if failed is not None:  # the writer stopped on an error: restart the process
        body = {"status": "failed", "detail": failed, "version": __version__}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    wl = _state(request)
    checks: dict[str, Any] = {}
    ready = True
    if wl.writer is None or not wl.writer.running:
        checks["writer"] = {"ok": False, "detail": "not running"}
        ready = False
    else:
        stats = wl.writer.stats()
        cap = wl.settings.spool_max_bytes
        full = wl.settings.durability == "spool" and stats["log_bytes"] >= 0.95 * cap
        # A failed fsync answers 503 until one succeeds: not ready meanwhile; nor while a
        # sink's cursor cannot be saved (the spool's disk is full: nothing is let go).
        unsaved = {n: v["cursor_error"] for n, v in stats["sinks"].items() if v["cursor_error"]}
        ok = not full and stats["log_sync_error"] is None and not unsaved
        checks["writer"] = {"ok": ok, "log_max_bytes": cap, **stats}
        # Why not ok, in words (docs/DURABILITY.md: "/readyz says why"), as the other checks.
        why = []
        if full:
            why.append(
                f"the spool is full: {stats['log_bytes']} of its cap of {cap} bytes"
                " (spool_max_bytes); ingestion answers 503 until the sinks catch up"
            )
        if stats["log_sync_error"] is not None:
            why.append(stats["log_sync_error"])  # "the spool's fsync failed: <the error>"
        for sink, error in unsaved.items():
            why.append(f"sink {sink}'s cursor cannot be saved: {error}")
        if why:
            checks["writer"]["detail"] = "; ".join(why)
        ready = ready and ok
    if wl.store is None:
        checks["store"] = {"ok": False, "detail": "not open"}
        ready = False
    else:
        try:
            with anyio.fail_after(2):
                # Abandoned at the deadline: a thread stuck in the store must not hold the
                # probe (and each next probe) past it.
                version = await anyio.to_thread.run_sync(wl.store.version, abandon_on_cancel=True)
            checks["store"] = {"ok": True, "name": wl.store.name, "version": version}
        except Exception as exc:
            checks["store"] = {"ok": False, "name": wl.store.name, "detail": str(exc)[:300]}
            ready = False
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


# --- admin (for the CLI's --url mode) -----------------------------------------------------------


def _admin_key(request: Request, qp: Query) -> tuple[WatchLLM, Principal]:
    """Authenticate an admin key, then refuse a query parameter the route does not accept
    (a misspelled `project` used to widen the answer, or a replay, to every project)."""
    wl = _state(request)
    principal = wl.authenticate(request, "admin")
    qp.check()
    return wl, principal


def _admin_store(request: Request, qp: Query) -> tuple[WatchLLM, Principal, Store]:
    wl, principal = _admin_key(request, qp)
    if wl.store is None:
        raise Problem(
            503, "store_unavailable", "the store is not open", headers={"Retry-After": "5"}
        )
    return wl, principal, wl.store


def _administered_project(qp: Query, principal: Principal) -> str | None:
    """The `project` parameter of an admin route, checked against the key (docs/API.md, "Keys
    and scopes"): an admin key administers its own project only (its project when none is
    named), an operator key every project (all of them when none is named)."""
    project = qp.get("project") or None
    if project is not None and not PROJECT_ID_RE.fullmatch(project):
        raise not_a_project_id(project)
    if project is None and not principal.can("operator"):
        project = principal.project_id
    if principal.administers(project):
        return project
    raise Problem(
        403,
        "forbidden",
        f"the key administers project {principal.project_id!r}, not {project!r}"
        " (other projects need the 'operator' scope)",
        field="project",
    )


@accepts()
async def admin_store(request: Request, qp: Query) -> Response:
    _, _, store = _admin_store(request, qp)
    version = await anyio.to_thread.run_sync(store.version)
    return JSONResponse({"store": store.name, "version": version})


@accepts()
async def admin_tables(request: Request, qp: Query) -> Response:
    _, _, store = _admin_store(request, qp)
    return JSONResponse({"tables": await anyio.to_thread.run_sync(list_tables, store)})


@accepts(("table", "project", "run"))
async def admin_count(request: Request, qp: Query) -> Response:
    _, principal, store = _admin_store(request, qp)
    table = qp.get("table", "events")
    project = _administered_project(qp, principal)
    if table not in STORE_TABLES:
        raise Problem(
            400,
            "bad_parameter",
            f"table: {table[:64]!r} is not counted here; one of {', '.join(STORE_TABLES)}"
            " (the event tables; /v1/admin/tables lists all of the store's)",
            field="table",
        )
    run = qp.get("run") or None
    if run is not None and len(run) > MAX_RUN_CHARS:
        raise Problem(400, "bad_parameter", f"run: at most {MAX_RUN_CHARS} characters", field="run")
    count = await anyio.to_thread.run_sync(count_rows, store, table, project, run)
    return JSONResponse({"table": table, "project": project, "run": run, "count": count})


def _dead_letter_dir(wl: WatchLLM) -> Path:
    return wl.settings.spool_path / "dead-letter"


def _sink_names(writer: Writer) -> set[str]:
    """The names of the sinks `writer` runs."""
    return {state.sink.name for state in writer.sinks}


def _has_dead_letters(wl: WatchLLM, sink: str) -> bool:
    """Whether `sink` has dead letters of any project (or records of none)."""
    return bool(read_dead_letters(_dead_letter_dir(wl), sink, None).entries)


@accepts(("sink", "project"))
async def admin_dead_letters(request: Request, qp: Query) -> Response:
    wl, principal = _admin_key(request, qp)
    project = _administered_project(qp, principal)
    sink = qp.get("sink") or None
    if sink is not None and len(sink) > MAX_SINK_CHARS:
        raise Problem(
            400, "bad_parameter", f"sink: at most {MAX_SINK_CHARS} characters", field="sink"
        )
    found = await anyio.to_thread.run_sync(read_dead_letters, _dead_letter_dir(wl), sink, project)
    running = _sink_names(wl.writer) if wl.writer is not None else None
    if (
        sink is not None
        and not found.entries
        and running is not None
        and sink not in running
        and not (project and await anyio.to_thread.run_sync(_has_dead_letters, wl, sink))
    ):
        # A misspelled name would list nothing, as if all were well: say so. (A sink that no
        # longer runs but left dead letters, of this project or another, lists as before.)
        raise Problem(
            400,
            "unknown_sink",
            f"no sink named {echo(sink, 64)!r} is running or has dead letters"
            f" (running: {', '.join(sorted(running)) or 'none'})",
            field="sink",
        )
    return JSONResponse(
        {
            "project": project,
            "dead_letters": summary(found.entries),
            "torn_records": found.torn_records,
        }
    )


@accepts(("sink", "project"))
async def admin_replay_dead_letters(request: Request, qp: Query) -> Response:
    """Put dead letters back into the spool, each for the sink that refused it."""
    wl, principal = _admin_key(request, qp)
    project = _administered_project(qp, principal)
    writer = wl.writer
    if writer is None:
        raise Problem(503, "not_running", "the writer is not running", headers={"Retry-After": "5"})
    sinks = _sink_names(writer)
    sink = qp.get("sink") or None
    if sink is not None and sink not in sinks:
        # A record for a sink that does not run would be dropped by every sink: refuse.
        raise Problem(
            400,
            "unknown_sink",
            f"no sink named {echo(sink, 64)!r} is running"
            f" (running: {', '.join(sorted(sinks)) or 'none'}); nothing was replayed or removed",
            field="sink",
        )
    taken = await anyio.to_thread.run_sync(
        partial(take_dead_letters, _dead_letter_dir(wl), sink, project, sinks)
    )
    replayed = 0
    for at, entry in enumerate(taken.entries):
        try:
            await writer.submit_for(
                entry.sink,
                targeted_payload(entry.sink, entry.events, entry.kind),
                len(entry.events),
                spans=entry.kind == "spans",
            )
        except (WriterFull, WriterClosed) as exc:
            # The rest goes back to the dead-letter files, listed and replayable as before.
            await anyio.to_thread.run_sync(put_back, taken, at)
            rest = len(taken.entries) - at
            kept = "1 dead letter is" if rest == 1 else f"{rest} dead letters are"
            done_here = f"; {replayed} events were replayed first, {kept} kept for the next replay"
            raise writer_refusal(exc, done_here) from None
        replayed += len(entry.events)
    done(taken.moved)
    return JSONResponse(
        {
            "project": project,
            "entries": len(taken.entries),
            "replayed_events": replayed,
            "torn_records": taken.torn_records,
            "unknown_sinks": taken.unknown_sinks,
        }
    )


@accepts()
async def list_plugins(request: Request, qp: Query) -> Response:
    # The plugin list is the instance's code, not any project's data: any admin may see it.
    wl, _ = _admin_key(request, qp)
    return JSONResponse({"plugins": describe_plugins(wl.pm)})


def list_tables(store: Store) -> list[str]:
    rows = store.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    )
    return [r["name"] for r in rows]


def count_rows(store: Store, table: str, project: str | None, run: str | None = None) -> int:
    """Distinct rows of `table`, of one project and one run (a trace: spans by trace_id) if
    given."""
    if table not in STORE_TABLES:
        raise ValueError(f"unknown table {table!r}")
    # Table names come from the allow-list above; the values are bound parameters. FINAL
    # collapses duplicate deliveries of one event, so the count is of distinct events.
    final = "" if table == "traces" else " FINAL"
    conditions = []
    if project:
        conditions.append("project_id = {project:String}")
    if run:
        conditions.append(("trace_id" if table == "spans" else "run_id") + " = {run:String}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = store.query(
        f"SELECT count() AS n FROM {table}{final}{where}", {"project": project, "run": run}
    )
    return int(rows[0]["n"])


# --- the app ----------------------------------------------------------------------------------


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    hint, receiver = _otlp_endpoint_hint(request)
    if hint is not None:
        # In the receiver's form (errors.render_problems_at): a google.rpc.Status in the
        # request's encoding, protobuf for a protobuf exporter (the Collector shows its
        # message), else JSON.
        return answer_for({**request.scope, "path": receiver}, Problem(404, "not_found", hint))
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":  # no route: say which was asked
        message = f"no route {request.method} {request.url.path[:200]} on this server" + (
            _without_slash_hint(request)
            or " (docs/API.md lists the routes; some exist only with a setting on, such as quotas)"
        )
    elif exc.status_code == 405 and message == "Method Not Allowed":
        allowed = (getattr(exc, "headers", None) or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path[:200]}" + (
            f"; it takes {allowed}" if allowed else ""
        )
    return JSONResponse(
        {"error": code, "message": message},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _without_slash_hint(request: Request) -> str:
    """A hint for the usual near miss, a trailing slash (`.../events/`), which is a 404 here
    (create_app turns Starlette's 307 off). ('' when the path without it is no route either.)"""
    path = request.scope.get("path", "")
    if len(path) < 2 or not path.endswith("/"):
        return ""
    root = request.scope.get("root_path", "")
    bare = path.rstrip("/")
    inner = bare[len(root) :] if root and bare.startswith(root) else bare
    scope = {**request.scope, "path": inner or "/"}
    for route in getattr(request.app, "routes", []):
        if isinstance(route, Route) and route.matches(scope)[0] is not Match.NONE:
            return f": did you mean {bare[:200]}, without the trailing slash?"
    return ""


def _otlp_endpoint_hint(request: Request) -> tuple[str | None, str]:
    """What to set, for the two usual wrong URLs of an OTLP exporter: ..._TRACES_ENDPOINT set
    to the base URL (the exporter posts to `/`: 405 from the dashboard's GET route, or 404)
    and OTEL_EXPORTER_OTLP_ENDPOINT ending in /v1/traces (it posts to /v1/traces/v1/traces).
    Their plain 404/405 said nothing an operator could act on. (None for anything else, and
    the receiver's path.)"""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    receiver = f"{root}/v1/traces"
    if request.method != "POST":
        return None, receiver
    if root and path.startswith(root):  # mounted under a prefix in a host app
        path = path[len(root) :]
    if path not in ("", "/") and not path.rstrip("/").endswith("/v1/traces"):
        return None, receiver
    routes = getattr(request.app, "routes", [])
    if not any(getattr(route, "path", None) == "/v1/traces" for route in routes):
        return None, receiver  # the receiver is off (disable_plugins): no endpoint to name
    hint = (
        f"no route POST {request.url.path[:200]}: OpenTelemetry traces go to POST {receiver}"
        " (OTLP/HTTP). Set OTEL_EXPORTER_OTLP_ENDPOINT to the server's base URL, without a"
        " path (http://HOST:PORT: the exporter adds /v1/traces), or"
        f" OTEL_EXPORTER_OTLP_TRACES_ENDPOINT to the full URL (http://HOST:PORT{receiver})"
    )
    return hint, receiver


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"error": "internal_error", "message": "the server failed; the error is in its log"},
        status_code=500,
    )


def create_app(
    settings: Settings | None = None, *, plugins: Iterable[Any] = (), entry_points: bool = True
) -> Starlette:
    """Build the WatchLLM ASGI app. Serve it alone or mount it in a host app."""
    settings = settings or load_settings()
    pm = get_plugin_manager(settings, plugins, entry_points=entry_points)
    wl = WatchLLM(settings=settings, pm=pm)
    ingest_routes = [
        Route("/v1/projects/{project_id}/events", project_events, methods=["POST"]),
        Route("/v1/events/batch", batch_events, methods=["POST"]),
    ]
    routes: list[BaseRoute] = [
        *ingest_routes,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/v1/admin/store", admin_store, methods=["GET"]),
        Route("/v1/admin/tables", admin_tables, methods=["GET"]),
        Route("/v1/admin/count", admin_count, methods=["GET"]),
        Route("/v1/admin/dead-letters", admin_dead_letters, methods=["GET"]),
        Route("/v1/admin/dead-letters/replay", admin_replay_dead_letters, methods=["POST"]),
        Route("/-/plugins", list_plugins, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    ]
    routes += analytics_routes()
    routes += _plugin_routes(pm, settings, routes)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with wl.running():
            yield

    # Operations (observability/): Sentry from the settings; request latency and rejection
    # counts for /metrics; the request middleware also scopes the per-request flag cache.
    sentry_on = ensure_sentry(settings)
    handlers: dict[Any, Any] = {
        Problem: counting_rejections(problem_handler),
        HTTPException: _not_found,
    }
    # Outermost: a request's charge on the bodies' budget is given back once it is answered.
    largest = max(settings.max_body_bytes, settings.max_decompressed_bytes)
    limit = max(settings.max_body_memory_bytes, largest)
    # A project's share: the setting, or a quarter of the budget; never below one largest body.
    share = settings.max_body_memory_per_project_bytes or limit // 4
    budget = BodyBudget(limit, share=max(share, largest))
    middleware = [
        Middleware(BodyBudgetMiddleware, budget=budget),
        Middleware(RequestMetrics, wl=wl),
    ]
    app = LaneApp(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={**handlers, Exception: _internal_error},
    )
    # A path with a slash too many or too few is a 404, not Starlette's 307 to the other
    # spelling: its Location is built from the client's Host header (any host, always
    # http://), and a client following a 307 posts the body again. (/dashboard has its own.)
    app.router.redirect_slashes = False
    if not sentry_on:
        # Sentry's Starlette integration instruments the router and the exception middleware
        # (transaction names, captured errors): with it on, every request goes through them.
        app.set_lane(IngestLane(wl, ingest_routes, handlers, _internal_error, budget))
    app.state.watchllm = wl
    wl.registry = make_registry(wl)
    return app
