"""`WatchLLMMiddleware`: WatchLLM in the request path of a host Starlette/FastAPI app.

Pure ASGI (no BaseHTTPMiddleware: that buffers nothing either, but it runs the app in another
task, which breaks context variables and costs a task per request). For each HTTP request:

1. find the route the host will run (its template, its options) by matching the host's own
   routes; requests for a mounted WatchLLM app pass straight through;
2. give it a run context (`sdk.context.use_run`): the run id from `X-WatchLLM-Run-Id`, else
   the trace id of a W3C `traceparent`, else a new one; and a `Recorder`
   (`request.state.watchllm`, `current_recorder()`);
3. enforce: ask the `check_quota` hook with n_events=0, the user and the route template; a
   denial is answered 429 with its headers and the handler never runs;
4. pass every response message through as it comes (a stream is never buffered) and record
   one summary event when the request is done: route template, method, status, latency,
   user, and the LLM calls recorded inside it.

It also owns WatchLLM's store and writer: started on the host's lifespan startup (before the
host's own lifespan), stopped after the host's shutdown, flushing. A host mounted under a
prefix of another app gets no lifespan from Starlette: WatchLLM then starts on the first
request (see docs/EMBEDDING.md).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import re
import sys
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..app import WatchLLM
from ..auth import Principal
from ..errors import Problem
from ..locks import FolderLock, FolderLocked
from ..otel.ids import event_id_of
from ..plugins import PluginFailed
from ..schema import is_id
from ..sdk.context import RunContext, RunTally
from ..sdk.context import _current as _current_run
from ..store.base import StoreLockedError
from ..store.folders import DataFolderError
from .budget import UserDailyBudget
from .recorder import Outbox, Recorder, fast_id
from .recorder import _current as _current_recorder

log = logging.getLogger("watchllm.middleware")

RUN_ID_HEADER = "x-watchllm-run-id"
# W3C trace context: version-traceid-parentid-flags; later versions may add fields after.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(?:-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
MAX_USER_CHARS = 256  # the contract's user_id limit


def _header_text(value: bytes) -> str:
    """A header value as text: UTF-8 when it is valid UTF-8 (what clients send for "é", and
    how the SDK and JSON store the same id: one user, not two), else latin-1 (every byte a
    character, as ASGI servers hand header bytes over). The run id and traceparent are
    read as latin-1: only ASCII ids are taken from them anyway."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """What the middleware does for one route; None keeps the middleware's default."""

    enforce: bool | None = None  # ask check_quota before the handler runs
    record: bool | None = None  # record the request's summary event


def watchllm_route(
    *, enforce: bool | None = None, record: bool | None = None
) -> Callable[[Any], Any]:
    """Mark an endpoint with its options: `@watchllm_route(enforce=False)` under the route
    decorator (or above it: the function itself is marked and returned)."""

    def mark(endpoint: Any) -> Any:
        endpoint.__watchllm_route__ = RouteOptions(enforce, record)
        return endpoint

    return mark


class _Resolved(NamedTuple):
    template: str | None  # the route's path template, with the prefixes of its mounts
    options: RouteOptions | None
    bypass: bool  # a WatchLLM app's own route: not observed, not enforced


_NO_ROUTE = _Resolved(None, None, False)
_BYPASS = _Resolved(None, None, True)


class HostStartError(RuntimeError):
    """WatchLLM cannot start inside this host; the message is one line saying why and how."""


