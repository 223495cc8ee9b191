"""OTLP/HTTP trace bodies (protobuf or JSON) into `mapping.Span`s, span by span.

Protobuf is parsed by the generated classes of `opentelemetry-proto`. OTLP JSON is the
protobuf JSON mapping with two differences (ids in hex, not base64; enums as integers): the
ids are turned into base64 and the document parsed into the same classes by protobuf's
`json_format`, so both encodings meet in one converter.

A body that does not parse is refused whole (400), as is one whose structure is over a
request's bounds (check_request: resource and scope entries, spans, attributes, span events
and links in all: 400 or 413), whatever its size in bytes. Past that, each span is checked on
its own: a bad span (wrong id lengths, too many attributes, a value nested too deep, times
outside the events' range: ids.time_problem) is rejected and named in the answer's
`partial_success`, and the others go on.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ..errors import Problem
from .ids import time_problem, times_ok
from .mapping import Span, SpanEvent, attribute_text

# Bounds on one span (OpenTelemetry's SDK keeps 128 attributes, events and links by default).
MAX_ATTRIBUTES = 1_024  # on a span, a resource, a span event or a link
MAX_EVENTS = 1_024
MAX_LINKS = 1_024
MAX_VALUE_DEPTH = 16  # arrays and key-value lists inside one attribute value
# Entries of arrays and key-value lists (all levels) in one request: a few bytes of protobuf
# each, a Python object each once decoded. Without it an 80 KB gzip body of arrays of
# arrays of empty values took 14-20 s of the server's CPU. A 1,536-number embedding on each
# of 512 spans is 786,432. A span whose values pass it is refused, as are later ones with any.
MAX_NESTED_VALUES = 1_048_576
MAX_KEY_CHARS = 1_024
# Problems named in one answer; the rest are counted.
MAX_PROBLEMS_LISTED = 5
# Each span's row keeps its resource's attributes and its scope's name and version: a request
# may make at most this many bytes of such copies (a 20 KB gzip body of 1,500 spans under one
# 500 KB resource attribute would make 750 MB of rows). Real resources are 0.3-2 KB: 10,000
# spans under a 2 KB one make 20 MB.
MAX_COPIED_BYTES = 64 * 1024 * 1024

# Bounds on a request's structure as a whole. Each entry costs 1-5 us of Python once walked
# (JSON: also in _check and json_format), a few bytes of body: 4,000,000 empty resourceSpans
# (8 MB, 8 KB gzipped) took 15 s of a worker's CPU, past its deadline, and were answered 200
# at no quota (no span). An SDK's batch is 512 spans (one resource, a few scopes, 128
# attributes and 128 events a span at most); a Collector's 8,192.
# resourceSpans entries, and scopeSpans entries in all: the span limit if that is higher (a
# request of non-empty entries within the span limit is always within this).
MAX_ENTRIES = 10_000
DEFAULT_MAX_SPANS = 10_000  # Settings.max_batch_events' default: the receiver passes the setting
MAX_ATTRIBUTES_IN_ALL = 1_048_576  # of resources, scopes, spans, span events and links
MAX_EVENTS_IN_ALL = 262_144  # span events and links
# ... or this many for each span of the request, if more: a Collector's 8,192-span batch of
# spans at the SDK's 128 attributes each, with their resource's and events', and 64 events
# and links a span. By the request's own spans, not the span limit: each span event can hold
# 1,024 attributes, so a few spans given the limit's budget would take seconds of CPU.
ATTRIBUTES_A_SPAN = 256
EVENTS_A_SPAN = 64

KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUSES = ("unset", "ok", "error")


class BadSpan(ValueError):
    """This span cannot be stored; the message says why."""


@dataclass(slots=True)
class Refusals:
    """Spans refused so far, and the first problems named (the answer's partial_success)."""

    rejected: int = 0
    problems: list[str] = field(default_factory=list)

    def reject(self, where: str, why: str) -> None:
        self.rejected += 1
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append(f"{where}: {why}")


@dataclass(slots=True)
class Decoded(Refusals):
    spans: list[Span] = field(default_factory=list)


def parse_protobuf(body: bytes, max_spans: int = DEFAULT_MAX_SPANS) -> ExportTraceServiceRequest:
    """The request, its resource and scope entries and spans counted (check_request)."""
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
    check_request(request, max_spans)
    return request


def check_request(request: ExportTraceServiceRequest, max_spans: int) -> None:
    """Refuse a request with more resource entries, scope entries or spans than a request may
    hold, before any is walked: len() of the repeated fields, in C. (Attributes, events and
    links are counted as the spans are read: spans_of.)"""
    bounds = limits(max_spans)
    resources = request.resource_spans
    if len(resources) > bounds["resourceSpans"]:
        raise too_many("resourceSpans", bounds["resourceSpans"], len(resources))
    scopes = [resource_spans.scope_spans for resource_spans in resources]
    n_scopes = sum(map(len, scopes))
    if n_scopes > bounds["scopeSpans"]:
        raise too_many("scopeSpans", bounds["scopeSpans"], n_scopes)
    n_spans = sum(len(scope_spans.spans) for each in scopes for scope_spans in each)
    if n_spans > max_spans:
        raise too_many("spans", max_spans, n_spans)


def limits(max_spans: int, n_spans: int = 0) -> dict[str, int]:
    """What one request of `n_spans` spans may hold in all, by kind of entry (named by OTLP
    JSON's fields)."""
    entries = max(MAX_ENTRIES, max_spans)
    return {
        "resourceSpans": entries,
        "scopeSpans": entries,
        "spans": max_spans,
        "attributes": max(MAX_ATTRIBUTES_IN_ALL, ATTRIBUTES_A_SPAN * n_spans),
        "events": max(MAX_EVENTS_IN_ALL, EVENTS_A_SPAN * n_spans),
        "values": MAX_NESTED_VALUES,
    }


_NOUNS = {
    "resourceSpans": "resourceSpans entries",
    "scopeSpans": "scopeSpans entries",
    "attributes": "attributes (of resources, scopes, spans, span events and links)",
    "events": "span events and links",
    "values": "values in arrays and key-value lists",
}


def too_many(kind: str, limit: int, n: int | None = None, where: str | None = None) -> Problem:
    """The answer to a request over a bound on its structure (`n`: how many it holds, when
    known; `where`: the list that went over), naming the field. Empty resource or scope
    entries make no batch: 400. The rest grow with the batch: 413, as a body too large (for
    spans in ingest.check_span_count's words), so that an exporter that splits a batch on 413
    does."""
    if kind == "spans":
        count = f"{n} spans" if n is not None else f"More than {limit} spans"
        return Problem(
            413,
            "too_many_spans",
            f"{count} in one request is over the limit of {limit} (max_batch_events)",
            field="resourceSpans",
        )
    count = f"{n}" if n is not None else f"more than {limit}"
    return Problem(
        400 if kind in ("resourceSpans", "scopeSpans") else 413,
        "too_many_entries",
        f"{where or kind}: {count} {_NOUNS[kind]} in one request, over the limit of {limit} a"
        " request; send fewer spans a request",
        field=kind,
    )


def parse_json(body: bytes, max_spans: int = DEFAULT_MAX_SPANS) -> ExportTraceServiceRequest:
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise Problem(400, "bad_json", f"body is not valid JSON: {exc}", field="body") from None
    try:
        # The lists are counted as _check meets them, before it walks their elements and
        # long before json_format (pure Python) makes a message of each.
        n_spans = _spans_in(document, limits(max_spans)["scopeSpans"])
        bounds = limits(max_spans, n_spans)
        _check(document, ExportTraceServiceRequest.DESCRIPTOR, "", _Budget(bounds, dict(bounds)))
        return json_format.ParseDict(document, ExportTraceServiceRequest())
    except _BadJson as exc:
        raise Problem(400, "bad_json", str(exc), field=exc.field or "body") from None
    except RecursionError:
        raise Problem(400, "bad_json", "body is nested too deep", field="body") from None
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise Problem(
            400,
            "bad_json",
            f"body is not an OTLP ExportTraceServiceRequest in JSON: {exc}"[:1000],
            field="body",
        ) from None


def _spans_in(document: Any, max_entries: int) -> int:
    """The spans of an OTLP JSON document, counted before it is checked: none for anything
    not shaped as OTLP, or with more entries than a request may hold (_check refuses both)."""
    n = entries = 0
    resources = document.get("resourceSpans") if isinstance(document, dict) else None
    if not isinstance(resources, list) or len(resources) > max_entries:
        return 0
    for resource in resources:
        scopes = resource.get("scopeSpans") if isinstance(resource, dict) else None
        if isinstance(scopes, list):
            entries += len(scopes)
            if entries > max_entries:
                return 0
            for scope in scopes:
                spans = scope.get("spans") if isinstance(scope, dict) else None
                n += len(spans) if isinstance(spans, list) else 0
    return n


class _BadJson(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


# The span and link ids: hex in OTLP JSON, where protobuf's JSON mapping reads base64.
_HEX_IDS = frozenset({"trace_id", "span_id", "parent_span_id"})
_INTEGER = re.compile(r"-?[0-9]+")
# Bytes in OTLP JSON: base64, standard or URL-safe, padded or not (the protobuf JSON mapping).
# json_format's decoder drops what is not base64 without a word ("not base64!" read as a
# few bytes of something else): checked here first.
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*")
_INTEGERS = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SINT32,
    }
)


