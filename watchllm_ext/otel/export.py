"""The OTLP exporter sink: every stored event and span, as OTLP spans, to any OTLP/HTTP endpoint.

A built-in plugin, idle until `otlp_export_endpoint` is set (an OpenTelemetry Collector's
http://collector:4318/v1/traces, another backend, a second WatchLLM). It registers the sink
"otlp-export", which the writer feeds from its own spool cursor like every sink, with the
writer's retries and dead letters:

- `write(events)`: each v1 event becomes a span with GenAI attributes (gen_ai.operation.name
  chat / execute_tool / invoke_agent, models, provider, tokens, cost, messages) and the
  original ids and every other field as `watchllm.*` attributes, so a WatchLLM receiving it
  stores exactly that event again (mapping.py, "forwarded events"). Events that came from a
  span (metadata `otel.mapping_version`) are not sent: their span row carries them.
- `write_spans(rows)`: each stored span goes out as it was received (ids, times, kind,
  status, attributes, resource, span events, links).

Spans are grouped by resource: every span of a project carries the resource attribute
`watchllm.project_id`; a span row keeps its own resource attributes beside it. Requests are
`ExportTraceServiceRequest`s built with opentelemetry-proto's classes, protobuf, gzip.

Answers: 2xx is done (a `partial_success` is logged and its rejected spans counted; they are
not sent again, the endpoint said they never will be accepted); 408, 429 and 5xx and network
errors are retried by the writer (after sleeping the answer's Retry-After, at most
RETRY_AFTER_MAX_S); 413 splits the request in halves until one span is too large; any other
answer (400, 401, 403, 404, ...) will never succeed, and the batch goes to the dead letters
(`watchllm dead-letters replay` sends it again once the endpoint is fixed).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from hashlib import blake2b
from typing import Any

import anyio
import httpx
import msgspec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from prometheus_client.core import CounterMetricFamily, Metric

from .. import __version__
from ..delivery.writer import SinkError
from ..hookspecs import hookimpl
from ..schema import MODELS_BY_TYPE
from ..settings import Settings
from .ids import span_part
from .mapping import (
    FORWARDED_GENAI_KEYS,
    FORWARDED_JSON_FIELDS,
    FORWARDED_OWN_FIELDS,
    MAPPING_VERSION,
    WATCHLLM_EVENT_TYPE,
    attribute_text,
    prompt_from_genai,
    prompt_to_genai,
)
from .rows import SpanRow

log = logging.getLogger("watchllm.otel.export")

SINK_NAME = "otlp-export"
PROJECT_ATTRIBUTE = "watchllm.project_id"
# The OpenTelemetry SDK's BatchSpanProcessor sends 512 spans a request; collectors and
# backends are sized for that. A 413 halves a request further.
MAX_SPANS_PER_REQUEST = 512
# A Retry-After longer than this is cut to it: the writer's own backoff follows, and a sink
# asleep for an hour would look dead in /metrics.
RETRY_AFTER_MAX_S = 30.0
RETRYABLE_STATUSES = frozenset({408, 429})
# The receiving side's bound on nested attribute values (decode.MAX_VALUE_DEPTH is 16) and
# on list lengths: a stored value past them is sent as its text.
MAX_TYPED_DEPTH = 15
MAX_TYPED_ITEMS = 1_024
_INT64 = (-(2**63), 2**63 - 1)

KINDS = {"unspecified": 0, "internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
STATUSES = {"unset": 0, "ok": 1, "error": 2}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OUR_SCOPE = ("watchllm", __version__)


class RetryLater(Exception):
    """The endpoint asked to be tried again (408, 429, 5xx): the writer retries the batch."""


# --- events -> spans ----------------------------------------------------------------------------


def hex_id(value: str, size: int) -> str:
    """`value` when it is already `size` bytes of lowercase hex (and not all zeros, which
    OTLP calls invalid), else a stable hash of it of that size."""
    if len(value) == size * 2 and value.strip("0") and all(c in "0123456789abcdef" for c in value):
        return value
    return blake2b(value.encode(), digest_size=size).hexdigest()


def span_hex(event_id: str, trace_hex: str) -> str:
    """The span id of an event id within trace `trace_hex`: the span part of a
    `<trace>-<span>` id of that trace (ids.py: an OTel span's event, or a parent that is one),
    else hex_id's."""
    return span_part(event_id, trace_hex) or hex_id(event_id, 8)


def came_from_span(event: Any) -> bool:
    metadata = getattr(event, "metadata", None)
    return isinstance(metadata, dict) and "otel.mapping_version" in metadata


def event_span(event: Any) -> PbSpan:
    """One v1 event (read by attribute: a struct or a model) as an OTLP span."""
    event_type: str = event.event_type
    attrs: dict[str, Any] = {
        WATCHLLM_EVENT_TYPE: event_type,
        "watchllm.event_id": event.event_id,
        "watchllm.run_id": event.run_id,
    }
    parent = event.parent_event_id
    if parent:
        attrs["watchllm.parent_event_id"] = parent
    fields = {
        name: value
        for name in _FIELDS[event_type]
        if (value := getattr(event, name, None)) is not None
    }
    if event_type == "prompt_call":
        attrs["gen_ai.operation.name"] = "chat"
        if fields.get("model"):
            attrs["gen_ai.request.model"] = fields["model"]
        _prompt_attributes(attrs, _plain(fields.get("prompt")))
        if fields.get("response") is not None:
            attrs["gen_ai.output.messages"] = _json(
                [{"role": "assistant", "parts": [{"type": "text", "content": fields["response"]}]}]
            )
    elif event_type == "tool_call":
        attrs["gen_ai.operation.name"] = "execute_tool"
    elif event_type == "agent_step":
        attrs["gen_ai.operation.name"] = "invoke_agent"
    for name, value in fields.items():
        if name in _MESSAGES or (not value and name in _EMPTY_DEFAULTS):
            continue  # messages above; an empty {} or [] is the field's default anyway
        key = FORWARDED_GENAI_KEYS.get(name, f"watchllm.{name}")
        if name in FORWARDED_JSON_FIELDS:
            attrs[key] = _json(value)
        else:
            attrs[key] = value if type(value) in _SCALARS else _plain(value)
    # OTLP reads a time of 0 as not set (refused: otel/ids.py): an event at the epoch itself
    # is sent 1 ns later, which the receiver's microseconds do not show.
    start = _unix_nano(event.timestamp) or 1
    latency = fields.get("latency_ms")
    end = start + (round(latency * 1e6) if isinstance(latency, int | float) else 0)
    failed = event_type == "error" or fields.get("status") in ("error", "timeout")
    message = fields.get("error_message") if failed else None
    trace = hex_id(event.run_id, 16)
    span = PbSpan(
        trace_id=bytes.fromhex(trace),
        span_id=bytes.fromhex(span_hex(event.event_id, trace)),
        parent_span_id=bytes.fromhex(span_hex(parent, trace)) if parent else b"",
        name=_span_name(event_type, fields),
        kind=KINDS["client"] if event_type == "prompt_call" else KINDS["internal"],
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        status=Status(code=STATUSES["error"] if failed else 0, message=message or ""),
    )
    add_attributes(span.attributes, attrs)
    return span


# Fields whose default is an empty object or list (metadata, tags, ...): left out when empty.
_EMPTY_DEFAULTS: dict[str, Any] = {
    name: info.get_default(call_default_factory=True)
    for model in MODELS_BY_TYPE.values()
    for name, info in model.model_fields.items()
    if info.default_factory in (dict, list)
}


def _prompt_attributes(attrs: dict[str, Any], prompt: Any) -> None:
    if prompt is None:
        return
    messages, form = prompt_to_genai(prompt)
    attrs["gen_ai.input.messages"] = _json(messages)
    attrs["watchllm.prompt_form"] = form
    expected = prompt if isinstance(prompt, str) else [_without_none(m) for m in prompt]
    if prompt_from_genai(messages, form) != expected:
        # A content list that reads as one text part, say: the exact prompt goes along.
        attrs["watchllm.prompt"] = _json(prompt)


def _span_name(event_type: str, fields: dict[str, Any]) -> str:
    if event_type == "prompt_call":
        return f"chat {fields['model']}" if fields.get("model") else "chat"
    if event_type == "tool_call":
        return f"execute_tool {fields['tool_name']}"
    if event_type == "agent_step":
        return f"invoke_agent {fields.get('step_name') or fields['step_number']}"
    name = fields.get("error_type") or fields.get("assertion_name") or fields.get("metric")
    return f"{event_type} {name}" if name else event_type


# The fields sent from `fields` (ids, time and project have their own rules; cost_source is
# sent for the record, never read back).
_FIELDS = {
    event_type: tuple(
        name
        for name in model.model_fields
        if name not in FORWARDED_OWN_FIELDS or name in ("cost_source", "prompt", "response")
    )
    for event_type, model in MODELS_BY_TYPE.items()
}
_MESSAGES = frozenset({"prompt", "response"})
_SCALARS = frozenset({str, int, float, bool})


def _plain(value: Any) -> Any:
    """Struct or model values as JSON-ready Python: nested structs and models as dicts (None
    fields left out), tuples as lists."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, msgspec.Struct):
        return {k: v for k, v in msgspec.to_builtins(value).items() if v is not None}
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json", exclude_none=True))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _without_none(message: Any) -> Any:
    return (
        {k: v for k, v in message.items() if v is not None}
        if isinstance(message, dict)
        else message
    )


_encode = msgspec.json.Encoder().encode


def _json(value: Any) -> str:
    """JSON text of a field's value; structs (None fields left out) and tuples as msgspec
    writes them, anything else (a pydantic model) through _plain."""
    try:
        return _encode(value).decode()  # msgspec: several times json.dumps' speed
    except (TypeError, OverflowError, ValueError):
        return json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"))


def _unix_nano(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


# --- span rows -> spans -------------------------------------------------------------------------


def row_span(row: SpanRow) -> PbSpan:
    """A stored span as it was received. Attribute values are stored as text (non-strings as
    JSON): each is sent typed again (typed_value), so the receiver stores the same text."""
    start, end = _row_times(row)
    span = PbSpan(
        trace_id=bytes.fromhex(row.trace_id),
        span_id=bytes.fromhex(row.span_id),
        parent_span_id=bytes.fromhex(row.parent_span_id) if row.parent_span_id else b"",
        name=row.name,
        kind=KINDS.get(row.kind, 0),
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        status=Status(code=STATUSES.get(row.status_code, 0), message=row.status_message),
    )
    add_attributes(span.attributes, {k: typed_value(v) for k, v in row.attributes.items()})
    for e in _json_list(row.span_events):
        added = span.events.add(
            name=str(e.get("name", "")), time_unix_nano=int(e.get("time_unix_nano") or 0)
        )
        add_attributes(added.attributes, e.get("attributes") or {})
    for link in _json_list(row.links):
        if isinstance(link.get("trace_id"), str) and isinstance(link.get("span_id"), str):
            added = span.links.add(
                trace_id=bytes.fromhex(link["trace_id"]), span_id=bytes.fromhex(link["span_id"])
            )
            add_attributes(added.attributes, link.get("attributes") or {})
    return span


def _row_times(row: SpanRow) -> tuple[int, int]:
    """Start and end in nanoseconds. The row keeps both to the microsecond but the duration
    to the nanosecond (duration_ms): the start's sub-microsecond part is chosen so that both
    times fall in their stored microseconds and their difference is the stored duration, so
    the receiver stores the same times and maps the same latency."""
    start = _unix_nano(row.start_time)
    end = _unix_nano(row.end_time)
    duration = round(row.duration_ms * 1e6)
    shift = max(end - start - duration, 0)
    if shift <= 999 and end - start - duration >= -999:
        return start + shift, start + shift + duration
    return start, end  # a duration cut at the contract's bound: the stored times as they are


def typed_value(text: str) -> Any:
    """The value a stored attribute text was made from: JSON text that a number, boolean,
    list or object writes exactly so (mapping.attribute_text, as span_row stores it) is that
    value; anything else is the string itself. Ambiguous only for a string attribute whose
    text is such JSON ("5"); it comes back as 5, stored again as the same text "5"."""
    if not text or text[0] not in "-0123456789tfIN[{":
        return text
    value = _loads(text)
    if value is _NOT_JSON or value is None or isinstance(value, str):
        return text
    if attribute_text(value) != text or not _sendable(value, 0):
        return text
    return value


def _sendable(value: Any, depth: int) -> bool:
    if isinstance(value, bool | float | str):
        return True
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if value is None:
        return False  # an empty AnyValue inside a list is read back as null: keep the text
    if depth >= MAX_TYPED_DEPTH or len(value) > MAX_TYPED_ITEMS:
        return False
    items = value.values() if isinstance(value, dict) else value
    return all(_sendable(v, depth + 1) for v in items)


_NOT_JSON = object()
_decode = msgspec.json.decode


def _loads(text: str) -> Any:
    try:
        return _decode(text)  # msgspec: several times json.loads' speed
    except msgspec.DecodeError:
        pass
    try:
        return json.loads(text)  # NaN and Infinity, which only json.dumps writes
    except ValueError:
        return _NOT_JSON


def _json_list(text: str) -> list[dict[str, Any]]:
    if text == "[]":
        return []
    items = _loads(text)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


# --- protobuf values ----------------------------------------------------------------------------


# Messages are filled in place (`repeated.add()`, then the value's field): building them with
# keyword constructors (KeyValue(key=..., value=AnyValue(...))) cost seven times as much.


def add_attributes(repeated: Any, attrs: dict[str, Any]) -> None:
    """Append `attrs` (None values left out) to a repeated KeyValue field."""
    add = repeated.add
    for key, value in attrs.items():
        if value is not None:
            if type(value) is str:  # the common case first
                add(key=key).value.string_value = value
            else:
                set_value(add(key=key).value, value)


def set_value(target: AnyValue, value: Any) -> None:
    """Set an AnyValue from a Python value (None leaves it empty)."""
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            target.int_value = value
        else:
            target.string_value = str(value)
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, dict):
        pairs = target.kvlist_value
        pairs.SetInParent()  # an empty object is still an object
        for key, item in value.items():
            set_value(pairs.values.add(key=str(key)).value, item)
    elif isinstance(value, list | tuple):
        array = target.array_value
        array.SetInParent()
        for item in value:
            set_value(array.values.add(), item)
    elif value is not None:
        target.string_value = str(value)


# --- requests -----------------------------------------------------------------------------------

Resource_ = tuple[tuple[str, str], ...]  # attributes: (key, stored text) pairs
Scope = tuple[str, str]  # instrumentation scope: (name, version); ("", "") for none
# (resource, scope, span)
Resourced = tuple[Resource_, Scope, PbSpan]


def build_request(items: Sequence[Resourced]) -> ExportTraceServiceRequest:
    """One request, the spans grouped by resource and scope in the order they came. Events'
    spans have the scope "watchllm"; stored spans the scope they were received with (none
    when they came with none)."""
    groups: dict[tuple[Resource_, Scope], list[PbSpan]] = {}
    for resource, scope, span in items:
        groups.setdefault((resource, scope), []).append(span)
    request = ExportTraceServiceRequest()
    for (resource, scope), spans in groups.items():
        resource_spans = request.resource_spans.add()
        add_attributes(
            resource_spans.resource.attributes,
            {k: v if k == PROJECT_ATTRIBUTE else typed_value(v) for k, v in resource},
        )
        scope_spans = resource_spans.scope_spans.add()
        if scope[0] or scope[1]:
            scope_spans.scope.name, scope_spans.scope.version = scope
        scope_spans.spans.extend(spans)
    return request


def _event_items(events: Iterable[Any]) -> list[Resourced]:
    return [
        (((PROJECT_ATTRIBUTE, event.project_id),), _OUR_SCOPE, event_span(event))
        for event in events
        if not came_from_span(event)
    ]


def _row_items(rows: Iterable[SpanRow]) -> list[Resourced]:
    items: list[Resourced] = []
    for row in rows:
        # The row's own resource (as text here, typed in build_request) and the project.
        resource = (*row.resource_attributes.items(), (PROJECT_ATTRIBUTE, row.project_id))
        items.append((resource, (row.scope_name, row.scope_version), row_span(row)))
    return items


class OtlpExportSink:
    """Events and spans to one OTLP/HTTP endpoint (protobuf, gzip)."""

    name = SINK_NAME
    reads_structs = True  # reads events by attribute only

    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10.0,
        compression: str = "gzip",
    ) -> None:
        self.endpoint = endpoint
        self.headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"watchllm-otlp-exporter/{__version__}",
            **(headers or {}),
        }
        if compression == "gzip":
            self.headers["Content-Encoding"] = "gzip"
        self.compression = compression
        self.timeout_s = timeout_s
        self.exported_spans_total = 0
        self.rejected_spans_total = 0
        self.requests_total = 0

    async def write(self, events: Sequence[Any]) -> None:
        items = await anyio.to_thread.run_sync(_event_items, events)
        await self._export(items)

    async def write_spans(self, rows: Sequence[SpanRow]) -> None:
        items = await anyio.to_thread.run_sync(_row_items, rows)
        await self._export(items)

    async def _export(self, items: list[Resourced]) -> None:
        if not items:
            return
        # One client per batch: sinks have no close hook, and a batch's requests share it.
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for start in range(0, len(items), MAX_SPANS_PER_REQUEST):
                await self._send(client, items[start : start + MAX_SPANS_PER_REQUEST])

    async def _send(self, client: httpx.AsyncClient, items: Sequence[Resourced]) -> None:
        body = await anyio.to_thread.run_sync(self._body, items)
        self.requests_total += 1
        answer = await client.post(self.endpoint, content=body, headers=self.headers)
        status = answer.status_code
        if 200 <= status < 300:
            self.exported_spans_total += len(items)
            self._partial_success(answer, len(items))
            return
        if status == 413 and len(items) > 1:
            half = len(items) // 2
            await self._send(client, items[:half])
            await self._send(client, items[half:])
            return
        detail = f"{self.endpoint} answered {status}: {_snippet(answer)}"
        if status in RETRYABLE_STATUSES or status >= 500:
            wait = retry_after_s(answer.headers.get("Retry-After"))
            if wait:
                await anyio.sleep(min(wait, RETRY_AFTER_MAX_S))
            raise RetryLater(detail)
        # 400, 401, 403, 404, 413 for one span, ...: sending it again cannot succeed.
        raise SinkError(detail, permanent=True)

    def _body(self, items: Sequence[Resourced]) -> bytes:
        body = build_request(items).SerializeToString()
        return gzip.compress(body, compresslevel=6) if self.compression == "gzip" else body

    def _partial_success(self, answer: httpx.Response, sent: int) -> None:
        rejected, message = _partial(answer)
        if rejected or message:
            self.rejected_spans_total += rejected
            self.exported_spans_total -= rejected
            # Not retried: the endpoint says these spans will never be accepted.
            log.warning(
                "%s rejected %d of %d spans (partial success): %s",
                self.endpoint,
                rejected,
                sent,
                message[:500],
            )

    def metric_families(self) -> list[Metric]:
        out: list[Metric] = []
        for name, doc, value in (
            (
                "watchllm_otlp_export_spans",
                "Spans the OTLP endpoint accepted",
                self.exported_spans_total,
            ),
            (
                "watchllm_otlp_export_rejected_spans",
                "Spans the OTLP endpoint rejected in a partial success (not sent again)",
                self.rejected_spans_total,
            ),
            ("watchllm_otlp_export_requests", "Export requests sent", self.requests_total),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            out.append(family)
        return out


def _partial(answer: httpx.Response) -> tuple[int, str]:
    """rejected_spans and error_message of an ExportTraceServiceResponse, protobuf or JSON."""
    body = answer.content
    if not body:
        return 0, ""
    if "json" in answer.headers.get("content-type", ""):
        try:
            partial = json.loads(body).get("partialSuccess") or {}
            return int(partial.get("rejectedSpans") or 0), str(partial.get("errorMessage") or "")
        except (ValueError, AttributeError, TypeError):
            return 0, ""
    response = ExportTraceServiceResponse()
    try:
        response.ParseFromString(body)
    except Exception:  # an answer that is not OTLP: nothing to count
        return 0, ""
    partial = response.partial_success
    return partial.rejected_spans, partial.error_message


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _snippet(answer: httpx.Response) -> str:
    return answer.content[:300].decode(errors="replace") or answer.reason_phrase


# --- the plugin ---------------------------------------------------------------------------------


class OtlpExport:
    def __init__(self, sink: OtlpExportSink) -> None:
        self.sink = sink

    @hookimpl
    def register_sinks(self, settings: Settings, store: Any) -> OtlpExportSink:
        return self.sink

    def metric_families(self) -> list[Metric]:
        return self.sink.metric_families()


class NotConfigured:
    """Registered in place of the exporter while `otlp_export_endpoint` is not set."""


def make_plugin(settings: Settings) -> Any:
    if not settings.otlp_export_endpoint:
        return NotConfigured()
    return OtlpExport(
        OtlpExportSink(
            settings.otlp_export_endpoint,
            settings.otlp_export_headers,
            settings.otlp_export_timeout_s,
            settings.otlp_export_compression,
        )
    )


__all__ = ["MAPPING_VERSION", "OtlpExportSink", "event_span", "make_plugin", "row_span"]