class _Owner:
    """Runs one WatchLLM app's store, writer and the outbox flusher for the middleware(s)
    that record into it. One per WatchLLM app (see `owner_for`)."""

    def __init__(
        self,
        wl: WatchLLM,
        principal: Principal,
        flush_interval_s: float,
        summary_interval_s: float = 5.0,
    ) -> None:
        self.wl = wl
        self.principal = principal
        self.outbox = Outbox(interval_s=flush_interval_s, summary_interval_s=summary_interval_s)
        self.running = False
        self._stop: anyio.Event | None = None
        self._lazy: asyncio.Task[None] | None = None
        self._lazy_ready: asyncio.Event | None = None
        self._lazy_failed_at = 0.0

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Start WatchLLM (unless something else runs it already) and the flusher; on exit,
        flush the outbox, then stop WatchLLM (which flushes its writer)."""
        async with AsyncExitStack() as stack:
            if self.wl.writer is None:
                await stack.enter_async_context(_start(self.wl))
            self._stop = stop = anyio.Event()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._flusher, stop)
                self.running = True
                try:
                    yield
                finally:
                    self.running = False
                    stop.set()  # the flusher drains the outbox once more and returns
            # (leaving the task group waited for that drain; WatchLLM's writer stops next)

    async def _flusher(self, stop: anyio.Event) -> None:
        outbox = self.outbox
        outbox.closed = False
        while not stop.is_set():
            with anyio.move_on_after(outbox.interval_s):
                await stop.wait()
            summaries = outbox.summaries_due()
            if (summaries or outbox.recorded) and self.wl.writer is not None:
                try:
                    await outbox.flush(self.wl, self.principal, summaries)
                except Exception:  # never let one bad flush stop the recording
                    log.exception("flushing recorded events failed")
        # Stopping: the host's requests are done (servers finish them before the lifespan's
        # shutdown). Drain what is left; a writer that is full gets until its own shutdown
        # grace to take it, as it gets for its buffer.
        deadline = anyio.current_time() + self.wl.settings.shutdown_grace_s
        while len(outbox) and self.wl.writer is not None:
            try:
                if await outbox.flush(self.wl, self.principal):
                    break
            except Exception:
                log.exception("flushing recorded events failed")
                break
            if anyio.current_time() >= deadline:
                break
            await anyio.sleep(outbox.interval_s)
        outbox.closed = True
        if len(outbox):
            log.error("WatchLLM stopped with %d recorded events it could not take", len(outbox))

    async def stop(self) -> None:
        """Flush now (hosting.lifespan calls this before it stops the WatchLLM app)."""
        running = self.running and self.wl.writer is not None
        if running and not await self.outbox.flush(self.wl, self.principal):
            log.error("WatchLLM stopped with %d recorded events", len(self.outbox))

    async def start_lazily(self) -> bool:
        """Start in a task of our own, for a host whose lifespan never reaches us (mounted
        under a prefix). True once running; False if it cannot start (logged, retried after
        30 s): the host keeps serving, unobserved and unenforced meanwhile."""
        if self._lazy is None:
            if time.monotonic() - self._lazy_failed_at < 30:
                return False
            self._lazy_ready = asyncio.Event()
            self._lazy = asyncio.get_running_loop().create_task(self._own(self._lazy_ready))
        assert self._lazy_ready is not None
        await self._lazy_ready.wait()
        return self.running

    async def _own(self, ready: asyncio.Event) -> None:
        log.info("no lifespan reached WatchLLMMiddleware (a mounted host?): starting now")
        try:
            async with self.run():
                ready.set()
                try:
                    await asyncio.Event().wait()  # until the event loop ends
                except asyncio.CancelledError:
                    # asyncio.run() is closing the loop: leave normally, so the outbox and
                    # the writer flush (what the writer cannot deliver stays in the spool).
                    # The flusher task was cancelled with ours: the outbox is handed over here.
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()
                    await self.stop()
        except Exception as exc:
            log.error("WatchLLM could not start: %s", exc)
            self._lazy_failed_at = time.monotonic()
        finally:
            self._lazy = None
            ready.set()


# Weak: an owner lives as long as a middleware that records through it.
_owners: weakref.WeakValueDictionary[int, _Owner] = weakref.WeakValueDictionary()


def owner_for(
    wl: WatchLLM,
    principal: Principal | None = None,
    flush_interval_s: float = 0.1,
    summary_interval_s: float = 5.0,
) -> _Owner:
    """The one owner of `wl` (made on first use): middleware instances sharing a WatchLLM app
    share its outbox and lifecycle."""
    owner = _owners.get(id(wl))
    if owner is None or owner.wl is not wl:
        principal = principal or Principal("default", frozenset({"ingest"}))
        owner = _Owner(wl, principal, flush_interval_s, summary_interval_s)
        _owners[id(wl)] = owner
    return owner


def find_owner(wl: WatchLLM) -> _Owner | None:
    owner = _owners.get(id(wl))
    return owner if owner is not None and owner.wl is wl else None


def _uvicorn_workers() -> bool:
    """True in a worker process of `uvicorn --workers N` (N > 1): the supervisor spawns each
    worker with a target from its module, so the worker has imported it."""
    return (
        "uvicorn.supervisors.multiprocess" in sys.modules
        and multiprocessing.parent_process() is not None
    )


def _embedded(wl: WatchLLM) -> bool:
    return wl.settings.clickhouse_url is None


@asynccontextmanager
async def _start(wl: WatchLLM) -> AsyncIterator[None]:
    """`wl.running()`, with the multi-process cases made plain.

    Under `uvicorn --workers N` the embedded store (a chDB folder one process may open) is
    refused in every worker with one line; with the ClickHouse server store every worker
    takes its own spool, `<spool>/worker-<n>`, the first free one, so that a restarted
    worker delivers what its predecessor left.
    """
    slot: FolderLock | None = None
    if _uvicorn_workers():
        if _embedded(wl):
            raise HostStartError(
                f"WatchLLM's embedded store ({wl.settings.store_path}) is owned by one process"
                " and this server runs several worker processes (uvicorn --workers N): run one"
                " worker, or set WATCHLLM_CLICKHOUSE_URL to a ClickHouse server all workers"
                " share (docs/EMBEDDING.md)"
            )
        wl.settings, slot = _claim_worker_spool(wl)
    try:
        async with wl.running():
            yield
    except StoreLockedError as exc:
        raise HostStartError(f"WatchLLM cannot start: {exc}") from None
    finally:
        if slot is not None:
            slot.release()


def _claim_worker_spool(wl: WatchLLM) -> tuple[Any, FolderLock]:
    """The first worker slot no other process holds (its lock, taken atomically, is held
    while this worker runs) and the settings with that slot's spool."""
    base = wl.settings.spool_path
    for n in range(4096):
        try:
            slot = FolderLock(base / "worker-slots" / str(n), "worker slot")
        except FolderLocked:
            continue
        return wl.settings.model_copy(update={"spool_dir": base / f"worker-{n}"}), slot
    raise HostStartError(f"no free worker spool under {base}")