# The JSON lists counted against a request's bounds (parse_json), by field; any other list
# (a resource's entityRefs, ...) counts as attributes.
_LISTS = {
    "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest.resource_spans": (
        "resourceSpans"
    ),
    "opentelemetry.proto.trace.v1.ResourceSpans.scope_spans": "scopeSpans",
    "opentelemetry.proto.trace.v1.ScopeSpans.spans": "spans",
    "opentelemetry.proto.trace.v1.Span.events": "events",
    "opentelemetry.proto.trace.v1.Span.links": "events",
    "opentelemetry.proto.common.v1.ArrayValue.values": "values",
    "opentelemetry.proto.common.v1.KeyValueList.values": "values",
}


@dataclass(slots=True)
class _Budget:
    limits: dict[str, int]
    left: dict[str, int]  # what the request may still hold, by kind

    def spend(self, kind: str, n: int, where: str) -> None:
        left = self.left[kind] - n
        if left < 0:
            # JSON is parsed whole, in Python, before a span is read: values past the limit
            # refuse the request here (protobuf: the span that holds them, spans_of).
            raise too_many(kind, self.limits[kind], where=where)
        self.left[kind] = left


def _check(value: Any, descriptor: Any, path: str, budget: _Budget) -> None:
    """Check a JSON object against a message's fields, in place: keys no field has are
    dropped (receivers ignore unknown fields, the spec says), and every value must have its
    field's JSON type, so that `ParseDict` (strict) never reads a string as an empty message,
    an unknown enum name as 0 or "1.5" as 1. Ids are turned from hex into base64. Each list's
    length is taken from `budget` (what the request may still hold) before it is walked."""
    if not isinstance(value, dict):
        raise _BadJson(f"{path or 'body'} must be a JSON object", path or "body")
    fields = descriptor.fields_by_camelcase_name
    for key in list(value):
        field = fields.get(key) or descriptor.fields_by_name.get(key)
        if field is None:
            del value[key]
            continue
        item = value[key]
        if item is None:
            continue
        where = f"{path}.{key}" if path else key
        if field.is_repeated:
            if not isinstance(item, list):
                raise _BadJson(f"{where} must be a JSON array", where)
            budget.spend(_LISTS.get(field.full_name, "attributes"), len(item), where)
            for n, element in enumerate(item):
                _check_value(element, field, f"{where}[{n}]", budget)
        else:
            converted = _check_value(item, field, where, budget)
            if converted is not None:
                value[key] = converted


