"""OTLP/HTTP trace bodies (protobuf or JSON) into `mapping.Span`s, span by span.

Protobuf is parsed by the generated classes of `opentelemetry-proto`. OTLP JSON is the
protobuf JSON mapping with two differences (ids in hex, not base64; enums as integers): the
ids are turned into base64 and the document parsed into the same classes by protobuf's
`json_format`, so both encodings meet in one converter.

A body that does not parse is refused whole (400). Past that, each span is checked on its
own: a bad span (wrong id lengths, too many attributes, a value nested too deep) is rejected
and named in the answer's `partial_success`, and the others go on.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import msgspec
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ..errors import Problem
from .mapping import Span, SpanEvent

# Bounds on one span (OpenTelemetry's SDK keeps 128 attributes, events and links by default).
MAX_ATTRIBUTES = 1_024  # on a span, a resource, a span event or a link
MAX_EVENTS = 1_024
MAX_LINKS = 1_024
MAX_VALUE_DEPTH = 16  # arrays and key-value lists inside one attribute value
MAX_KEY_CHARS = 1_024
# Problems named in one answer; the rest are counted.
MAX_PROBLEMS_LISTED = 5

KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUSES = ("unset", "ok", "error")


class BadSpan(ValueError):
    """This span cannot be stored; the message says why."""


@dataclass(slots=True)
class Decoded:
    spans: list[Span] = field(default_factory=list)
    rejected: int = 0
    problems: list[str] = field(default_factory=list)

    def reject(self, where: str, why: str) -> None:
        self.rejected += 1
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append(f"{where}: {why}")


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise Problem(
            400,
            "bad_protobuf",
            f"body is not an OTLP ExportTraceServiceRequest in protobuf: {exc}",
            field="body",
        ) from None
    return request


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise Problem(400, "bad_json", f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(document, dict):
        raise Problem(400, "bad_json", "body must be a JSON object", field="body")
    try:
        _hex_ids_to_base64(document)
        # Receivers ignore fields they do not know (the OTLP spec), so newer senders work.
        return json_format.ParseDict(
            document, ExportTraceServiceRequest(), ignore_unknown_fields=True
        )
    except _BadId as exc:
        raise Problem(400, "bad_json", str(exc), field=exc.field) from None
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as exc:
        raise Problem(
            400,
            "bad_json",
            f"body is not an OTLP ExportTraceServiceRequest in JSON: {exc}"[:1000],
            field="body",
        ) from None


class _BadId(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(document: dict[str, Any]) -> None:
    """OTLP JSON ids are hex; protobuf's JSON mapping reads bytes as base64."""
    for r, resource_spans in enumerate(_items(document, "resourceSpans", "resource_spans")):
        for s, scope_spans in enumerate(_items(resource_spans, "scopeSpans", "scope_spans")):
            for i, span in enumerate(_items(scope_spans, "spans")):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                _convert_ids(span, where)
                for j, link in enumerate(_items(span, "links")):
                    _convert_ids(link, f"{where}.links[{j}]")


def _items(parent: Any, *keys: str) -> list[Any]:
    if not isinstance(parent, dict):
        return []
    for key in keys:
        value = parent.get(key)
        if isinstance(value, list):
            return value
    return []


def _convert_ids(span: Any, where: str) -> None:
    if not isinstance(span, dict):
        return
    for key in _ID_KEYS:
        value = span.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise _BadId(f"{where}.{key} must be a hex string", f"{where}.{key}")
        try:
            span[key] = base64.b64encode(bytes.fromhex(value)).decode()
        except ValueError:
            raise _BadId(f"{where}.{key} is not hex: {value[:40]!r}", f"{where}.{key}") from None


