"""Hostile input to the OTLP/HTTP receiver (POST /v1/traces), over real HTTP into real chDB.

Every case asserts the status (a 4xx, or 200 with `partial_success` naming the first
problems), that the answer is in the request's encoding (protobuf: a google.rpc.Status or an
ExportTraceServiceResponse; JSON: their JSON), that the server still serves, and that nothing
is half stored: each case sends its own trace, and after a sentinel request sent behind it has
reached the store (the spool is delivered in order), the trace's rows in `spans` and `events`
are exactly those of its good spans. Hypothesis then mutates valid protobuf bodies.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import Running, ServerThread, make_settings
from google.protobuf import json_format
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from watchllm_ext.app import create_app
from watchllm_ext.keys import KeyStore

TRACES = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
T0 = 1_767_323_045_000_000_000  # 2026-01-02T03:04:05Z in Unix nanoseconds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    # One server for the module: chDB holds one data folder per process.
    tmp = tmp_path_factory.mktemp("otel_bad_input")
    settings = make_settings(tmp)
    keys = KeyStore(settings.keys_path, refresh_s=0.2)
    key = keys.create("acme", scope="admin")
    app = create_app(settings)
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=120) as client:
        yield Running(thread.url, app, settings, keys, key, client, thread)
    keys.close()


# --- building requests ------------------------------------------------------------------------


def new_trace() -> bytes:
    return os.urandom(16)


def kv(key: str, value: Any) -> KeyValue:
    any_value = AnyValue()
    if isinstance(value, str):
        any_value.string_value = value
    elif isinstance(value, bool):
        any_value.bool_value = value
    elif isinstance(value, int):
        any_value.int_value = value
    else:
        any_value.double_value = value
    return KeyValue(key=key, value=any_value)


def span_id(trace: bytes, n: int) -> bytes:
    """Span n of a trace: ids differ between traces, as real SDKs' random ids do (the same
    span id in two traces: test_the_same_span_id_in_two_traces_keeps_both_events)."""
    return trace[:4] + n.to_bytes(4, "big")


def otel_span(
    trace: bytes, n: int, *, parent: int | None = None, llm: bool = False, **fields: Any
) -> Span:
    """Span number n of a trace (span id n, 8 bytes); an LLM span also becomes an event."""
    span = Span(
        trace_id=trace,
        span_id=span_id(trace, n),
        name=f"chat gpt-4o {n}" if llm else f"step {n}",
        kind=Span.SPAN_KIND_CLIENT if llm else Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=T0 + n * 1_000_000,
        end_time_unix_nano=T0 + n * 1_000_000 + 500_000,
        status=Status(code=Status.STATUS_CODE_OK),
    )
    if parent is not None:
        span.parent_span_id = span_id(trace, parent)
    if llm:
        span.attributes.extend(
            [
                kv("gen_ai.operation.name", "chat"),
                kv("gen_ai.request.model", "gpt-4o"),
                kv("gen_ai.usage.input_tokens", 10),
                kv("gen_ai.usage.output_tokens", 5),
            ]
        )
    for name, value in fields.items():
        setattr(span, name, value)
    return span


def export(*spans: Span) -> ExportTraceServiceRequest:
    resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=list(spans))])
    resource_spans.resource.attributes.append(kv("service.name", "bad-input"))
    return ExportTraceServiceRequest(resource_spans=[resource_spans])


def good_trace(trace: bytes) -> ExportTraceServiceRequest:
    """A root span and an LLM span under it: two spans, one event."""
    return export(otel_span(trace, 1), otel_span(trace, 2, parent=1, llm=True))


def to_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """OTLP JSON: protobuf's JSON mapping with ids in hex (OTLP's one difference besides enum
    integers, which json_format writes as names unless asked)."""
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in doc.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return doc


# --- sending and checking ---------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    protobuf: bool
    rejected_spans: int  # from partial_success (200) or -1
    message: str  # the partial_success or Status message
    headers: httpx.Headers


def post(
    server: Running,
    body: bytes,
    *,
    content_type: str | None = PROTOBUF,
    encoding: str | None = None,
    auth: str | None = "key",
    path: str = TRACES,
) -> Answer:
    headers: dict[str, str] = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    if auth == "key":
        headers["Authorization"] = f"Bearer {server.key}"
    elif auth is not None:
        headers["Authorization"] = auth
    r = server.client.post(path, content=body, headers=headers)
    assert r.status_code < 500, f"{r.status_code}: {r.content[:500]!r}"
    return parse_answer(r, protobuf=content_type == PROTOBUF)


def parse_answer(r: httpx.Response, protobuf: bool) -> Answer:
    """The answer decoded as the spec says, in the request's encoding (a body of another
    type fails here)."""
    media = r.headers.get("content-type", "").split(";")[0]
    assert media == (PROTOBUF if protobuf else JSON), (r.status_code, media, r.content[:300])
    if r.status_code == 200:
        ok = ExportTraceServiceResponse()
        if protobuf:
            ok.ParseFromString(r.content)
        else:
            json_format.Parse(r.content, ok)
        partial = ok.partial_success
        return Answer(200, protobuf, partial.rejected_spans, partial.error_message, r.headers)
    failure = status_pb2.Status()
    if protobuf:
        failure.ParseFromString(r.content)
    else:
        json_format.Parse(r.content, failure)
    assert failure.message, "a failure says why"
    return Answer(r.status_code, protobuf, -1, failure.message, r.headers)


def send(server: Running, request: ExportTraceServiceRequest, as_json: bool = False) -> Answer:
    if as_json:
        return post(server, json.dumps(to_json(request)).encode(), content_type=JSON)
    return post(server, request.SerializeToString())


def settle(server: Running) -> None:
    """Send a good trace and wait until it is stored: everything spooled before it is too."""
    trace = new_trace()
    assert send(server, good_trace(trace)).status == 200
    server.flush()
    deadline = 600  # 30 s of 0.05 s polls
    for _ in range(deadline):
        if stored(server, trace) == (2, 1):
            return
        time.sleep(0.05)
    raise AssertionError(f"the sentinel trace was not stored: {stored(server, trace)}")


def stored(server: Running, trace: bytes) -> tuple[int, int]:
    """(spans, events) stored for a trace; rows, not distinct ids: a duplicate shows."""
    trace_id = trace.hex()
    spans = server.query(
        "SELECT count() AS n FROM spans FINAL WHERE trace_id = {t:String}", {"t": trace_id}
    )[0]["n"]
    events = server.query(
        "SELECT count() AS n FROM events FINAL WHERE run_id = {t:String}", {"t": trace_id}
    )[0]["n"]
    return int(spans), int(events)


def still_serving(server: Running) -> None:
    assert server.client.get("/healthz").status_code == 200
    trace = new_trace()
    answer = send(server, good_trace(trace))
    assert answer.status == 200 and answer.rejected_spans == 0


# --- whole-request failures: 4xx, nothing stored ----------------------------------------------


def truncations(body: bytes) -> list[bytes]:
    # The request is one resourceSpans field holding everything: any cut inside it leaves a
    # length-delimited field short.
    return [body[:cut] for cut in (1, 2, len(body) // 3, len(body) // 2, len(body) - 1)]


def test_malformed_and_truncated_protobuf_is_a_400(server: Running) -> None:
    trace = new_trace()
    body = good_trace(trace).SerializeToString()
    bodies = [
        b"\xff\xff\xff\xff",
        b"not protobuf at all",
        b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
        b"\x0f" + b"\x08" * 10,  # wire type 7 does not exist
        *truncations(body),
    ]
    for bad in bodies:
        answer = post(server, bad)
        assert answer.status == 400, (bad[:20], answer)
        assert "protobuf" in answer.message.lower() or "body" in answer.message
    for bad in truncations(json.dumps(to_json(good_trace(trace))).encode()):
        answer = post(server, bad, content_type=JSON)
        assert answer.status == 400 and "json" in answer.message.lower(), answer
    settle(server)
    assert stored(server, trace) == (0, 0)
    still_serving(server)


@pytest.mark.parametrize("path", ["/v1/traces", "/api/public/otel/v1/traces"])
def test_both_paths_refuse_alike(server: Running, path: str) -> None:
    trace = new_trace()
    body = good_trace(trace).SerializeToString()
    assert post(server, body[:-1], path=path).status == 400
    assert post(server, body, path=path, auth=None).status == 401
    assert post(server, bomb("gzip"), path=path, encoding="gzip").status == 413
    settle(server)
    assert stored(server, trace) == (0, 0)
    assert post(server, body, path=path).status == 200


def test_wrong_content_type_and_encoding(server: Running) -> None:
    trace = new_trace()
    body = good_trace(trace).SerializeToString()
    for content_type in (None, "text/plain", "application/xml", "multipart/form-data"):
        r = server.client.post(
            TRACES,
            content=body,
            headers={"Authorization": f"Bearer {server.key}"}
            | ({"Content-Type": content_type} if content_type else {}),
        )
        assert r.status_code == 415, (content_type, r.status_code, r.text)
        assert "Content-Type" in parse_answer(r, protobuf=False).message
    for encoding, status in (("br", 415), ("zstd", 415), ("gzip", 400), ("deflate", 400)):
        answer = post(server, body, encoding=encoding)  # gzip/deflate: the body is not
        assert answer.status == status, (encoding, answer)
    # JSON sent as protobuf and protobuf sent as JSON.
    assert post(server, json.dumps(to_json(good_trace(trace))).encode()).status == 400
    assert post(server, body, content_type=JSON).status == 400
    settle(server)
    assert stored(server, trace) == (0, 0)
    still_serving(server)


@functools.cache
def bomb(encoding: str) -> bytes:
    """1 GB of zeros, compressed (about 1 MB), made a megabyte at a time."""
    compressor = (
        zlib.compressobj(9, zlib.DEFLATED, 31) if encoding == "gzip" else zlib.compressobj(9)
    )
    zeros = bytes(1 << 20)
    parts = [compressor.compress(zeros) for _ in range(1024)]
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_a_compression_bomb_is_a_413(server: Running, encoding: str, content_type: str) -> None:
    body = bomb(encoding)
    assert len(body) < 2 << 20
    answer = post(server, body, content_type=content_type, encoding=encoding)
    assert answer.status == 413, answer
    assert str(server.settings.max_decompressed_bytes) in answer.message.replace(",", "") or (
        "decompress" in answer.message.lower()
    )
    still_serving(server)


def test_a_body_over_the_wire_limit_is_a_413(server: Running) -> None:
    body = os.urandom(server.settings.max_body_bytes + 1)
    assert post(server, body).status == 413
    still_serving(server)


def test_good_compressed_bodies_are_taken(server: Running) -> None:
    # The other side of the bomb cases: gzip and deflate of a real request are read.
    for encoding, squeeze in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        trace = new_trace()
        body = squeeze(good_trace(trace).SerializeToString())
        assert post(server, body, encoding=encoding).status == 200
        settle(server)
        assert stored(server, trace) == (2, 1)


def test_a_gzip_body_of_too_many_members_is_a_400(server: Running) -> None:
    """A gzip body may be members one after another, up to 10,000; one more is refused before
    the export is read, naming the body, and nothing of it is stored."""
    trace = new_trace()
    body = good_trace(trace).SerializeToString()
    # Empty members first, then the export: the same bytes, only the member count differs.
    many = gzip.compress(b"", 1) * 10_000 + gzip.compress(body, 1)
    answer = post(server, many, encoding="gzip")
    assert answer.status == 400, answer
    assert "more than 10000 members" in answer.message, answer
    settle(server)
    assert stored(server, trace) == (0, 0)
    still_serving(server)
    answer = post(server, gzip.compress(b"", 1) * 9_999 + gzip.compress(body, 1), encoding="gzip")
    assert answer.status == 200, answer
    settle(server)
    assert stored(server, trace) == (2, 1)


def test_a_query_parameter_is_a_400_naming_it(server: Running) -> None:
    """The receiver takes no query parameters: one sent is refused, named, nothing stored (an
    export to ...?dry_run=1 was stored as any other); an empty query string is no parameter."""
    trace = new_trace()
    body = good_trace(trace).SerializeToString()
    for path in (TRACES + "?dry_run=1", TRACES + "?project_id=other&x=1"):
        answer = post(server, body, path=path)
        assert answer.status == 400, answer
        name = path.split("?")[1].split("=")[0]
        assert answer.message.startswith(f"{name}: this route takes no query parameters"), answer
    settle(server)
    assert stored(server, trace) == (0, 0)
    assert post(server, body, path=TRACES + "?").status == 200
    settle(server)
    assert stored(server, trace) == (2, 1)


@pytest.mark.parametrize(
    ("auth", "status"),
    [
        (None, 401),
        ("Bearer wllm_not_a_key", 401),
        ("Bearer", 401),
        ("Basic !!!not-base64", 401),
        ("Token abc", 401),
        ("read", 403),
        ("revoked", 401),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_no_or_wrong_key(server: Running, auth: str | None, status: int, as_json: bool) -> None:
    if auth == "read":
        auth = f"Bearer {server.keys.create('acme', scope='read')}"
    elif auth == "revoked":
        key = server.keys.create("acme", scope="ingest")
        assert server.keys.revoke(key)
        auth = f"Bearer {key}"
        # The server rereads its keys every second: poll with a body refused either way
        # (400 while the key still works, 401 once the revocation is seen).
        deadline = time.monotonic() + 3
        while post(server, b"\xff", auth=auth).status == 400:
            assert time.monotonic() < deadline, "the revocation was never seen"
            time.sleep(0.1)
    trace = new_trace()
    request = good_trace(trace)
    body = json.dumps(to_json(request)).encode() if as_json else request.SerializeToString()
    answer = post(server, body, content_type=JSON if as_json else PROTOBUF, auth=auth)
    assert answer.status == status, answer
    settle(server)
    assert stored(server, trace) == (0, 0)


@pytest.mark.parametrize("path", ["/v1/traces", "/api/public/otel/v1/traces"])
@pytest.mark.parametrize("as_json", [False, True])
def test_two_authorization_headers_get_an_otlp_answer(
    server: Running, path: str, as_json: bool
) -> None:
    # Refused before the route runs (RequestMetrics), and still in OTLP's shape: a Status in
    # the request's encoding, as every other refusal of the receiver.
    trace = new_trace()
    request = good_trace(trace)
    body = json.dumps(to_json(request)).encode() if as_json else request.SerializeToString()
    content_type = JSON if as_json else PROTOBUF
    r = server.client.post(
        path,
        content=body,
        headers=[
            ("Content-Type", content_type),
            ("Authorization", f"Bearer {server.key}"),
            ("Authorization", f"Bearer {server.key}"),
        ],
    )
    answer = parse_answer(r, protobuf=not as_json)
    assert answer.status == 400
    assert answer.message == "send one Authorization header, not 2"
    settle(server)
    assert stored(server, trace) == (0, 0)


def test_basic_auth_takes_the_key_as_password_only(server: Running) -> None:
    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    trace = new_trace()
    body = good_trace(trace).SerializeToString()
    assert post(server, body, auth=basic("pk-lf-public", "wllm_wrong")).status == 401
    assert post(server, body, auth=basic(server.key, "")).status == 200  # key as the user
    answer = post(server, body, auth=basic("pk-lf-public", server.key))
    assert answer.status == 200 and answer.rejected_spans == 0
    settle(server)
    assert stored(server, trace) == (2, 1)


def test_a_key_of_another_project_stores_there_not_here(server: Running) -> None:
    other = server.keys.create("other-project", scope="ingest")
    trace = new_trace()
    answer = post(server, good_trace(trace).SerializeToString(), auth=f"Bearer {other}")
    assert answer.status == 200 and answer.rejected_spans == 0
    settle(server)
    rows = server.query(
        "SELECT project_id, count() AS n FROM spans FINAL WHERE trace_id = {t:String}"
        " GROUP BY project_id",
        {"t": trace.hex()},
    )
    assert rows == [{"project_id": "other-project", "n": 2}]
    # And the key's own project cannot be read with it, nor acme's run tree show the trace.
    r = server.client.get(
        f"/v1/analytics/runs/{trace.hex()}", headers={"Authorization": f"Bearer {server.key}"}
    )
    assert r.status_code == 404


@pytest.mark.parametrize("as_json", [False, True])
def test_the_same_span_twice_in_one_request_is_stored_once(server: Running, as_json: bool) -> None:
    """trace id + span id is a span's key: a request holding two spans of one key, with
    other times, kept both (the store's key has the start time): the later is refused."""
    trace = new_trace()
    first = otel_span(trace, 1, llm=True)
    again = otel_span(trace, 1, llm=True, start_time_unix_nano=T0 + 7_000_000_000)
    again.end_time_unix_nano = again.start_time_unix_nano + 1_000
    answer = send(server, export(first, otel_span(trace, 2), again), as_json=as_json)
    assert answer.status == 200 and answer.rejected_spans == 1, answer
    assert "spans[2]" in answer.message and "same traceId and spanId" in answer.message
    settle(server)
    assert stored(server, trace) == (2, 1)
    (row,) = server.query(
        "SELECT toUnixTimestamp64Nano(start_time) AS start FROM spans FINAL"
        " WHERE trace_id = {t:String} AND span_id = {s:String}",
        {"t": trace.hex(), "s": span_id(trace, 1).hex()},
    )
    assert int(row["start"]) // 1_000 == (T0 + 1_000_000) // 1_000  # the first one's


def test_the_same_span_id_in_two_traces_keeps_both_events(server: Running) -> None:
    """A span id is unique only within its trace (the OTLP spec); a client with
    deterministic ids (tests, replays, some SDKs' id generators) reuses them across traces.
    Both traces are answered 200, so both LLM spans must be stored whole: span and event."""
    first, second = new_trace(), new_trace()
    same = b"\x00\x00\x00\x00\x00\x00\x00\x2a"
    for trace in (first, second):
        assert send(server, export(otel_span(trace, 1, llm=True, span_id=same))).status == 200
    settle(server)
    assert stored(server, first) == (1, 1)
    assert stored(server, second) == (1, 1), "the second trace's event was taken for a copy"
    for trace in (first, second):
        assert event_ids(server, trace) == [f"{trace.hex()}-{same.hex()}"]
        # Its run shows it: one event node, its span beside it, the tokens counted.
        tree = run_tree(server, trace)
        assert [(n["kind"], n["id"]) for n in tree["tree"]] == [("event", same.hex())]
        assert tree["run"]["event_count"] == 1 and tree["run"]["tokens_input"] == 10


def event_ids(server: Running, trace: bytes) -> list[str]:
    rows = server.query(
        "SELECT event_id FROM events FINAL WHERE run_id = {t:String} ORDER BY event_id",
        {"t": trace.hex()},
    )
    return [r["event_id"] for r in rows]


def run_tree(server: Running, trace: bytes) -> dict[str, Any]:
    r = server.client.get(f"/v1/analytics/runs/{trace.hex()}", headers=server.headers())
    assert r.status_code == 200, r.text
    return r.json()


def post_json_event(server: Running, event_id: str, run_id: str) -> None:
    event = {
        "event_id": event_id,
        "event_type": "prompt_call",
        "run_id": run_id,
        "model": "gpt-4o-mini",
        "tokens_input": 7,
    }
    r = server.client.post("/v1/events/batch", json={"events": [event]}, headers=server.headers())
    assert r.status_code == 202 and r.json()["accepted"] == 1, r.text


@pytest.mark.parametrize("span_first", [False, True], ids=["json-event-first", "span-first"])
def test_a_json_event_with_a_span_id_as_its_id_keeps_both(
    server: Running, span_first: bool
) -> None:
    """A JSON event whose id is the 16 hex digits of a span id (either sent first) and the
    LLM span: both answered 2xx, so both events are stored (the span's event is named by
    trace and span id)."""
    trace = new_trace()
    sid = os.urandom(8)
    json_run = f"json-run-{trace.hex()[:8]}"
    if not span_first:
        post_json_event(server, sid.hex(), json_run)
    assert send(server, export(otel_span(trace, 1, llm=True, span_id=sid))).status == 200
    if span_first:
        post_json_event(server, sid.hex(), json_run)
    settle(server)
    assert stored(server, trace) == (1, 1)
    assert event_ids(server, trace) == [f"{trace.hex()}-{sid.hex()}"]
    rows = server.query(
        "SELECT event_id, model FROM events FINAL WHERE run_id = {r:String}", {"r": json_run}
    )
    assert rows == [{"event_id": sid.hex(), "model": "gpt-4o-mini"}]


# --- span by span: 200 with partial_success, the good spans stored ----------------------------


def deep_value_bytes(depth: int, kind: str = "mixed") -> bytes:
    """An AnyValue nested `depth` levels (mixed: kvlist in array in kvlist ...; or arrays
    only, or kvlists only), as protobuf bytes built from the inside out: the generated
    classes would recurse that deep to build it."""

    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    value = field(1, b"leaf")  # AnyValue{string_value}
    for level in range(depth):
        if kind == "array" or (kind == "mixed" and level % 2):
            # AnyValue{array_value: ArrayValue{values: [value]}}
            value = field(5, field(1, value))
        else:  # AnyValue{kvlist_value: KeyValueList{values: [KeyValue{key, value}]}}
            value = field(6, field(1, field(1, b"k") + field(2, value)))
    return value


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_deep_attribute(span: Span, depth: int, kind: str = "mixed") -> bytes:
    """A request holding `span` plus a good span, `span` carrying a deep attribute value."""
    deep = deep_value_bytes(depth, kind)
    # KeyValue{key: "deep", value: <deep>} appended to the span's own bytes (field 9).
    attribute = b"\x0a\x04deep" + b"\x12" + _varint(len(deep)) + deep
    span_bytes = span.SerializeToString() + b"\x4a" + _varint(len(attribute)) + attribute
    good = otel_span(span.trace_id, 7, llm=True).SerializeToString()
    scope = b"\x12" + _varint(len(span_bytes)) + span_bytes + b"\x12" + _varint(len(good)) + good
    resource_spans = b"\x12" + _varint(len(scope)) + scope  # ResourceSpans.scope_spans = 2
    return b"\x0a" + _varint(len(resource_spans)) + resource_spans


@dataclass
class Partial:
    id: str
    bad: Span  # sent with a good LLM span of the same trace (span 7)
    says: str  # in the partial_success message


def partial_cases(trace: bytes) -> list[Partial]:
    many = otel_span(trace, 3)
    many.attributes.extend(kv(f"attr.{i}", i) for i in range(10_000))
    return [
        Partial("trace-id-15-bytes", otel_span(trace, 3, trace_id=trace[:15]), "traceId"),
        Partial("span-id-0-bytes", otel_span(trace, 3, span_id=b""), "spanId"),
        Partial("span-id-9-bytes", otel_span(trace, 3, span_id=b"\x01" * 9), "spanId"),
        Partial("parent-id-3-bytes", otel_span(trace, 3, parent_span_id=b"abc"), "parentSpanId"),
        Partial("trace-id-zeros", otel_span(trace, 3, trace_id=bytes(16)), "traceId"),
        Partial("10000-attributes", many, "attributes"),
        Partial("llm-span-10000-attributes", _llm_with_many(trace), "attributes"),
    ]


def _llm_with_many(trace: bytes) -> Span:
    span = otel_span(trace, 4, llm=True)
    span.attributes.extend(kv(f"x.{i}", "v") for i in range(10_000))
    return span


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_bad_spans_are_rejected_and_named_the_good_one_stored(
    server: Running, as_json: bool
) -> None:
    for case in partial_cases(new_trace()):
        trace = new_trace()
        bad = Span()
        bad.CopyFrom(case.bad)
        if len(bad.trace_id) == 16 and any(bad.trace_id):
            bad.trace_id = trace
        good = otel_span(trace, 7, llm=True)
        answer = send(server, export(bad, good), as_json=as_json)
        assert answer.status == 200, (case.id, answer)
        assert answer.rejected_spans == 1, (case.id, answer)
        assert case.says in answer.message, (case.id, answer.message)
        settle(server)
        assert stored(server, trace) == (1, 1), case.id
        # The good span is whole: its event is there too.
        (row,) = server.query(
            "SELECT event_id FROM events FINAL WHERE run_id = {t:String}", {"t": trace.hex()}
        )
        assert row["event_id"] == f"{trace.hex()}-{span_id(trace, 7).hex()}"


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_all_spans_bad_is_a_400_naming_them(server: Running, as_json: bool) -> None:
    trace = new_trace()
    request = export(otel_span(trace, 1, span_id=b""), otel_span(trace[:15], 2, llm=True))
    answer = send(server, request, as_json=as_json)
    assert answer.status == 400, answer
    assert "spanId" in answer.message and "traceId" in answer.message, answer.message
    settle(server)
    assert stored(server, trace) == (0, 0)


@pytest.mark.parametrize("depth", [20, 200, 10_000])
def test_deeply_nested_attribute_values(server: Running, depth: int) -> None:
    trace = new_trace()
    body = with_deep_attribute(otel_span(trace, 3, llm=True), depth)
    answer = post(server, body)
    deep_value_refused(server, trace, answer)


def deep_value_refused(server: Running, trace: bytes, answer: Answer) -> None:
    """Either the parser refused the body (its recursion limit: 400) or the span with the
    deep value was rejected on its own (partial success, the other span stored); never stored,
    never a 5xx."""
    if answer.status == 200:
        assert answer.rejected_spans == 1 and "deep" in answer.message, answer
        expected = (1, 1)
    else:
        assert answer.status == 400, answer
        expected = (0, 0)
    settle(server)
    assert stored(server, trace) == expected
    still_serving(server)


def deep_json_value(depth: int) -> str:
    text = '{"stringValue": "leaf"}'
    for level in range(depth):
        if level % 2:
            text = '{"arrayValue": {"values": [' + text + "]}}"
        else:
            text = '{"kvlistValue": {"values": [{"key": "k", "value": ' + text + "}]}}"
    return text


@pytest.mark.parametrize("depth", [20, 10_000])
def test_deeply_nested_json_values(server: Running, depth: int) -> None:
    trace = new_trace()
    doc = to_json(export(otel_span(trace, 3, llm=True), otel_span(trace, 7, llm=True)))
    text = json.dumps(doc)
    marker = '"attributes": ['
    at = text.index(marker) + len(marker)
    body = text[:at] + '{"key": "deep", "value": ' + deep_json_value(depth) + "}, " + text[at:]
    answer = post(server, body.encode(), content_type=JSON)
    deep_value_refused(server, trace, answer)


def nested_value(depth: int, kind: str) -> dict[str, Any]:
    """deep_value_bytes' value in protobuf's JSON form."""
    value: dict[str, Any] = {"stringValue": "leaf"}
    for level in range(depth):
        if kind == "array" or (kind == "mixed" and level % 2):
            value = {"arrayValue": {"values": [value]}}
        else:
            value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    return value


# Where the per-span limit (16 levels) gives way to the parsers' own: protobuf's (upb) and
# json_format's limit of 100 nested messages. A span attribute's value sits 6 messages deep
# (request, resourceSpans, scopeSpans, span, key-value, value); an array level adds 2, a
# key-value-list level 3: 47 array levels are 100 messages, 31 kvlist levels 99
# (docs/OPENTELEMETRY.md, "Deep values").
@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
@pytest.mark.parametrize(
    ("kind", "depth", "status"),
    [
        ("array", 16, 200),
        ("array", 17, 200),
        ("array", 47, 200),
        ("array", 48, 400),
        ("kvlist", 16, 200),
        ("kvlist", 31, 200),
        ("kvlist", 32, 400),
    ],
)
def test_the_depth_at_which_the_whole_body_is_refused(
    server: Running, kind: str, depth: int, status: int, as_json: bool
) -> None:
    trace = new_trace()
    deep = otel_span(trace, 3, llm=True)
    if as_json:
        doc = to_json(export(deep, otel_span(trace, 7, llm=True)))
        attributes = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"]
        attributes.append({"key": "deep", "value": nested_value(depth, kind)})
        answer = post(server, json.dumps(doc).encode(), content_type=JSON)
    else:
        answer = post(server, with_deep_attribute(deep, depth, kind))
    assert answer.status == status, (kind, depth, answer)
    if status == 400:
        assert "body" in answer.message, answer
        expected = (0, 0)
    elif depth <= 16:
        assert answer.rejected_spans == 0, answer
        expected = (2, 2)
    else:
        assert answer.rejected_spans == 1 and "nested deeper than 16" in answer.message, answer
        expected = (1, 1)
    settle(server)
    assert stored(server, trace) == expected


# --- OTLP JSON with wrong types -----------------------------------------------------------------


def json_case(trace: bytes, change: Any) -> bytes:
    doc = to_json(good_trace(trace))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][1]  # the LLM span
    change(span, doc)
    return json.dumps(doc).encode()