def _check_value(item: Any, field: Any, where: str, budget: _Budget) -> str | None:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        _check(item, field.message_type, where, budget)
    elif kind == FieldDescriptor.TYPE_STRING:
        if not isinstance(item, str):
            raise _BadJson(f"{where} must be a string", where)
    elif kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(item, bool):
            raise _BadJson(f"{where} must be true or false", where)
    elif kind in _INTEGERS:
        # JSON integers (a whole number written as a float too: JSON has one number type),
        # or decimal text for 64-bit values: never a fraction, nor text with an exponent.
        if isinstance(item, bool) or not (
            isinstance(item, int)
            or (isinstance(item, float) and item.is_integer())
            or (isinstance(item, str) and _INTEGER.fullmatch(item))
        ):
            raise _BadJson(f"{where} must be an integer (or its decimal text)", where)
    elif kind == FieldDescriptor.TYPE_ENUM:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise _BadJson(f"{where} must be an enum number", where)
        if isinstance(item, str) and field.enum_type.values_by_name.get(item) is None:
            raise _BadJson(f"{where}: {item[:60]!r} is not a value of this enum", where)
    elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise _BadJson(f"{where} must be a number", where)
    elif kind == FieldDescriptor.TYPE_BYTES:
        if not isinstance(item, str):
            raise _BadJson(f"{where} must be a string", where)
        if field.name in _HEX_IDS:
            try:
                return base64.b64encode(bytes.fromhex(item)).decode()
            except ValueError:
                raise _BadJson(f"{where} is not hex: {item[:40]!r}", where) from None
        if not _is_base64(item):
            raise _BadJson(f"{where} is not base64: {item[:40]!r}", where)
    return None


