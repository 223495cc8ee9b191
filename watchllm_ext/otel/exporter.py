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

from ..errors import Problem
from ..sdk.context import local_apps
from .mapping import Span, SpanEvent

log = logging.getLogger("watchllm.otel.exporter")

DEFAULT_TIMEOUT_S = 10.0  # the OTLP exporter's default (OTEL_EXPORTER_OTLP_TIMEOUT)
# Answers that mean "not now": retried until the export's time is up, as OTLP exporters do.
RETRYABLE = frozenset({429, 503})
# The first wait before a retry without Retry-After, doubled each time up to the maximum.
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0

_KINDS = {
    SpanKind.INTERNAL: "internal",
    SpanKind.SERVER: "server",
    SpanKind.CLIENT: "client",
    SpanKind.PRODUCER: "producer",
    SpanKind.CONSUMER: "consumer",
}
_STATUSES = {StatusCode.UNSET: "unset", StatusCode.OK: "ok", StatusCode.ERROR: "error"}


# --- conversion ---------------------------------------------------------------------------------


def to_span(span: ReadableSpan) -> Span:
    """A finished SDK span as the receiver decodes the same span from OTLP: ids as lowercase
    hex, times in Unix nanoseconds, attribute values as plain Python values."""
    context = span.context
    if context is None:
        raise ValueError(f"span {span.name!r} has no span context")
    parent = span.parent
    start = span.start_time or 0
    end = span.end_time if span.end_time is not None else start
    status = span.status
    scope = span.instrumentation_scope
    return Span(
        trace_id=format(context.trace_id, "032x"),
        span_id=format(context.span_id, "016x"),
        name=span.name,
        start_unix_nano=start,
        end_unix_nano=end,
        # A parent from another process (a remote context) is still this span's parent.
        parent_span_id=format(parent.span_id, "016x") if parent is not None else None,
        kind=_KINDS.get(span.kind, "unspecified"),
        status_code=_STATUSES.get(status.status_code, "unset"),
        status_message=status.description or "",
        attributes=attributes(span.attributes),
        resource=attributes(span.resource.attributes if span.resource is not None else None),
        scope_name=scope.name if scope is not None else "",
        scope_version=(scope.version or "") if scope is not None else "",
        events=[SpanEvent(e.name, e.timestamp or 0, attributes(e.attributes)) for e in span.events],
        links=[
            {
                "trace_id": format(link.context.trace_id, "032x"),
                "span_id": format(link.context.span_id, "016x"),
                "attributes": attributes(link.attributes),
            }
            for link in span.links
        ],
    )


def attributes(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """SDK attributes (AnyValue: tuples, bytes, nested mappings) as plain values."""
    if not values:
        return {}
    return {str(k): plain(v) for k, v in values.items()}


def plain(value: Any) -> Any:
    """One AnyValue as the receiver decodes it: bytes as base64 text, sequences as lists."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [plain(v) for v in value]
    return str(value)  # not an AnyValue type; the SDK would not have kept it, but never fail


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
        self._app = app
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
        converted: list[Span] = []
        for span in spans:
            try:
                converted.append(to_span(span))
            except Exception as exc:  # one odd span must not cost the batch
                log.warning("span %r not exported: %s", getattr(span, "name", "?"), exc)
                self._count(failed=1)
        if not converted:
            return SpanExportResult.FAILURE
        deadline = time.monotonic() + self._timeout_s
        wait = RETRY_INITIAL_S
        while True:
            wl = self._watchllm()
            loop = getattr(wl, "_loop", None) if wl is not None else None
            if wl is None or loop is None:
                reason: str = "no WatchLLM app is running in this process"
                retry_after: float | None = None
            else:
                if _on_loop(loop):
                    self._schedule(wl, loop, converted)
                    return SpanExportResult.SUCCESS
                try:
                    answer = asyncio.run_coroutine_threadsafe(
                        _ingest(wl, self._key, converted), loop
                    ).result(max(deadline - time.monotonic(), 0.001))
                except TimeoutError:
                    # The batch may still be taken (it runs on): not counted as failed twice.
                    log.warning(
                        "WatchLLM did not answer within %.1f s: %d spans may be lost",
                        self._timeout_s,
                        len(converted),
                    )
                    self._count(failed=len(converted))
                    return SpanExportResult.FAILURE
                except Problem as exc:
                    if exc.status not in RETRYABLE:
                        log.error("WatchLLM refused %d spans: %s", len(converted), _why(exc))
                        self._count(failed=len(converted))
                        return SpanExportResult.FAILURE
                    reason = _why(exc)
                    retry_after = _retry_after(exc)
                except Exception as exc:  # a bug on the app's side: logged, not raised into the SDK
                    log.exception("exporting %d spans failed: %r", len(converted), exc)
                    self._count(failed=len(converted))
                    return SpanExportResult.FAILURE
                else:
                    self._answered(answer, len(converted))
                    return SpanExportResult.SUCCESS
            pause = retry_after if retry_after is not None else wait
            wait = min(wait * 2, RETRY_MAX_S)
            if time.monotonic() + pause > deadline:
                log.error(
                    "%d spans not exported in %.1f s: %s", len(converted), self._timeout_s, reason
                )
                self._count(failed=len(converted))
                return SpanExportResult.FAILURE
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
        app = self._app
        if app is None:
            apps = local_apps()
            return apps[0] if apps else None
        state = getattr(app, "state", None)  # the ASGI app create_app returned
        return getattr(state, "watchllm", app) if state is not None else app

    def _schedule(self, wl: Any, loop: asyncio.AbstractEventLoop, spans: list[Span]) -> None:
        """Ingest on the loop this thread is running (a span ended in an async handler with a
        SimpleSpanProcessor): no wait is possible here, the answer is logged when it comes."""
        future = asyncio.run_coroutine_threadsafe(_ingest(wl, self._key, spans), loop)
        with self._lock:
            self._pending.add(future)

        def done(f: concurrent.futures.Future[Any]) -> None:
            with self._lock:
                self._pending.discard(f)
            if f.cancelled():
                self._count(failed=len(spans))
            elif (exc := f.exception()) is not None:
                log.error("WatchLLM refused %d spans: %s", len(spans), _why(exc))
                self._count(failed=len(spans))
            else:
                self._answered(f.result(), len(spans))

        future.add_done_callback(done)

    def _answered(self, answer: Mapping[str, Any], sent: int) -> None:
        rejected = int(answer.get("rejected_spans", 0) or 0)
        if rejected:
            # The OTLP exporters' way with a partial success: logged, and the export succeeded
            # (sending the same bad spans again would be refused again).
            log.warning(
                "WatchLLM rejected %d of %d spans: %s", rejected, sent, answer.get("errors")
            )
        self._count(exported=sent - rejected, rejected=rejected)

    def _count(self, exported: int = 0, rejected: int = 0, failed: int = 0) -> None:
        with self._lock:
            self.exported_spans += exported
            self.rejected_spans += rejected
            self.failed_spans += failed


async def _ingest(wl: Any, api_key: str, spans: list[Span]) -> dict[str, Any]:
    """On the app's loop: the key's principal (401/403 as errors.Problem), then the spans."""
    from .ingest import ingest_spans  # the server side; imported where it runs

    principal = wl.principal_for(api_key, "ingest", field="api_key")
    return await ingest_spans(wl, principal, spans)


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