def _set(key: str, value: Any) -> Any:
    return lambda span, doc: span.__setitem__(key, value)


def _bytes_value(text: str, key: str = "a") -> dict[str, Any]:
    return {"key": key, "value": {"bytesValue": text}}


# Each must be refused: the whole body (400) or the span (partial success), never stored as
# something else than was sent.
WRONG_TYPES: list[tuple[str, Any]] = [
    ("trace-id-number", _set("traceId", 12345)),
    ("span-id-number", _set("spanId", 67890)),
    ("span-id-not-hex", _set("spanId", "zzzzzzzzzzzzzzzz")),
    ("parent-id-list", _set("parentSpanId", ["a"])),
    ("start-time-fraction", _set("startTimeUnixNano", "1767323045000000000.5")),
    ("start-time-float-fraction", _set("startTimeUnixNano", 1767323045.5)),
    ("end-time-negative", _set("endTimeUnixNano", "-5")),
    ("end-time-huge", _set("endTimeUnixNano", "1" * 40)),
    ("name-number", _set("name", 5)),
    ("name-object", _set("name", {"a": 1})),
    ("attributes-object", _set("attributes", {"a": 1})),
    ("attribute-value-string", _set("attributes", [{"key": "a", "value": "plain"}])),
    ("attribute-value-number", _set("attributes", [{"key": "a", "value": 5}])),
    ("int-value-float", _set("attributes", [{"key": "a", "value": {"intValue": 1.5}}])),
    ("int-value-text", _set("attributes", [{"key": "a", "value": {"intValue": "ten"}}])),
    ("bytes-value-not-base64", _set("attributes", [_bytes_value("no!")])),
    ("bytes-value-base64-and-more", _set("attributes", [_bytes_value("Zm9v!!!!")])),
    ("bytes-value-a-char-over", _set("attributes", [_bytes_value("QUJDR")])),
    ("bytes-value-bad-padding", _set("attributes", [_bytes_value("QUI==")])),
    ("kind-string-unknown", _set("kind", "SPAN_KIND_NONSENSE")),
    ("status-code-string-unknown", _set("status", {"code": "NOPE"})),
    ("status-string", _set("status", "error")),
    ("resource-spans-object", lambda span, doc: doc.__setitem__("resourceSpans", {"a": 1})),
    ("spans-string", lambda span, doc: doc["resourceSpans"][0]["scopeSpans"][0].update(spans="x")),
]