class _Summary(msgspec.Struct, gc=False):
    """A request's summary event as plain values while it waits in the outbox (0.1 s).

    Why not the event's dicts: those are scanned by every garbage collection until the
    flush, promoted to the older generations, and their collections stop the event loop for
    milliseconds (a host's requests otherwise leave the collector nothing to do). This
    struct is not tracked by the collector at all (gc=False: it can be part of no reference
    cycle, nothing refers to it but the outbox). `event()` builds the event; the outbox calls
    it when it hands the summary over."""

    event_id: str
    run_id: str
    timestamp: datetime
    method: str
    route: str
    status_code: int
    seconds: float
    parent_id: str | None
    user_id: str | None
    session_id: str | None
    status: str  # success, error or warning (a denial)
    observation: str | None
    error_type: str | None
    denied: str | None  # the denial's error code
    # (calls, tokens_input, tokens_output, their own cost, the cost priced, calls unpriced)
    llm: tuple[int, int, int, float, float, int] | None
    tags: tuple[str, ...]  # the recorder's, after "http"
    metadata: dict[str, Any] | None  # the recorder's, over the middleware's keys

    def event(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "http.request.method": self.method,
            "http.route": self.route,
            "http.response.status_code": self.status_code,
            "llm.calls": self.llm[0] if self.llm is not None else 0,
        }
        if self.llm is not None:
            _, tokens_in, tokens_out, reported, cost, unpriced = self.llm
            metadata["llm.tokens_input"] = tokens_in
            metadata["llm.tokens_output"] = tokens_out
            metadata["llm.cost_usd_reported"] = reported
            metadata["llm.cost_usd"] = cost
            if unpriced:
                metadata["llm.calls_unpriced"] = unpriced
        if self.metadata:
            metadata.update(self.metadata)
        event: dict[str, Any] = {
            "event_type": "agent_step",
            "event_id": self.event_id,
            "run_id": self.run_id,
            "timestamp": self.timestamp,
            "step_number": 0,
            "step_name": f"{self.method} {self.route}"[:256],
            "latency_ms": min(self.seconds * 1000, 2_592_000_000.0),
            "tags": ["http", *self.tags][:64],
            "metadata": metadata,
        }
        if self.parent_id is not None:
            event["parent_event_id"] = self.parent_id
        if self.user_id is not None:
            event["user_id"] = self.user_id
        if self.session_id is not None:
            event["session_id"] = self.session_id
        event["status"] = self.status
        if self.observation is not None:
            event["observation"] = self.observation
        if self.denied is not None:
            metadata["watchllm.denied"] = self.denied
        elif self.error_type is not None:
            metadata["error.type"] = self.error_type
        return event


UserGetter = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]


