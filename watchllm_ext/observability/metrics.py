"""The operational series of `/metrics`: request latency per route, rejections by reason,
quota denials, Guardian alerts and store query latency. They live in the app's own registry
(metrics.make_registry), beside the writer's collector."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Problem, answer_for
from ..flags import _REQUEST_CACHE
from ..serving.protocol import ANSWERED

log = logging.getLogger("watchllm.http")

# The status a request is counted under when its client closed the connection before the
# request was complete (nginx's 499): no answer was sent, and it is no server error.
CLIENT_CLOSED = 499

# Seconds: ingestion answers in a few ms, analytics over months in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class OpsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Histogram(
            "watchllm_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.rejections = Counter(
            "watchllm_rejections",
            "Requests answered 4xx, by reason (the error code of the answer)",
            ["reason"],
            registry=registry,
        )
        self.quota_denials = Counter(
            "watchllm_quota_denials",
            "Quota checks denied: check=ingest (an ingest request) or host (the host"
            " middleware's pre-request check)",
            ["check"],
            registry=registry,
        )
        self.alerts = Counter(
            "watchllm_alerts",
            "Guardian alerts, by rule and state (firing: an episode began; recovered: it ended)",
            ["rule", "state"],
            registry=registry,
        )
        self.firing = Gauge(
            "watchllm_alerts_firing",
            "Guardian episodes going on now, by rule (projects, runs or users over it)",
            ["rule"],
            registry=registry,
        )
        self.otel_spans = Counter(
            "watchllm_otel_spans",
            "OpenTelemetry spans received, by outcome (accepted, rejected)",
            ["outcome"],
            registry=registry,
        )
        # By namespace, from a fixed list (otel.mapped.unmapped_label), never by key: this
        # registry is served without a key, and attribute keys are a project's own text.
        self.otel_unmapped = Counter(
            "watchllm_otel_unmapped_attributes",
            "Attributes of LLM spans that no mapping rule read (kept in `spans` and the"
            " event's metadata), by the namespace of their key: gen_ai, llm, http, ... (a"
            " fixed list of public conventions'), or (other)",
            ["namespace"],
            registry=registry,
        )
        self.otel_bodies = Counter(
            "watchllm_otel_bodies",
            "OTLP bodies, by where they were decoded and mapped: worker (a worker process,"
            " otel_worker_processes: bodies of 64 KiB and more), server (a worker thread of the"
            " server: bodies of 2 KiB of protobuf or 1 KiB of JSON and more, and bigger ones"
            " when no worker process was set, alive or ready, or the one called failed) or"
            " inline (the event loop: smaller bodies)",
            ["where"],
            registry=registry,
        )
        self.ingest_bodies = Counter(
            "watchllm_ingest_bodies",
            "Event bodies of 64 KiB and more, by where they were validated and encoded: worker"
            " (a worker process, ingest_worker_processes), server (no worker was set, alive or"
            " ready, or a plugin hook must see the events in the server) or declined (the"
            " worker's fast validator declined it: the worker gave the detailed answer)",
            ["where"],
            registry=registry,
        )
        self.http_refused = Counter(
            "watchllm_http_refused",
            "Requests that `watchllm serve`'s HTTP layer answered itself, before the app (so"
            " not in watchllm_http_request_duration_seconds), by status and error code:"
            " malformed requests, oversized headers, another HTTP version",
            ["status", "reason"],
            registry=registry,
        )
        self.queries = Histogram(
            "watchllm_store_query_duration_seconds",
            "Time of a read query on the store (analytics, Guardian, admin)",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )


def ops_metrics(wl: Any) -> OpsMetrics:
    """The app's operational series (made with its registry, or on first use)."""
    registry = wl.registry
    if registry is None:  # an app object made without create_app: counted, not exposed
        registry = wl.registry = CollectorRegistry(auto_describe=False)
    found = getattr(registry, "watchllm_ops", None)
    if found is None:
        found = OpsMetrics(registry)
        registry.watchllm_ops = found
    return found