@pytest.mark.parametrize(("name", "change"), WRONG_TYPES, ids=[c[0] for c in WRONG_TYPES])
def test_json_with_wrong_types_is_refused(server: Running, name: str, change: Any) -> None:
    trace = new_trace()
    answer = post(server, json_case(trace, change), content_type=JSON)
    settle(server)
    got = stored(server, trace)
    if answer.status == 200:
        # The spoiled span (the LLM span) rejected and named; the root span stored alone.
        assert answer.rejected_spans == 1, (name, answer, got)
        assert got == (1, 0), (name, got)
    else:
        assert answer.status == 400, (name, answer)
        assert got == (0, 0), (name, got)


def test_json_bytes_in_every_base64_form_are_read(server: Running) -> None:
    # Standard or URL-safe base64, padded or not (the protobuf JSON mapping): each the same
    # bytes, stored as their standard base64.
    forms = {"padded": "+/+/aGk=", "unpadded": "+/+/aGk", "url-safe": "-_-_aGk", "empty": ""}
    trace = new_trace()

    def change(span: Any, doc: Any) -> None:
        span["attributes"] += [_bytes_value(text, f"b.{name}") for name, text in forms.items()]

    answer = post(server, json_case(trace, change), content_type=JSON)
    assert answer.status == 200 and answer.rejected_spans == 0, answer
    settle(server)
    assert stored(server, trace) == (2, 1)
    [row] = server.query(
        "SELECT attributes FROM spans FINAL"
        " WHERE trace_id = {t:String} AND mapContains(attributes, 'b.padded')",
        {"t": trace.hex()},
    )
    assert {k: row["attributes"][f"b.{k}"] for k in forms} == {
        "padded": "+/+/aGk=",
        "unpadded": "+/+/aGk=",
        "url-safe": "+/+/aGk=",
        "empty": "",
    }