def _is_base64(text: str) -> bool:
    data = text.rstrip("=")
    padding = len(text) - len(data)
    if padding > 2 or not _BASE64.fullmatch(data) or len(data) % 4 == 1:
        return False
    return padding == 0 or len(text) % 4 == 0  # padding only to a whole group


def spans_of(request: ExportTraceServiceRequest) -> Decoded:
    """Every span of the request, each checked; resource and scope copied onto each span."""
    out = Decoded()
    # A span's key is its trace id and span id (the store keeps one span a key): a second
    # span of the same key in one request, with other times or content, would be stored
    # beside the first. The first is kept; a later one is refused, named.
    keys: set[tuple[str, str]] = set()
    copied = 0  # bytes of resource attributes and scope names copied onto rows so far
    # What the request may still hold: values in arrays and key-value lists (_value),
    # attributes, span events and links (check_request counted the rest); then their limits.
    n_spans = sum(len(each.spans) for rs in request.resource_spans for each in rs.scope_spans)
    bounds = limits(DEFAULT_MAX_SPANS, n_spans)  # (the span limit was checked at parsing)
    attributes, events = bounds["attributes"], bounds["events"]
    budget = [MAX_NESTED_VALUES, attributes, events, attributes, events]
    for r, resource_spans in enumerate(request.resource_spans):
        scopes = resource_spans.scope_spans
        if not any(scope_spans.spans for scope_spans in scopes):
            continue  # nothing to store: its attributes are not read
        try:
            resource = _attributes(resource_spans.resource.attributes, "resource", budget)
        except BadSpan as exc:
            n = sum(len(s.spans) for s in scopes)
            out.reject(f"resourceSpans[{r}].resource", f"{exc} ({n} spans rejected)")
            out.rejected += n - 1
            continue
        resource_bytes = _size(resource)
        for s, scope_spans in enumerate(scopes):
            n = len(scope_spans.spans)
            if not n:
                continue
            scope = scope_spans.scope
            scope_name, scope_version = scope.name, scope.version
            # Not read, but JSON's were parsed one by one: counted alike.
            _spend_attributes(budget, len(scope.attributes), "scope.attributes")
            each = resource_bytes + len(scope_name) + len(scope_version)
            if copied + each * n > MAX_COPIED_BYTES:
                out.reject(
                    f"resourceSpans[{r}].scopeSpans[{s}]",
                    f"the resource's attributes and the scope's name ({each} bytes) copied onto"
                    f" each of {n} spans would make over {MAX_COPIED_BYTES} bytes in this"
                    f" request; send fewer spans a request or a smaller resource ({n} spans"
                    " rejected)",
                )
                out.rejected += n - 1
                continue
            copied += each * n
            for i, span in enumerate(scope_spans.spans):
                try:
                    decoded = _span(span, resource, scope_name, scope_version, budget)
                except BadSpan as exc:
                    out.reject(f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]", str(exc))
                    continue
                key = (decoded.trace_id, decoded.span_id)
                if key in keys:
                    out.reject(
                        f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]",
                        "spanId: an earlier span of this request has the same traceId and"
                        " spanId (the first is kept)",
                    )
                    continue
                keys.add(key)
                out.spans.append(decoded)
    return out