def count_refused(wl: Any) -> Callable[[Problem], None]:
    """For serving.protocol.uvicorn_options: count each answer `watchllm serve`'s HTTP layer
    gives itself under its status and error code (a fixed set: the layer's own answers)."""
    counter = ops_metrics(wl).http_refused

    def refused(problem: Problem) -> None:
        counter.labels(str(problem.status), problem.code).inc()

    return refused


class RequestTimes:
    """Each request's time under its route template (never the raw path, whose ids would
    make a series each), method and status."""

    def __init__(self, wl: Any) -> None:
        self.wl = wl
        self._children: dict[tuple[str, str, int], Any] = {}

    def observe(self, scope: Scope, status: int, started: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        key = (route, scope["method"], status)
        child = self._children.get(key)
        if child is None:  # labels() costs a lock and a lookup: once per series
            child = ops_metrics(self.wl).requests.labels(route, scope["method"], str(status))
            self._children[key] = child
        child.observe(time.perf_counter() - started)


class RequestMetrics:
    """ASGI middleware around the app: times each request (RequestTimes) and gives it its own
    flag cache. ingest_lane.IngestLane does the same for the ingest routes it serves."""

    def __init__(self, app: ASGIApp, wl: Any) -> None:
        self.app = app
        self.wl = wl
        self.times = RequestTimes(wl)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = _REQUEST_CACHE.set({})  # this request's flag cache (flags/__init__.py)
        try:
            problem = repeated_singleton(self.wl, scope)
            if problem is not None:
                await answer_for(scope, problem)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        except ClientDisconnect:
            status = closed_early(scope, status)
        finally:
            _REQUEST_CACHE.reset(token)
            self.times.observe(scope, status, started)


# Headers of one value whose second line the server would not read (RFC 9110 5.3: a list of
# them is one comma-joined value): which one counts would depend on who reads which.
_SINGLETONS = ((b"authorization", "Authorization"), (b"content-type", "Content-Type"),
               (b"content-encoding", "Content-Encoding"))  # fmt: skip


def repeated_singleton(wl: Any, scope: Scope) -> Problem | None:
    """Two lines of Authorization, Content-Type or Content-Encoding: with two keys, which one
    is meant depends on who reads which (first wins here, last in some proxies); with two
    types or codings, a proxy may read the body otherwise than the server (the first was read,
    the second dropped unsaid). Refused (counted) on every route, as the server refuses two
    Content-Length headers."""
    names = [name for name, _ in scope["headers"]]
    for name, title in _SINGLETONS:
        repeated = names.count(name)
        if repeated > 1:
            problem = Problem(
                400, "bad_request", f"send one {title} header, not {repeated}", field=title
            )
            ops_metrics(wl).rejections.labels(problem.code).inc()
            return problem
    return None


def closed_early(scope: Scope, status: int) -> int:
    """The status of a request whose client went away before its body was complete (or broke
    its chunk framing): nothing of it was spooled and nobody waits for an answer. Not a
    server error: one INFO line, counted as 499 (nginx's "client closed request"), no
    traceback and nothing for Sentry (the exception ends with this)."""
    answered = scope.get(ANSWERED)  # a bad chunk framing's 400, sent by the server
    if status == 500:  # no answer begun here
        status = answered or CLIENT_CLOSED
    if answered is None:  # (the server logged its own answer)
        log.info(
            "%s %s: the client closed the connection before its request was complete",
            scope["method"],
            scope.get("path", ""),
        )
    return status


def counting_rejections(
    handler: Callable[[Request, Exception], Awaitable[Response]],
) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Wrap the Problem handler: count each 4xx answer under its error code."""

    async def handle(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status", 500)
        if 400 <= status < 500:
            ops_metrics(request.app.state.watchllm).rejections.labels(
                getattr(exc, "code", "unknown")
            ).inc()
        return await handler(request, exc)

    return handle


def time_queries(wl: Any, store: Any) -> None:
    """Time the store's read queries (once per store object)."""
    if store is None or getattr(store, "_watchllm_timed", False):
        return
    query = store.query
    histogram = ops_metrics(wl).queries

    def timed_query(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return query(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - started)

    try:
        store.query = timed_query
        store._watchllm_timed = True
    except AttributeError:  # a store with __slots__: left untimed
        pass