def test_json_times_as_whole_floats_are_read(server: Running) -> None:
    # JSON has one number type: 1.7673230455e18 is the whole number 1767323045500000000
    # (the end, half a second after T0: after the span's start, T0 + 2 ms).
    trace = new_trace()
    change = _set("endTimeUnixNano", 1.7673230455e18)
    assert post(server, json_case(trace, change), content_type=JSON).status == 200
    settle(server)
    assert stored(server, trace) == (2, 1)


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    [("kind-99", 99, "unspecified"), ("kind-negative", -1, "unspecified")],
)
def test_json_enum_out_of_range_is_read_as_unspecified(
    server: Running, name: str, value: int, kind: str
) -> None:
    trace = new_trace()
    answer = post(server, json_case(trace, _set("kind", value)), content_type=JSON)
    assert answer.status in (200, 400), answer
    settle(server)
    if answer.status == 200:
        rows = server.query(
            "SELECT kind FROM spans FINAL WHERE trace_id = {t:String} AND span_id = {s:String}",
            {"t": trace.hex(), "s": span_id(trace, 2).hex()},
        )
        assert rows == [{"kind": kind}], (name, rows)
    else:
        assert stored(server, trace) == (0, 0)


# --- hypothesis: mutated protobuf --------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    trace = new_trace()
    spans = [otel_span(trace, 1), otel_span(trace, 2, parent=1, llm=True), otel_span(trace, 3)]
    # Field-level changes first (what a buggy SDK sends: ids of any length, enums and times
    # out of range, odd names), then byte-level damage (what a broken proxy sends).
    for span in spans:
        if draw(st.integers(0, 3)) == 0:
            name = draw(st.sampled_from(["trace_id", "span_id", "parent_span_id"]))
            setattr(span, name, draw(st.binary(max_size=20)))
        if draw(st.integers(0, 5)) == 0:
            span.kind = draw(st.integers(-(2**31), 2**31 - 1))
        if draw(st.integers(0, 5)) == 0:
            span.status.code = draw(st.integers(-(2**31), 2**31 - 1))
        if draw(st.integers(0, 5)) == 0:
            span.start_time_unix_nano = draw(st.integers(0, 2**64 - 1))
        if draw(st.integers(0, 5)) == 0:
            span.name = draw(st.text(max_size=50))
    body = bytearray(export(*spans).SerializeToString())
    for _ in range(draw(st.integers(0, 4))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        how = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "dup"]))
        if how == "flip":
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "set":
            body[at] = draw(st.integers(0, 255))
        elif how == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del body[at : at + draw(st.integers(1, 8))]
        elif how == "cut":
            del body[at:]
        else:
            body[at:at] = body[at : at + draw(st.integers(1, 32))]
    return trace, bytes(body)