def _is_watchllm_app(app: Any) -> bool:
    """An app made by create_app (any instance): its routes are WatchLLM's own."""
    return isinstance(getattr(getattr(app, "state", None), "watchllm", None), WatchLLM)


class WatchLLMMiddleware:
    """Observe and guard a host app's requests with WatchLLM.

        watchllm = create_app(settings)
        app = FastAPI()
        app.mount("/watchllm", watchllm)
        app.add_middleware(WatchLLMMiddleware, watchllm=watchllm, user_daily_budget_usd=5.0)

    Arguments (all optional but `watchllm`; None takes the setting of the same area):

    - `project_id`: the project the host's events belong to (setting `host_project_id`).
    - `user_header`: the request header naming the user (`X-User-Id`); `get_user(conn)`
      instead, for users found another way (a session, a token); may be async.
    - `enforce` / `record`: the defaults for every route (both True); `routes` maps route
      templates to `RouteOptions`, and `@watchllm_route(...)` marks an endpoint.
    - `user_daily_budget_usd`, `budget_cache_s`: turn on the built-in per-user daily budget
      (settings `user_daily_budget_usd`, `user_budget_cache_s`).
    - `flush_interval_s`: how often recorded events are handed to WatchLLM.
    - `summary_interval_s`: how long the requests' summaries may wait for a flush that hands
      over anything else (each store insert has a large fixed cost, recorder.py).
    """

    def __init__(
        self,
        app: ASGIApp,
        watchllm: Starlette | WatchLLM,
        *,
        project_id: str | None = None,
        user_header: str | None = "X-User-Id",
        get_user: UserGetter | None = None,
        enforce: bool = True,
        record: bool = True,
        routes: Mapping[str, RouteOptions] | None = None,
        user_daily_budget_usd: float | None = None,
        budget_cache_s: float | None = None,
        flush_interval_s: float = 0.1,
        summary_interval_s: float = 5.0,
        run_id_response_header: bool = True,
    ) -> None:
        self.app = app
        wl = watchllm.state.watchllm if _is_watchllm_app(watchllm) else watchllm
        if not isinstance(wl, WatchLLM):
            raise TypeError(f"{watchllm!r} is not an app made by watchllm_ext.create_app")
        self.wl = wl
        settings = wl.settings
        self.principal = Principal(project_id or settings.host_project_id, frozenset({"ingest"}))
        self.owner = owner_for(wl, self.principal, flush_interval_s, summary_interval_s)
        self.user_header = user_header.lower().encode("latin-1") if user_header else None
        self.user_source = user_header or "user"  # what a denial's `field` names
        self.get_user = get_user
        self.enforce = enforce
        self.record = record
        self.routes = dict(routes or {})
        self.echo_run_id = run_id_response_header
        budget = (
            user_daily_budget_usd
            if user_daily_budget_usd is not None
            else settings.user_daily_budget_usd
        )
        if budget is not None:
            cache_s = budget_cache_s if budget_cache_s is not None else settings.user_budget_cache_s
            name = f"watchllm-user-daily-budget-{id(self)}"
            self.budget: UserDailyBudget | None = UserDailyBudget(wl, budget, cache_s)
            wl.pm.register(self.budget, name=name)
        else:
            self.budget = None
        self._quota_hook = wl.pm.hook.check_quota
        # The server's price tables (the cost plugin), for the calls the summary counts.
        self._estimator = next(
            (p for p in wl.pm.get_plugins() if callable(getattr(p, "price_for", None))), None
        )
        self._resolved: dict[tuple[int, str, str, str], _Resolved] = {}
        self._warned_not_running = False

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:  # websockets: passed through, not observed
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start WatchLLM before the host's own startup, stop it after the host's shutdown."""
        startup = await receive()
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.owner.run())
            except Exception as exc:
                # One line for the server to print (uvicorn: then "Application startup
                # failed. Exiting."), rather than a traceback.
                if isinstance(exc, HostStartError):
                    text = str(exc)
                elif isinstance(exc, DataFolderError):  # one line naming the folder already
                    text = f"WatchLLM: {exc}"
                else:
                    text = f"WatchLLM: {exc!r}"
                await send({"type": "lifespan.startup.failed", "message": text})
                return
            first = True

            async def host_receive() -> Message:
                nonlocal first
                if first:
                    first = False
                    return startup
                return await receive()

            async def host_send(message: Message) -> None:
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    await stack.aclose()  # flush before the server is told it may exit
                await send(message)

            await self.app(scope, host_receive, host_send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        resolved = self._resolve(scope)
        if resolved.bypass:
            await self.app(scope, receive, send)
            return
        owner = self.owner
        if not owner.running and not await owner.start_lazily():
            if not self._warned_not_running:
                log.warning("WatchLLM is not running: requests pass unobserved")
                self._warned_not_running = True
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        timestamp = datetime.now(UTC)
        run_id, parent_id, user_id = self._read_headers(scope)
        if self.get_user is not None:
            found = self.get_user(HTTPConnection(scope))
            if not isinstance(found, str | None):
                found = await found
            user_id = found[:MAX_USER_CHARS] if found else None
        event_id = fast_id()
        # The tally counts the calls logged in the request's run (recorder and SDK alike).
        context = RunContext(run_id, parent_event_id=event_id, user_id=user_id, tally=RunTally())
        recorder = Recorder(context, event_id, owner.outbox)
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["watchllm"] = recorder
        options = resolved.options
        enforce = self.enforce if options is None or options.enforce is None else options.enforce
        record = self.record if options is None or options.record is None else options.record
        method = scope["method"]
        run_header = (b"x-watchllm-run-id", run_id.encode()) if self.echo_run_id else None

        if enforce:
            denied = await self._check(user_id, resolved.template)
            if denied is not None:
                response = denied.response()
                if run_header is not None:
                    response.raw_headers.append(run_header)
                await response(scope, receive, send)
                if record:
                    self._summary(
                        recorder, method, resolved.template, parent_id, timestamp,
                        time.perf_counter() - started, denied.status, None, denied,
                    )  # fmt: skip
                return

        status = 0
        ended = 0.0

        async def observed_send(message: Message) -> None:
            nonlocal status, ended
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                if run_header is not None:
                    message["headers"] = [*message.get("headers", ()), run_header]
            elif kind == "http.response.body" and not message.get("more_body", False):
                ended = time.perf_counter()
            await send(message)

        error: BaseException | None = None
        try:
            # ContextVar.set/reset rather than the context managers: this is per request.
            run_token = _current_run.set(context)
            recorder_token = _current_recorder.set(recorder)
            try:
                await self.app(scope, receive, observed_send)
            finally:
                _current_recorder.reset(recorder_token)
                _current_run.reset(run_token)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if record:
                code = status or (500 if error is not None else 0)
                self._summary(
                    recorder, method, resolved.template, parent_id, timestamp,
                    (ended or time.perf_counter()) - started, code, error, None,
                )  # fmt: skip

    # --- parts ------------------------------------------------------------------------------

    def _read_headers(self, scope: Scope) -> tuple[str, str | None, str | None]:
        """(run id, the caller's span id from traceparent, user) from the request headers."""
        run_id = traceparent = user = None
        user_header = self.user_header
        for name, value in scope["headers"]:
            if name == b"x-watchllm-run-id":
                run_id = value.decode("latin-1")
            elif name == b"traceparent":
                traceparent = value.decode("latin-1")
            elif name == user_header:
                user = _header_text(value)[:MAX_USER_CHARS] or None
        parent = None
        if traceparent is not None:
            match = _TRACEPARENT.fullmatch(traceparent.strip())
            if match and match[1] != "ff" and match[2] != _ZERO_TRACE and match[3] != _ZERO_SPAN:
                # The OTel mapping (design): trace id -> run_id, the caller's span -> parent,
                # named as the receiver names a span's event (`<trace>-<span>`, otel.ids), so
                # that an LLM caller span's event is the parent; the run tree links it either way.
                if run_id is None:
                    run_id = match[2]
                parent = event_id_of(match[2], match[3])
        if run_id is None or not is_id(run_id):
            run_id = fast_id()  # none, or not an id the contract takes: a run of its own
        return run_id, parent, user

    async def _check(self, user_id: str | None, template: str | None) -> Problem | None:
        if not self._quota_hook.get_hookimpls():
            return None  # no quota plugin at all: nothing to ask
        try:
            await self.wl.check_quota(self.principal, 0, user_id=user_id, route=template)
        except PluginFailed:
            # A quota plugin that fails must not take the host down: the request goes on
            # (the failure and its traceback are logged as the plugin's).
            log.warning("a check_quota plugin failed; the request is let through")
        except Problem as exc:
            if exc.field is None:
                exc.field = self.user_source if user_id is not None else "path"
            return exc
        except Exception:
            log.exception("a check_quota plugin failed; the request is let through")
        return None

    def _summary(
        self,
        recorder: Recorder,
        method: str,
        template: str | None,
        parent_id: str | None,
        timestamp: datetime,
        seconds: float,
        status: int,
        error: BaseException | None,
        denied: Problem | None,
    ) -> None:
        """Put the request's summary in the outbox, as plain values (`_Summary`): the event
        itself is built when the outbox hands it over."""
        tally = recorder.tally
        llm = None
        if tally.calls:
            cost, unpriced = self._priced(tally)
            llm = (tally.calls, tally.tokens_input, tally.tokens_output, tally.cost_usd, cost,
                   unpriced)  # fmt: skip
        if denied is not None:
            outcome = "warning"
            observation: str | None = f"denied: {denied.message}"[:10_000]
            error_type = None
        elif error is not None and not isinstance(error, Exception):
            outcome, observation, error_type = "error", f"cancelled ({type(error).__name__})", None
        elif error is not None:
            outcome = "error"
            observation = f"{type(error).__name__}: {error}"[:10_000]
            error_type = type(error).__name__
        else:
            outcome, observation, error_type = "error" if status >= 500 else "success", None, None
        self.owner.outbox.put(
            _Summary(
                recorder.event_id, recorder.run_id, timestamp, method, template or "(no route)",
                status, seconds, parent_id, recorder.user_id, recorder.session_id, outcome,
                observation, error_type, denied.code if denied is not None else None, llm,
                tuple(recorder.tags), dict(recorder.metadata) if recorder.metadata else None,
            ),
            summary=True,
        )  # fmt: skip

    def _priced(self, tally: RunTally) -> tuple[float, int]:
        """The request's cost: the calls' own, plus the others priced from their model as
        the server prices them (builtins/cost.py); and how many no price was found for."""
        cost = tally.cost_usd
        unknown = 0
        estimator = self._estimator
        for provider, model, tokens_in, tokens_out in tally.unpriced:
            price = None
            if (
                estimator is not None
                and isinstance(model, str)
                and model
                and (type(tokens_in) is int or type(tokens_out) is int)
            ):
                price = estimator.price_for(provider if isinstance(provider, str) else None, model)
            if price is None:
                unknown += 1
                continue
            cost += price.cost(
                tokens_in if type(tokens_in) is int else 0,
                tokens_out if type(tokens_out) is int else 0,
            )
        return cost, unknown

    # --- routes -----------------------------------------------------------------------------

    def _resolve(self, scope: Scope) -> _Resolved:
        """The route the host will run for this request (matched as its router will)."""
        router = getattr(scope.get("app"), "router", None) or getattr(self.app, "router", None)
        routes = getattr(router, "routes", None)
        if not routes:
            return _NO_ROUTE
        key = (id(router), scope["method"], scope["path"], scope.get("root_path", ""))
        found = self._resolved.get(key)
        if found is None:
            found = self._walk(routes, scope, "")
            if len(self._resolved) >= 4096:  # paths with ids in them: keep the memory bounded
                self._resolved.clear()
            self._resolved[key] = found
        return found

    def _walk(self, routes: list[BaseRoute], scope: Scope, prefix: str) -> _Resolved:
        partial: tuple[BaseRoute, Scope] | None = None
        for route in routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return self._found(route, child, scope, prefix)
            if match is Match.PARTIAL and partial is None:
                partial = (route, child)  # the router answers 405 with it
        if partial is not None:
            return self._found(partial[0], partial[1], scope, prefix)
        return _NO_ROUTE

    def _found(self, route: BaseRoute, child: Scope, scope: Scope, prefix: str) -> _Resolved:
        # A route's template without convertors ("/items/{item_id}", as FastAPI writes it
        # and OTel's http.route wants); a mount's own path.
        sub_routes = getattr(route, "routes", None)
        own = getattr(route, "path", "") if sub_routes is not None else None
        path = prefix + (own if own is not None else getattr(route, "path_format", "") or "")
        inner = getattr(route, "_base_app", None) or getattr(route, "app", None)
        if _is_watchllm_app(inner):
            return _BYPASS
        if sub_routes:
            return self._walk(sub_routes, {**scope, **child}, path)
        template = path + "/{path}" if sub_routes is not None else path
        endpoint = getattr(route, "endpoint", None) or inner
        options = self.routes.get(template) or getattr(endpoint, "__watchllm_route__", None)
        return _Resolved(template or "/", options, False)