def _size(attributes: dict[str, Any]) -> int:
    """About the bytes of the attributes as a row keeps them (keys and value texts)."""
    return sum(
        len(key) + (len(value) if isinstance(value, str) else len(attribute_text(value)))
        for key, value in attributes.items()
    )


def _span(
    span: Any, resource: dict[str, Any], scope_name: str, scope_version: str, budget: list[int]
) -> Span:
    trace_id = span.trace_id
    span_id = span.span_id
    parent = span.parent_span_id
    # Well-formed ids (nearly all) are read inline; _id says what is wrong with the others.
    if len(trace_id) == 16 and len(span_id) == 8 and trace_id != _ZERO_16 and span_id != _ZERO_8:
        trace_hex, span_hex = trace_id.hex(), span_id.hex()
    else:
        trace_hex, span_hex = _id(trace_id, 16, "traceId"), _id(span_id, 8, "spanId")
    parent_id = None
    if parent:
        ok = len(parent) == 8 and parent != _ZERO_8
        parent_id = parent.hex() if ok else _id(parent, 8, "parentSpanId")
    # Each read of a repeated field makes a new wrapper (upb): read once. Most spans have
    # no events or links, and skip building their lists.
    events = span.events
    links = span.links
    if len(events) > MAX_EVENTS:
        raise BadSpan(f"{len(events)} events, over the limit of {MAX_EVENTS}")
    if len(links) > MAX_LINKS:
        raise BadSpan(f"{len(links)} links, over the limit of {MAX_LINKS}")
    if events or links:
        left = budget[_EVENTS] - len(events) - len(links)
        if left < 0:
            raise too_many("events", budget[_EVENTS_LIMIT], where="events and links")
        budget[_EVENTS] = left
    # Times the events' range cannot hold are refused, never moved (ids.py).
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if not times_ok(start, end):
        raise BadSpan(time_problem(start, end) or "bad times")
    status = span.status
    kind = span.kind
    code = status.code
    attributes, texts = _attributes_and_texts(span.attributes, "attributes", budget)
    return Span(
        trace_id=trace_hex,
        span_id=span_hex,
        name=span.name,
        start_unix_nano=start,
        end_unix_nano=end,
        parent_span_id=parent_id,
        kind=KINDS[kind] if 0 <= kind < len(KINDS) else "unspecified",
        status_code=STATUSES[code] if 0 <= code < len(STATUSES) else "unset",
        status_message=status.message,
        attributes=attributes,
        resource=resource,
        scope_name=scope_name,
        scope_version=scope_version,
        events=[
            SpanEvent(e.name, e.time_unix_nano, _attributes(e.attributes, f"events[{n}]", budget))
            for n, e in enumerate(events)
        ]
        if events
        else [],
        links=[
            {
                "trace_id": _id(link.trace_id, 16, f"links[{n}].traceId"),
                "span_id": _id(link.span_id, 8, f"links[{n}].spanId"),
                "attributes": _attributes(link.attributes, f"links[{n}].attributes", budget),
            }
            for n, link in enumerate(links)
        ]
        if links
        else [],
        attribute_texts=texts,
    )


