"""The in-process exporter: spans of a host app's own TracerProvider into the WatchLLM app it
mounts, with no HTTP hop.

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from watchllm_ext.otel.exporter import WatchLLMSpanExporter

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(WatchLLMSpanExporter(api_key=KEY)))

Each `ReadableSpan` becomes a `mapping.Span` (what the OTLP receiver decodes a request into)
and the batch goes to `otel.ingest.ingest_spans` on the app's event loop: the same key check,
quota, mapping, spool and writer as `POST /v1/traces`. The exporter is called from the
BatchSpanProcessor's thread; it waits for the app's answer (bounded by `timeout_s`), retries
an answer that says "later" (503 with Retry-After, 429) within that time, and returns
SUCCESS or FAILURE as the SpanExporter contract says.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from ..app import WatchLLM
from ..errors import Problem
from ..sdk.context import local_apps
from .decode import (
    MAX_ATTRIBUTES,
    MAX_EVENTS,
    MAX_KEY_CHARS,
    MAX_LINKS,
    MAX_PROBLEMS_LISTED,
    MAX_VALUE_DEPTH,
    BadSpan,
)
from .ids import time_problem, times_ok
from .ingest import ingest_spans
from .mapping import Span, SpanEvent, attribute_texts

log = logging.getLogger("watchllm.otel.exporter")

DEFAULT_TIMEOUT_S = 10.0  # the OTLP exporter's default (OTEL_EXPORTER_OTLP_TIMEOUT)
# Answers that mean "not now": retried until the export's time is up, as OTLP exporters do.
RETRYABLE = frozenset({429, 503})
# The first wait before a retry without Retry-After, doubled each time up to the maximum.
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0
# Spans per call before the app is found (then its max_batch_events).
DEFAULT_CHUNK = 512

_KINDS = {
    SpanKind.INTERNAL: "internal",
    SpanKind.SERVER: "server",
    SpanKind.CLIENT: "client",
    SpanKind.PRODUCER: "producer",
    SpanKind.CONSUMER: "consumer",
}
_STATUSES = {StatusCode.UNSET: "unset", StatusCode.OK: "ok", StatusCode.ERROR: "error"}
_SCALARS = frozenset({str, int, float, bool, type(None)})


# --- conversion ---------------------------------------------------------------------------------


def to_span(span: ReadableSpan, resources: dict[int, dict[str, Any]] | None = None) -> Span:
    """A finished SDK span as the receiver decodes the same span from OTLP (otel/decode.py):
    ids as lowercase hex, times in Unix nanoseconds, attribute values as plain Python values,
    and the receiver's bounds (BadSpan past them), so a span is stored or refused alike
    whichever way it came in. `resources`: the resources converted so far, by identity (the
    spans of one provider share one; like the receiver's, theirs is one dict)."""
    context = span.context
    if context is None:
        raise BadSpan("the span has no span context")
    parent = span.parent
    # Unset times are 0, as the SDK's OTLP encoder sends them; times the events' range cannot
    # hold are refused as the receiver refuses them (ids.py), never moved.
    start = span.start_time or 0
    end = span.end_time or 0
    if not times_ok(start, end):
        raise BadSpan(time_problem(start, end) or "bad times")
    status = span.status
    scope = span.instrumentation_scope
    events, links = span.events, span.links  # each a copy made under the span's lock
    if len(events) > MAX_EVENTS:
        raise BadSpan(f"{len(events)} events, over the limit of {MAX_EVENTS}")
    if len(links) > MAX_LINKS:
        raise BadSpan(f"{len(links)} links, over the limit of {MAX_LINKS}")
    return Span(
        trace_id=_id(context.trace_id, 32, "traceId"),
        span_id=_id(context.span_id, 16, "spanId"),
        name=span.name,
        start_unix_nano=start,
        end_unix_nano=end,
        # A parent from another process (a remote context) is still this span's parent.
        parent_span_id=_id(parent.span_id, 16, "parentSpanId") if parent is not None else None,
        kind=_KINDS.get(span.kind, "unspecified"),
        status_code=_STATUSES.get(status.status_code, "unset"),
        status_message=status.description or "",
        attributes=(attrs := attributes(span.attributes, "attributes")),
        attribute_texts=attribute_texts(attrs),
        resource=_resource(span, resources),
        scope_name=scope.name if scope is not None else "",
        scope_version=(scope.version or "") if scope is not None else "",
        events=[
            SpanEvent(e.name, e.timestamp or 0, attributes(e.attributes, f"events[{n}]"))
            for n, e in enumerate(events)
        ],
        links=[
            {
                "trace_id": _id(link.context.trace_id, 32, f"links[{n}].traceId"),
                "span_id": _id(link.context.span_id, 16, f"links[{n}].spanId"),
                "attributes": attributes(link.attributes, f"links[{n}].attributes"),
            }
            for n, link in enumerate(links)
        ],
    )


def attributes(values: Mapping[str, Any] | None, where: str = "attributes") -> dict[str, Any]:
    """SDK attributes (AnyValue: tuples, bytes, nested mappings) as plain values."""
    if not values:
        return {}
    if len(values) > MAX_ATTRIBUTES:
        raise BadSpan(f"{where}: {len(values)} attributes, over the limit of {MAX_ATTRIBUTES}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if type(key) is not str:
            key = str(key)
        if len(key) > MAX_KEY_CHARS:
            raise BadSpan(f"{where}: a key of {len(key)} characters (limit {MAX_KEY_CHARS})")
        # Most values are scalars: kept as they are without the walk below.
        out[key] = value if type(value) in _SCALARS else plain(value, 0, key)
    return out


def plain(value: Any, depth: int = 0, key: str = "") -> Any:
    """One AnyValue as the receiver decodes it: bytes as base64 text, sequences as lists."""
    if type(value) in _SCALARS or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if depth >= MAX_VALUE_DEPTH:
        raise BadSpan(f"attribute {key[:100]!r} is nested deeper than {MAX_VALUE_DEPTH} levels")
    if isinstance(value, Mapping):
        if len(value) > MAX_ATTRIBUTES:
            raise BadSpan(f"attribute {key[:100]!r} holds {len(value)} pairs (limit 1024)")
        return {str(k): plain(v, depth + 1, key) for k, v in value.items()}
    if isinstance(value, Sequence):
        if len(value) > MAX_ATTRIBUTES:
            raise BadSpan(f"attribute {key[:100]!r} holds {len(value)} values (limit 1024)")
        return [plain(v, depth + 1, key) for v in value]
    return str(value)  # not an AnyValue type; the SDK would not have kept it, but never fail


def _resource(span: ReadableSpan, cache: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    resource = span.resource
    if resource is None:
        return {}
    if cache is None:
        return attributes(resource.attributes, "resource")
    found = cache.get(id(resource))
    if found is None:
        found = cache[id(resource)] = attributes(resource.attributes, "resource")
    return found


def _id(value: int, digits: int, name: str) -> str:
    if not value:
        raise BadSpan(f"{name} is all zeros (an invalid id)")
    return format(value, f"0{digits}x")


def convert(spans: Sequence[ReadableSpan]) -> tuple[list[Span], list[str]]:
    """The spans that convert, and a problem line for each that does not (as the receiver
    names a span it rejects)."""
    converted: list[Span] = []
    problems: list[str] = []
    # Alive as long as `spans` is, so an id names one resource throughout.
    resources: dict[int, dict[str, Any]] = {}
    for span in spans:
        try:
            converted.append(to_span(span, resources))
        except BadSpan as exc:
            context = span.context
            sid = format(context.span_id, "016x") if context is not None else "?"
            problems.append(f"span {sid} ({span.name[:80]!r}): {exc}")
    return converted, problems


# --- the exporter -------------------------------------------------------------------------------


class WatchLLMSpanExporter(SpanExporter):
    """A `SpanExporter` into a WatchLLM app running in this process.

    `app`: the `WatchLLM` (`create_app(...).state.watchllm`) or the ASGI app `create_app`
    returned; None means the first WatchLLM app running in this process
    (`watchllm_ext.sdk.context.local_apps()`), looked up at each export, so the exporter can
    be made before the host app has started. `api_key`: a key with the ingest scope (its
    project owns the spans); None reads `WATCHLLM_API_KEY`. `timeout_s` bounds each export,
    retries included.
    """

    def __init__(
        self, app: Any = None, api_key: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("WATCHLLM_API_KEY", "")
        if not key:
            raise ValueError(
                "api_key: pass a WatchLLM key with the ingest scope, or set WATCHLLM_API_KEY"
            )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self._app: WatchLLM | None = _watchllm_of(app)
        self._key = key
        self._timeout_s = timeout_s
        self._shutdown = False
        # Exports made on the app's own event loop thread cannot wait there (it would block
        # the loop that runs them): they run as tasks, kept here for force_flush/shutdown.
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        # What happened to the spans handed over, for the host's own checks and logs.
        self.exported_spans = 0
        self.rejected_spans = 0
        self.failed_spans = 0

    # -- SpanExporter ------------------------------------------------------------------------

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            log.warning("export after shutdown: %d spans not exported", len(spans))
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        converted, problems = convert(spans)
        deadline = time.monotonic() + self._timeout_s
        wl = self._watchllm()
        # A batch over the app's max_batch_events (a BatchSpanProcessor set to export more
        # than that at once) goes in several calls; spans refused here count in the first.
        limit = wl.settings.max_batch_events if wl is not None else DEFAULT_CHUNK
        rejected = min(len(problems), limit - 1)
        if len(problems) > rejected:  # more refused spans than one call may name: counted here
            self._count(rejected=len(problems) - rejected)
        size = limit - rejected
        chunks = [converted[i : i + size] for i in range(0, len(converted), size)] or [[]]
        for n, chunk in enumerate(chunks):
            named = problems[:MAX_PROBLEMS_LISTED] if n == 0 else []
            if not self._deliver(chunk, rejected if n == 0 else 0, named, deadline):
                # The time is up or the key refused: the chunks after this one would fare no
                # better, and are not sent (a late call could still store them).
                self._count(failed=sum(len(c) for c in chunks[n + 1 :]))
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _deliver(
        self, spans: list[Span], rejected: int, problems: list[str], deadline: float
    ) -> bool:
        """One call of ingest_spans on the app's loop, retried while the answer is "later"
        and time is left; True when the app took the spans (some may have been refused)."""
        n = len(spans) + rejected
        wait = RETRY_INITIAL_S
        while True:
            wl = self._watchllm()
            # The loop the app runs on, as WatchLLM.ingest_from_thread reaches it.
            loop: asyncio.AbstractEventLoop | None = getattr(wl, "_loop", None)
            retry_after: float | None = None
            if wl is None or loop is None:
                reason = "no WatchLLM app is running in this process"
            elif _on_loop(loop):
                self._schedule(wl, loop, spans, rejected, problems)
                return True
            else:
                future = asyncio.run_coroutine_threadsafe(
                    _ingest(wl, self._key, spans, rejected, problems), loop
                )
                try:
                    answer = future.result(max(deadline - time.monotonic(), 0.001))
                except TimeoutError:
                    # The call goes on and may still take the spans: they are not sent again.
                    log.warning(
                        "WatchLLM did not answer within %.1f s: %d spans may be lost",
                        self._timeout_s,
                        n,
                    )
                    self._count(failed=n)
                    return False
                except Problem as exc:
                    if exc.status not in RETRYABLE:
                        log.error("WatchLLM refused %d spans: %s", n, _why(exc))
                        self._count(failed=n)
                        return False
                    reason = _why(exc)
                    retry_after = _retry_after(exc)
                except Exception as exc:  # a bug on the app's side: logged, never raised
                    log.error("exporting %d spans failed: %r", n, exc)
                    self._count(failed=n)
                    return False
                else:
                    return self._answered(answer, n)
            remaining = deadline - time.monotonic()
            if retry_after is not None:
                # The app named its time: asking sooner is pointless, and later is too late.
                pause, give_up = retry_after, retry_after > remaining
            else:
                # No app yet (a host still starting): backing off, up to the last moment.
                pause, give_up = min(wait, remaining), remaining < RETRY_INITIAL_S
                wait = min(wait * 2, RETRY_MAX_S)
            if give_up:
                log.error("%d spans not exported in %.1f s: %s", n, self._timeout_s, reason)
                self._count(failed=n)
                return False
            time.sleep(pause)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait for the exports still running on the app's loop (there are none unless spans
        were ended on that loop's thread); True when they are done."""
        with self._lock:
            pending = list(self._pending)
        if not pending:
            return True
        if _in_a_loop():
            return False  # waiting here would block the loop that has to run them
        _, not_done = concurrent.futures.wait(pending, timeout=timeout_millis / 1000)
        return not not_done

    def shutdown(self) -> None:
        self._shutdown = True
        self.force_flush(int(self._timeout_s * 1000))

    # -- inside --------------------------------------------------------------------------------

    def _watchllm(self) -> Any:
        if self._app is not None:
            return self._app
        apps = local_apps()
        return apps[0] if apps else None

    def _schedule(
        self,
        wl: Any,
        loop: asyncio.AbstractEventLoop,
        spans: list[Span],
        rejected: int,
        problems: list[str],
    ) -> None:
        """Ingest on the loop this thread is running (a span ended in an async handler with a
        SimpleSpanProcessor): no wait is possible here, the answer is logged when it comes."""
        n = len(spans) + rejected
        future = asyncio.run_coroutine_threadsafe(
            _ingest(wl, self._key, spans, rejected, problems), loop
        )
        with self._lock:
            self._pending.add(future)

        def done(f: concurrent.futures.Future[Any]) -> None:
            with self._lock:
                self._pending.discard(f)
            if f.cancelled():
                self._count(failed=n)
            elif (exc := f.exception()) is not None:
                log.error("WatchLLM refused %d spans: %s", n, _why(exc))
                self._count(failed=n)
            else:
                self._answered(f.result(), n)

        future.add_done_callback(done)

    def _answered(self, answer: Mapping[str, Any], sent: int) -> bool:
        rejected = int(answer.get("rejected_spans", 0) or 0)
        accepted = int(answer.get("accepted_spans", 0) or 0)
        if rejected:
            # The OTLP exporters' way with a partial success: logged, and not sent again
            # (the same spans would be refused again).
            log.warning(
                "WatchLLM rejected %d of %d spans: %s", rejected, sent, answer.get("errors")
            )
        self._count(exported=accepted, rejected=rejected)
        return accepted > 0 or rejected == 0  # all refused: a failure, as the receiver's 400

    def _count(self, exported: int = 0, rejected: int = 0, failed: int = 0) -> None:
        with self._lock:
            self.exported_spans += exported
            self.rejected_spans += rejected
            self.failed_spans += failed


async def _ingest(
    wl: Any, api_key: str, spans: list[Span], rejected: int, problems: list[str]
) -> dict[str, Any]:
    """On the app's loop: the key's principal (401/403 as errors.Problem), then the spans."""
    principal = wl.principal_for(api_key, "ingest", field="api_key")
    return await ingest_spans(wl, principal, spans, rejected=rejected, problems=problems)


def _watchllm_of(app: Any) -> WatchLLM | None:
    if app is None or isinstance(app, WatchLLM):
        return app
    # The ASGI app create_app returned carries its WatchLLM on its state.
    wl = getattr(getattr(app, "state", None), "watchllm", None)
    if isinstance(wl, WatchLLM):
        return wl
    raise ValueError(
        f"app: expected a WatchLLM or the app create_app() returned, got {type(app).__name__}"
    )


def _in_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _why(exc: BaseException) -> str:
    return f"{exc.status} {exc.body()}" if isinstance(exc, Problem) else repr(exc)


def _retry_after(exc: Problem) -> float | None:
    value = exc.headers.get("Retry-After")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None