def span_count(body: bytes) -> int:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)  # the server took it, so it parses
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def sent_spans(body: bytes) -> set[tuple[str, str]]:
    """The (trace, span) ids a body holds, as a correct parser reads them; empty when it does
    not parse."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except Exception:
        return set()
    return {
        (s.trace_id.hex(), s.span_id.hex())
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    }


def test_mutated_protobuf_never_fails_the_server(server: Running) -> None:
    answers: list[tuple[bytes, bytes, Answer]] = []

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(mutated())
    def check(case: tuple[bytes, bytes]) -> None:
        trace, body = case
        answer = post(server, body)
        assert answer.status in (200, 400), answer
        if answer.status == 200:
            assert 0 <= answer.rejected_spans <= span_count(body), answer
        answers.append((trace, body, answer))

    check()
    settle(server)
    still_serving(server)
    assert len(answers) >= 250
    assert {a.status for _, _, a in answers} == {200, 400}, "the mutations reach both sides"
    partial = [a for _, _, a in answers if a.status == 200 and a.rejected_spans > 0]
    assert partial, "and partial successes"
    assert all("span" in a.message for a in partial)
    # Nothing half stored: a 400 stored nothing of its body; a 200 stored exactly the spans
    # it did not reject, each once, and an LLM span's event with it.
    ids_of_400: set[tuple[str, str]] = set()
    for _, body, answer in answers:
        if answer.status == 400:
            ids_of_400 |= sent_spans(body)
    taken: set[tuple[str, str]] = set()
    for _, body, answer in answers:
        if answer.status == 200:
            taken |= sent_spans(body)
    traces = sorted({t.hex() for t, _, _ in answers} | {t for t, _ in ids_of_400 | taken})
    rows = server.query(
        "SELECT trace_id, span_id, count() AS n FROM spans FINAL"
        " WHERE trace_id IN {t:Array(String)} GROUP BY trace_id, span_id",
        {"t": traces},
    )
    in_store = {(r["trace_id"], r["span_id"]) for r in rows}
    assert all(r["n"] == 1 for r in rows)
    assert in_store <= taken, f"spans of no accepted request: {sorted(in_store - taken)[:5]}"
    fully_taken = set()
    for _, body, answer in answers:
        if answer.status == 200 and answer.rejected_spans == 0:
            fully_taken |= {
                ids for ids in sent_spans(body) if len(ids[0]) == 32 and len(ids[1]) == 16
            }
    missing = fully_taken - in_store
    assert not missing, f"accepted with no rejection, not stored: {sorted(missing)[:5]}"
    # Events only for stored spans (an event without its span is half stored).
    events = server.query(
        "SELECT run_id, event_id FROM events FINAL WHERE run_id IN {t:Array(String)}",
        {"t": traces},
    )
    # (an event's id is "<trace>-<span>": otel/ids.py)
    assert {tuple(e["event_id"].split("-")) for e in events} <= in_store
    assert all(e["event_id"].startswith(e["run_id"] + "-") for e in events)


@pytest.mark.parametrize("as_json", [False, True])
def test_a_resource_copied_onto_too_many_spans_is_refused(server: Running, as_json: bool) -> None:
    """Each span's row keeps its resource's attributes: a small body whose big resource sits
    over many spans would make gigabytes of rows. Past MAX_COPIED_BYTES a request's scopes
    are refused, named in partial_success; the scopes before them are stored."""
    from watchllm_ext.otel.decode import MAX_COPIED_BYTES

    trace = new_trace()
    big = "r" * 100_000
    many = 1 + MAX_COPIED_BYTES // len(big)  # over the limit by one span's copy
    fine = ResourceSpans(scope_spans=[ScopeSpans(spans=[otel_span(trace, 1)])])
    fine.resource.attributes.append(kv("service.name", "fine"))
    heavy = ResourceSpans(
        scope_spans=[ScopeSpans(spans=[otel_span(trace, n) for n in range(2, 2 + many)])]
    )
    heavy.resource.attributes.append(kv("deployment.notes", big))
    request = ExportTraceServiceRequest(resource_spans=[fine, heavy])
    body = request.SerializeToString()
    answer = (
        post(
            server,
            gzip.compress(json.dumps(to_json(request)).encode()),
            content_type=JSON,
            encoding="gzip",
        )
        if as_json
        else post(server, gzip.compress(body), encoding="gzip")
    )
    assert answer.status == 200, answer.message
    assert answer.rejected_spans == many
    assert "resourceSpans[1].scopeSpans[0]" in answer.message
    assert f"{many} spans rejected" in answer.message
    settle(server)
    assert stored(server, trace) == (1, 0)
    still_serving(server)


def wide_value_bytes(outer: int, inner: int) -> bytes:
    """AnyValue{array of `outer` arrays of `inner` empty values}: 2 bytes a value, as bytes."""

    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    inner_array = field(5, field(1, b"") * inner)  # AnyValue{array_value: [AnyValue{}] * inner}
    return field(5, field(1, inner_array) * outer)


def test_values_past_the_requests_nested_budget_refuse_their_span(server: Running) -> None:
    """Arrays of arrays of empty values (a few bytes each, an object each once decoded): past
    MAX_NESTED_VALUES in one request the span is refused at once, named, and the others
    stored; the work stays far from the seconds it took before the limit."""
    from watchllm_ext.otel.decode import MAX_NESTED_VALUES

    trace = new_trace()
    wide = wide_value_bytes(1024, 1024)  # 1,049,600 values: over the limit
    assert MAX_NESTED_VALUES < 1024 + 1024 * 1024
    attribute = b"\x0a\x04wide" + b"\x12" + _varint(len(wide)) + wide
    span = otel_span(trace, 3, llm=True).SerializeToString()
    span += b"\x4a" + _varint(len(attribute)) + attribute
    good = otel_span(trace, 7, llm=True).SerializeToString()
    scope = b"\x12" + _varint(len(span)) + span + b"\x12" + _varint(len(good)) + good
    resource_spans = b"\x12" + _varint(len(scope)) + scope
    body = b"\x0a" + _varint(len(resource_spans)) + resource_spans
    started = time.monotonic()
    answer = post(server, gzip.compress(body), encoding="gzip")
    took = time.monotonic() - started
    assert answer.status == 200 and answer.rejected_spans == 1, answer
    assert "'wide'" in answer.message and str(MAX_NESTED_VALUES) in answer.message, answer
    assert took < 10, took
    settle(server)
    assert stored(server, trace) == (1, 1)
    still_serving(server)


# --- bounds on a request's structure, whatever its size in bytes -------------------------------
# Each entry costs microseconds of Python once walked and two bytes of body: without bounds a
# small body held millions (decode.py). Bodies are built as protobuf bytes (repeated fields
# concatenate: appending entries to a serialized request adds them).


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


EMPTY_RESOURCE = ld(1, b"")  # ExportTraceServiceRequest.resource_spans: ResourceSpans{}
EMPTY_SCOPE = ld(2, b"")  # ResourceSpans.scope_spans: ScopeSpans{}
EMPTY_EVENT = ld(11, b"")  # Span.events: Event{}
EMPTY_PAIR = ld(3, b"")  # Span.Event.attributes: KeyValue{}


def in_one_scope(*spans: bytes) -> bytes:
    """A request of one resource (no attributes) and one scope holding the spans' bytes."""
    return ld(1, ld(2, b"".join(ld(2, span) for span in spans)))