def spans_of(request: ExportTraceServiceRequest) -> Decoded:
    """Every span of the request, each checked; resource and scope copied onto each span."""
    out = Decoded()
    for r, resource_spans in enumerate(request.resource_spans):
        try:
            resource = _attributes(resource_spans.resource.attributes, "resource")
        except BadSpan as exc:
            n = sum(len(s.spans) for s in resource_spans.scope_spans)
            out.reject(f"resourceSpans[{r}].resource", f"{exc} ({n} spans rejected)")
            out.rejected += n - 1
            continue
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            scope = scope_spans.scope
            for i, span in enumerate(scope_spans.spans):
                try:
                    out.spans.append(_span(span, resource, scope.name, scope.version))
                except BadSpan as exc:
                    out.reject(f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]", str(exc))
    return out


def _span(span: Any, resource: dict[str, Any], scope_name: str, scope_version: str) -> Span:
    trace_id = _id(span.trace_id, 16, "traceId")
    span_id = _id(span.span_id, 8, "spanId")
    parent = span.parent_span_id
    parent_id = _id(parent, 8, "parentSpanId") if parent else None
    if len(span.events) > MAX_EVENTS:
        raise BadSpan(f"{len(span.events)} events, over the limit of {MAX_EVENTS}")
    if len(span.links) > MAX_LINKS:
        raise BadSpan(f"{len(span.links)} links, over the limit of {MAX_LINKS}")
    status = span.status
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        name=span.name,
        start_unix_nano=span.start_time_unix_nano,
        end_unix_nano=span.end_time_unix_nano,
        parent_span_id=parent_id,
        kind=KINDS[span.kind] if 0 <= span.kind < len(KINDS) else "unspecified",
        status_code=STATUSES[status.code] if 0 <= status.code < len(STATUSES) else "unset",
        status_message=status.message,
        attributes=_attributes(span.attributes, "attributes"),
        resource=resource,
        scope_name=scope_name,
        scope_version=scope_version,
        events=[
            SpanEvent(e.name, e.time_unix_nano, _attributes(e.attributes, f"events[{n}]"))
            for n, e in enumerate(span.events)
        ],
        links=[
            {
                "trace_id": _id(link.trace_id, 16, f"links[{n}].traceId"),
                "span_id": _id(link.span_id, 8, f"links[{n}].spanId"),
                "attributes": _attributes(link.attributes, f"links[{n}].attributes"),
            }
            for n, link in enumerate(span.links)
        ],
    )


def _id(raw: bytes, size: int, name: str) -> str:
    if len(raw) != size:
        raise BadSpan(f"{name} has {len(raw)} bytes, must have {size}")
    if not raw.strip(b"\0"):
        raise BadSpan(f"{name} is all zeros (an invalid id)")
    return raw.hex()


def _attributes(pairs: Any, where: str) -> dict[str, Any]:
    if len(pairs) > MAX_ATTRIBUTES:
        raise BadSpan(f"{where}: {len(pairs)} attributes, over the limit of {MAX_ATTRIBUTES}")
    out: dict[str, Any] = {}
    for pair in pairs:
        key = pair.key
        if len(key) > MAX_KEY_CHARS:
            raise BadSpan(f"{where}: a key of {len(key)} characters (limit {MAX_KEY_CHARS})")
        out[key] = _value(pair.value, 0, key)
    return out


def _value(value: Any, depth: int, key: str) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    if kind is None:
        return None
    if depth >= MAX_VALUE_DEPTH:
        raise BadSpan(f"attribute {key[:100]!r} is nested deeper than {MAX_VALUE_DEPTH} levels")
    if kind == "array_value":
        values = value.array_value.values
        if len(values) > MAX_ATTRIBUTES:
            raise BadSpan(f"attribute {key[:100]!r} holds {len(values)} values (limit 1024)")
        return [_value(v, depth + 1, key) for v in values]
    if kind == "kvlist_value":
        pairs = value.kvlist_value.values
        if len(pairs) > MAX_ATTRIBUTES:
            raise BadSpan(f"attribute {key[:100]!r} holds {len(pairs)} pairs (limit 1024)")
        return {p.key: _value(p.value, depth + 1, key) for p in pairs}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None