_ZERO_16 = bytes(16)
_ZERO_8 = bytes(8)


def _id(raw: bytes, size: int, name: str) -> str:
    if len(raw) != size:
        raise BadSpan(f"{name} has {len(raw)} bytes, must have {size}")
    if not raw.strip(b"\0"):
        raise BadSpan(f"{name} is all zeros (an invalid id)")
    return raw.hex()


# The places of spans_of's budget.
_NESTED, _ATTRIBUTES, _EVENTS, _ATTRIBUTES_LIMIT, _EVENTS_LIMIT = 0, 1, 2, 3, 4


def _spend_attributes(budget: list[int], n: int, where: str) -> None:
    left = budget[_ATTRIBUTES] - n
    if left < 0:  # the whole request is refused: nothing of it was stored yet
        raise too_many("attributes", budget[_ATTRIBUTES_LIMIT], where=where)
    budget[_ATTRIBUTES] = left


def _attributes(pairs: Any, where: str, budget: list[int]) -> dict[str, Any]:
    return _attributes_and_texts(pairs, where, budget)[0]


def _attributes_and_texts(
    pairs: Any, where: str, budget: list[int]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The attributes' values, and their text as a `spans` row keeps it (mapping.span_row,
    mapping.attribute_texts): the same dict when every value is a string, else a copy with
    the few other values' texts (cheaper than a text per attribute afterwards)."""
    if len(pairs) > MAX_ATTRIBUTES:
        raise BadSpan(f"{where}: {len(pairs)} attributes, over the limit of {MAX_ATTRIBUTES}")
    if pairs:
        _spend_attributes(budget, len(pairs), where)
    out: dict[str, Any] = {}
    others: list[str] = []  # the keys of values that are not strings
    for pair in pairs:
        # Nearly every value is a string, an int, a double or a bool: read inline (one
        # function call fewer per attribute, the bulk of a span's decoding). Most are
        # non-empty strings: read first, they need no WhichOneof (an unset or other kind
        # reads as "" and takes the general way).
        value = pair.value
        text = value.string_value
        if text:
            out[pair.key] = text
            continue
        key = pair.key
        kind = value.WhichOneof("value")
        if kind in _SCALARS:
            out[key] = getattr(value, kind)
        else:
            out[key] = _value(value, 0, key, budget)
        if kind != "string_value":  # an empty string is still a string
            others.append(key)
    # The keys' lengths in one pass in C, after the loop; the first long key is named.
    if out and max(map(len, out)) > MAX_KEY_CHARS:
        key = next(k for k in out if len(k) > MAX_KEY_CHARS)
        raise BadSpan(f"{where}: a key of {len(key)} characters (limit {MAX_KEY_CHARS})")
    if not others:
        return out, out
    texts = out.copy()
    for key in others:
        texts[key] = attribute_text(out[key])
    return out, texts


_SCALARS = frozenset({"string_value", "int_value", "double_value", "bool_value"})


def _spend(budget: list[int], n: int, key: str) -> None:
    if n > budget[_NESTED]:
        # A later span's values are refused too: the request's work stays bounded.
        budget[_NESTED] = 0
        raise BadSpan(
            f"attribute {key[:100]!r}: the request's arrays and key-value lists hold over"
            f" {MAX_NESTED_VALUES} values in all (the limit a request); send fewer or flatter"
            " values a request"
        )
    budget[_NESTED] -= n


def _value(value: Any, depth: int, key: str, budget: list[int]) -> Any:
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
        _spend(budget, len(values), key)
        return [_value(v, depth + 1, key, budget) for v in values]
    if kind == "kvlist_value":
        pairs = value.kvlist_value.values
        if len(pairs) > MAX_ATTRIBUTES:
            raise BadSpan(f"attribute {key[:100]!r} holds {len(pairs)} pairs (limit 1024)")
        _spend(budget, len(pairs), key)
        return {p.key: _value(p.value, depth + 1, key, budget) for p in pairs}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None