def post_either(server: Running, body: bytes, as_json: bool) -> Answer:
    """The protobuf request `body`, sent gzipped as protobuf or as OTLP JSON."""
    if as_json:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        doc = to_json(request)
        for resource_spans in doc.get("resourceSpans", []):  # links' ids in hex too
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    for link in span.get("links", []):
                        for key in ("traceId", "spanId"):
                            link[key] = base64.b64decode(link[key]).hex()
        text = json.dumps(doc, separators=(",", ":")).encode()
        return post(server, gzip.compress(text, 1), content_type=JSON, encoding="gzip")
    return post(server, gzip.compress(body, 1), encoding="gzip")


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_a_small_body_of_millions_of_empty_entries_is_refused_at_once(
    server: Running, as_json: bool
) -> None:
    """The probe: 4,000,000 empty resourceSpans, 8 MB (12 MB as JSON), a few KB gzipped, took
    15 s of a worker's CPU, past its deadline, then again in the server, and were answered 200
    at no quota (no span). Now a 400 naming the field and the limit, before any is walked."""
    from watchllm_ext.otel.decode import MAX_ENTRIES

    body = EMPTY_RESOURCE * 4_000_000
    if as_json:
        text = b'{"resourceSpans":[' + b",".join([b"{}"] * 4_000_000) + b"]}"
        wire = gzip.compress(text, 1)
    else:
        wire = gzip.compress(body, 1)
    assert len(wire) < 64 * 1024
    started = time.monotonic()
    answer = post(server, wire, content_type=JSON if as_json else PROTOBUF, encoding="gzip")
    took = time.monotonic() - started
    assert answer.status == 400, answer
    assert answer.message.startswith("resourceSpans: 4000000 resourceSpans entries") or (
        as_json and answer.message.startswith("resourceSpans: more than")
    ), answer.message
    assert f"limit of {MAX_ENTRIES}" in answer.message
    assert took < 10, took  # parsing only (0.4 s of protobuf, 1 s of JSON, on a quiet core)
    still_serving(server)


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
@pytest.mark.parametrize("entries", ["resourceSpans", "scopeSpans"])
def test_resource_and_scope_entries_past_the_limit_refuse_the_request(
    server: Running, entries: str, as_json: bool
) -> None:
    """At the limit a request is taken; one entry more and it is refused whole (400, the
    field and the limit named), its good spans not stored. Scope entries count in all: here
    half of them in a second resource."""
    from watchllm_ext.otel.decode import MAX_ENTRIES

    def body(trace: bytes, n: int) -> bytes:
        good = good_trace(trace).SerializeToString()  # one resource, one scope, 2 spans
        if entries == "resourceSpans":
            return good + EMPTY_RESOURCE * (n - 1)
        half = (n - 1) // 2
        return good + ld(1, EMPTY_SCOPE * half) + ld(1, EMPTY_SCOPE * (n - 1 - half))

    trace = new_trace()
    answer = post_either(server, body(trace, MAX_ENTRIES), as_json)
    assert answer.status == 200 and answer.rejected_spans == 0, answer
    over = new_trace()
    answer = post_either(server, body(over, MAX_ENTRIES + 1), as_json)
    assert answer.status == 400, answer
    assert f"{entries} entries in one request" in answer.message, answer.message
    assert f"limit of {MAX_ENTRIES} a request" in answer.message
    settle(server)
    assert stored(server, trace) == (2, 1)
    assert stored(server, over) == (0, 0)


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_span_events_and_links_past_the_limit_refuse_the_request(
    server: Running, as_json: bool
) -> None:
    """Span events and links in all: 256 spans of 1,024 empty events each are taken; one
    event more is a 413 naming them (a smaller batch is taken), nothing of it stored."""
    from watchllm_ext.otel.decode import MAX_EVENTS_IN_ALL

    per_span = 1024
    n = MAX_EVENTS_IN_ALL // per_span

    def body(trace: bytes, extra: bytes) -> bytes:
        spans = [otel_span(trace, i).SerializeToString() + EMPTY_EVENT * per_span for i in range(n)]
        return in_one_scope(*spans, otel_span(trace, n).SerializeToString() + extra)

    trace = new_trace()
    answer = post_either(server, body(trace, b""), as_json)
    assert answer.status == 200 and answer.rejected_spans == 0, answer
    over = new_trace()
    link = Span.Link(trace_id=over, span_id=span_id(over, 1)).SerializeToString()
    answer = post_either(server, body(over, ld(13, link)), as_json)  # Span.links
    assert answer.status == 413, answer
    assert "span events and links in one request" in answer.message, answer.message
    assert f"limit of {MAX_EVENTS_IN_ALL} a request" in answer.message
    settle(server)
    assert stored(server, trace) == (n + 1, 0)
    assert stored(server, over) == (0, 0)


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_attributes_past_the_limit_refuse_the_request(server: Running, as_json: bool) -> None:
    """Attributes in all (of resources, scopes, spans, span events and links): one span whose
    1,024 events hold 1,024 empty attributes each is at the limit; one attribute more is a
    413 naming them. (Before, 24 such spans, a 50 KB gzip body, took 24 s of CPU.)"""
    from watchllm_ext.otel.decode import MAX_ATTRIBUTES_IN_ALL

    assert MAX_ATTRIBUTES_IN_ALL == 1024 * 1024
    events = ld(11, EMPTY_PAIR * 1024) * 1024
    over = new_trace()
    if as_json:  # written directly: json_format would take seconds to make it
        doc = to_json(export(otel_span(over, 1)))
        span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        span["events"] = [{"attributes": [{}] * 1024}] * 1024  # and the resource's one
        text = json.dumps(doc, separators=(",", ":")).encode()
        answer = post(server, gzip.compress(text, 1), content_type=JSON, encoding="gzip")
    else:
        extra = ld(9, kv("one.more", 1).SerializeToString())  # Span.attributes
        answer = post_either(
            server, in_one_scope(otel_span(over, 1).SerializeToString() + extra + events), False
        )
    assert answer.status == 413, answer
    assert "attributes (of resources, scopes, spans, span events and links)" in answer.message
    assert f"limit of {MAX_ATTRIBUTES_IN_ALL} a request" in answer.message, answer.message
    if not as_json:  # (1,048,576 attributes of JSON take seconds to parse: protobuf's only)
        trace = new_trace()
        body = in_one_scope(otel_span(trace, 1).SerializeToString() + events)
        answer = post_either(server, body, False)
        assert answer.status == 200 and answer.rejected_spans == 0, answer
        settle(server)
        assert stored(server, trace) == (1, 0)
    settle(server)
    assert stored(server, over) == (0, 0)


def test_a_collector_sized_batch_at_the_sdks_attribute_cap_is_taken(server: Running) -> None:
    """A Collector's batch (8,192 spans) of spans at the SDK's cap of 128 attributes each, and
    a resource attribute: 1,048,577 attributes, one past the floor of MAX_ATTRIBUTES_IN_ALL,
    within the request's ATTRIBUTES_A_SPAN a span. Before, the whole batch was a 413, which
    exporters drop."""
    from watchllm_ext.otel.decode import ATTRIBUTES_A_SPAN, MAX_ATTRIBUTES_IN_ALL

    n_spans, per_span = 8_192, 128
    assert n_spans * per_span + 1 > MAX_ATTRIBUTES_IN_ALL
    assert n_spans * per_span + 1 <= ATTRIBUTES_A_SPAN * n_spans
    pairs = b"".join(ld(9, kv(f"app.attr{i}", i).SerializeToString()) for i in range(per_span))
    trace = new_trace()
    spans = b"".join(ld(2, otel_span(trace, n).SerializeToString() + pairs) for n in range(n_spans))
    resource = ld(1, ld(1, kv("service.name", "batch").SerializeToString()))  # its attribute
    body = ld(1, resource + ld(2, spans))
    answer = post_either(server, body, False)
    assert answer.status == 200 and answer.rejected_spans == 0, answer
    settle(server)
    assert stored(server, trace) == (n_spans, 0)


def test_json_values_past_the_requests_budget_refuse_the_request(server: Running) -> None:
    """OTLP JSON is parsed whole, in Python, before a span is read: values in arrays and
    key-value lists past MAX_NESTED_VALUES refuse the request (413) rather than their span,
    as protobuf does (test_values_past_the_requests_nested_budget_refuse_their_span)."""
    from watchllm_ext.otel.decode import MAX_NESTED_VALUES

    trace = new_trace()
    doc = to_json(export(otel_span(trace, 3, llm=True), otel_span(trace, 7, llm=True)))
    inner = {"arrayValue": {"values": [{}] * 1024}}
    wide = {"arrayValue": {"values": [inner] * 1024}}  # 1,024 + 1,048,576 values
    assert MAX_NESTED_VALUES < 1024 + 1024 * 1024
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"].append(
        {"key": "wide", "value": wide}
    )
    text = json.dumps(doc, separators=(",", ":")).encode()
    answer = post(server, gzip.compress(text, 1), content_type=JSON, encoding="gzip")
    assert answer.status == 413, answer
    assert f"over the limit of {MAX_NESTED_VALUES} a request" in answer.message, answer.message
    assert "attributes[4].value.arrayValue.values" in answer.message
    settle(server)
    assert stored(server, trace) == (0, 0)


# --- small bodies of costly entries: off the event loop --------------------------------------
# Under OFFLOAD_MIN_BYTES a body was decoded and mapped on the event loop: a tester's bodies of
# ~64 KB, 100-300 ms of CPU each, held /healthz and other projects' requests up to seconds.


def costly_span_events(trace: bytes) -> bytes:
    """The tester's protobuf: 20 spans of 300 span events of 4 empty attributes each (61 KB)."""
    events = ld(11, EMPTY_PAIR * 4) * 300
    return in_one_scope(*(otel_span(trace, n).SerializeToString() + events for n in range(1, 21)))


def costly_json_values(trace: bytes) -> bytes:
    """The tester's JSON: one span whose attribute holds an array of 21,500 empty values."""
    doc = to_json(export(otel_span(trace, 1)))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["attributes"] = [{"key": "wide", "value": {"arrayValue": {"values": [{}] * 21_500}}}]
    return json.dumps(doc, separators=(",", ":")).encode()


def bodies_by_where(server: Running) -> dict[str, float]:
    """watchllm_otel_bodies_total by its `where` label, from /metrics."""
    text = server.client.get("/metrics").text
    pattern = r'^watchllm_otel_bodies_total\{where="(\w+)"\} (\S+)$'
    return {where: float(n) for where, n in re.findall(pattern, text, re.MULTILINE)}


@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_a_small_body_of_costly_entries_is_decoded_off_the_event_loop(
    server: Running, as_json: bool
) -> None:
    """The tester's bodies keep their answers (200; 400: the one span's array is over its
    limit) and are decoded on a worker thread (`server`), not on the event loop (`inline`);
    an SDK's small export stays inline."""
    from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
    from watchllm_ext.otel.receiver import inline_max_bytes

    trace = new_trace()
    body = costly_json_values(trace) if as_json else costly_span_events(trace)
    assert inline_max_bytes(not as_json) <= len(body) < OFFLOAD_MIN_BYTES
    before = bodies_by_where(server)
    answer = post(server, body, content_type=JSON if as_json else PROTOBUF)
    counted = bodies_by_where(server)
    assert (answer.status, answer.rejected_spans) == ((400, -1) if as_json else (200, 0)), answer
    assert counted.get("server", 0) - before.get("server", 0) == 1
    assert counted.get("inline", 0) == before.get("inline", 0)
    small = send(server, good_trace(new_trace()), as_json)
    assert small.status == 200 and small.rejected_spans == 0, small
    assert bodies_by_where(server)["inline"] == counted.get("inline", 0) + 1
    settle(server)
    assert stored(server, trace) == ((0, 0) if as_json else (20, 0))
