"""The OTLP/HTTP trace receiver: `POST /v1/traces` (and `/api/public/otel/v1/traces`, the path
Langfuse-style clients are configured with).

Answers as the OTLP/HTTP spec says, in the request's encoding (protobuf or JSON):

- 200 with an `ExportTraceServiceResponse`; `partial_success` (rejected_spans and a message
  naming the first problems) when some spans were refused;
- otherwise a `google.rpc.Status` (code and message) with the HTTP status: 400 for a body
  that does not decode, holds too many resource or scope entries, or whose spans are all
  invalid, 401/403 for the key, 408/413/415 for the body (413 also for more spans,
  attributes, events and links than a request may hold: decode.py), 429 (quota, with
  Retry-After and the rate-limit headers) and 503 with Retry-After when the spool is full:
  OpenTelemetry's exporters retry 429/502/503/504 with backoff, so overload is pushed back,
  never accepted and dropped.

The key comes as `Authorization: Bearer KEY` (what `OTEL_EXPORTER_OTLP_HEADERS=
Authorization=Bearer%20KEY` sends) or Basic with the key as password (Langfuse-style clients
send `public:secret`); it needs the `ingest` scope and its project owns every span.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from ..auth import Principal, bearer_token
from ..errors import Problem, render_problems_at, unauthorized
from ..hookspecs import hookimpl
from ..ingest.admission import one_wait_budget
from ..ingest.body import check_json_charset, read_request_body
from ..ingest.fill_in import receipt_time
from ..ingest.validate import OFFLOAD_MIN_BYTES
from ..observability.metrics import ops_metrics
from ..openapi import described
from ..route_params import refuse_query
from ..settings import Settings
from .decode import Decoded, parse_json, parse_protobuf, spans_of
from .ingest import ingest_mapped, ingest_spans, on_cpu_place
from .pool import CALL_S_PER_MB_JSON, map_in_worker
from .worker import decode_answer, encode_request

log = logging.getLogger("watchllm.otel")

PATHS = ("/v1/traces", "/api/public/otel/v1/traces")
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_PROTOBUF_TYPES = {PROTOBUF, "application/protobuf", "application/vnd.google.protobuf"}

# Bodies decoded and mapped on the event loop: only those under these sizes (after
# decompression); bigger ones on a worker thread, or in a worker process from
# OFFLOAD_MIN_BYTES. A body's CPU goes by its entries (spans, attributes, span events,
# values), which take 2-3 bytes each at the least: empty span events (or empty attributes of
# span events) measured ~2.3 ms a KiB of protobuf and ~4.7 ms a KiB of JSON (`{}`), an SDK's
# spans ~0.15 and ~0.35. So at most ~5 ms on the loop; an SDK's single span (1.2-1.7 KB of
# protobuf) stays there; a bigger body pays ~0.2 ms a trip to the thread.
INLINE_PROTOBUF_BYTES = 2 * 1024
INLINE_JSON_BYTES = 1024

# HTTP status -> google.rpc.Code, for the Status message of a failure.
_RPC_CODES = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND
    408: 4,  # DEADLINE_EXCEEDED
    413: 8,  # RESOURCE_EXHAUSTED
    415: 3,
    429: 8,
    503: 14,  # UNAVAILABLE
}


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    """A built-in plugin: the routes come through the hook a third party's would use
    (`disable_plugins = ["watchllm_ext.otel.receiver"]` turns the receiver off)."""
    return routes()


def routes() -> list[BaseRoute]:
    endpoint = described(receive_traces, _operations())
    # A refusal before the route runs (two Authorization headers) is an OTLP answer too.
    render_problems_at(PATHS, _failure_for)
    return [Route(path, endpoint, methods=["POST"]) for path in PATHS]


def _operations() -> dict[str, Any]:
    """The receiver in /openapi.json: bodies and answers are OTLP's protobuf messages, or
    their JSON form (docs/OPENTELEMETRY.md)."""
    status = {
        "type": "object",
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
    }
    both = {
        "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"type": "object"}},
    }
    failure = {
        "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": status},
    }
    texts = {
        400: "undecodable body, more resourceSpans or scopeSpans entries than a request may"
        " hold, or every span invalid (google.rpc.Status)",
        401: "missing or unknown API key",
        403: "the key has no ingest scope",
        408: "the body did not arrive in time",
        413: "body, spans, attributes, span events and links or values over a request's limit",
        415: "unsupported content type or encoding",
        429: "quota exceeded; retry after Retry-After",
        503: "spool full or not running; retry after Retry-After",
    }
    operation = {
        "post": {
            "summary": "Receive OpenTelemetry spans (OTLP/HTTP ExportTraceServiceRequest)",
            "security": [{"bearer": []}, {"basic": []}],
            "requestBody": {"required": True, "content": both},
            "responses": {
                "200": {
                    "description": "ExportTraceServiceResponse; partial_success names rejected"
                    " spans",
                    "content": both,
                },
                **{str(c): {"description": t, "content": failure} for c, t in texts.items()},
            },
        }
    }
    return operation


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def receive_traces(request: Request) -> Response:
    wl = request.app.state.watchllm
    content_type = request.headers.get("content-type")
    media = _media(content_type)
    protobuf = media in _PROTOBUF_TYPES
    try:
        # The key first, as on the events routes: 401/403 before anything about the request
        # is judged (its content type, its body's size).
        principal = _principal(wl, request)
        refuse_query(request)
        if not protobuf and media != JSON:
            raise Problem(
                415,
                "unsupported_media_type",
                f"Content-Type {media or '(none)'!r} is not supported; send {PROTOBUF} or {JSON}"
                " (OTLP/HTTP)",
                field="Content-Type",
            )
        if not protobuf:
            check_json_charset((content_type or "").partition(";")[2])  # UTF-8 JSON only
        body = await read_request_body(request, wl.settings, tenant=principal.project_id)
        # A worker's place, then the server's to decode and to validate: waited for in all
        # at most ingest_queue_timeout_s (admission.py), within an exporter's timeout.
        with one_wait_budget(wl.settings.ingest_queue_timeout_s):
            result = await _ingest(wl, principal, body, protobuf)
        if result["rejected_spans"] and not result["accepted_spans"]:
            raise _all_rejected(result["rejected_spans"], result["errors"])
    except Problem as problem:
        if 400 <= problem.status < 500:
            ops_metrics(wl).rejections.labels(problem.code).inc()
        return _failure(problem, protobuf)
    partial = ExportTracePartialSuccess()
    if result["rejected_spans"]:
        partial.rejected_spans = result["rejected_spans"]
        partial.error_message = _summary(result)
    return _answer(200, ExportTraceServiceResponse(partial_success=partial), protobuf)


async def _ingest(wl: Any, principal: Principal, body: bytes, protobuf: bool) -> dict[str, Any]:
    max_spans = wl.settings.max_batch_events  # checked right after parsing (decode.py)
    if len(body) >= OFFLOAD_MIN_BYTES and wl.settings.otel_worker_processes:
        answer = await _ingest_in_worker(wl, principal, body, protobuf, max_spans)
        if answer is not None:
            return answer
    inline = len(body) < inline_max_bytes(protobuf)
    ops_metrics(wl).otel_bodies.labels("inline" if inline else "server").inc()
    # Off the event loop unless small, in its one place for this work (503 when none comes in
    # time: every worker busy and the server's own place taken is overload).
    decoded = (
        _decode(body, protobuf, max_spans)
        if inline
        else await on_cpu_place(wl, _decode, body, protobuf, max_spans)
    )
    return await ingest_spans(
        wl,
        principal,
        decoded.spans,
        rejected=decoded.rejected,
        problems=decoded.problems,
        off_loop=not inline,
    )


def inline_max_bytes(protobuf: bool) -> int:
    """Bodies under this size are decoded and mapped on the event loop."""
    return INLINE_PROTOBUF_BYTES if protobuf else INLINE_JSON_BYTES


async def _ingest_in_worker(
    wl: Any, principal: Principal, body: bytes, protobuf: bool, max_spans: int
) -> dict[str, Any] | None:
    """Decoded and mapped in a worker process (pool.py), on another core than this one. None
    when no worker did it (none ready in time, or the one called failed): then done here."""
    received = receipt_time()
    request = encode_request(body, protobuf, principal.project_id, received, max_spans)
    per_mb_s = None if protobuf else CALL_S_PER_MB_JSON  # JSON's decoding costs more a MB
    processes = wl.settings.otel_worker_processes
    mapped = await map_in_worker(request, processes, decode_answer, per_mb_s)
    if mapped is None:
        return None
    if mapped.crash is not None:
        log.error("an OTLP worker process failed on a body; done here:\n%s", mapped.crash)
        return None
    ops_metrics(wl).otel_bodies.labels("worker").inc()
    if mapped.problem is not None:
        status, code, message, field = mapped.problem
        raise Problem(status, code, message, field=field)
    return await ingest_mapped(wl, principal, mapped, received)


def _decode(body: bytes, protobuf: bool, max_spans: int) -> Decoded:
    # The body's structure is bounded right after parsing (decode.check_request): a small
    # body of millions of empty entries is refused before they are walked, and a body over
    # the span limit before its spans are read.
    request = parse_protobuf(body, max_spans) if protobuf else parse_json(body, max_spans)
    return spans_of(request)


def _all_rejected(n: int, problems: list[str]) -> Problem:
    listed = "; ".join(problems)
    return Problem(
        400,
        "invalid_spans",
        f"all {n} spans were rejected: {listed}",
        field="resourceSpans",
    )


def _summary(result: dict[str, Any]) -> str:
    problems = result["errors"]
    more = result["rejected_spans"] - len(problems)
    text = "; ".join(problems)
    if more > 0:
        text += f"; and {more} more"
    return f"{result['rejected_spans']} spans rejected: {text}"


def _principal(wl: Any, request: Request) -> Principal:
    header = request.headers.get("authorization")
    token = bearer_token(header)
    if token is None and header and header[:6].lower() == "basic ":
        token = _basic_password(header[6:].strip())
    if token is None:
        raise unauthorized(
            "send your API key as 'Authorization: Bearer <key>' (OTEL_EXPORTER_OTLP_HEADERS="
            "Authorization=Bearer%20<key>) or as the password of Basic auth"
        )
    return wl.principal_for(token, "ingest", request)


def _basic_password(encoded: str) -> str | None:
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Problem(
            401,
            "unauthorized",
            "the Basic credentials are not base64 of 'user:password'",
            field="Authorization",
            headers={"WWW-Authenticate": 'Basic realm="watchllm"'},
        ) from None
    return password or user or None


def _failure(problem: Problem, protobuf: bool) -> Response:
    message = problem.message
    if problem.field and problem.field not in message:
        message = f"{problem.field}: {message}"
    status = status_pb2.Status(code=_RPC_CODES.get(problem.status, 2), message=message)
    return _answer(problem.status, status, protobuf, problem.headers)


def _failure_for(scope: Scope, problem: Problem) -> Response:
    content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    return _failure(problem, _media(content_type.decode("latin-1")) in _PROTOBUF_TYPES)


def _answer(status: int, message: Any, protobuf: bool, headers: dict | None = None) -> Response:
    if protobuf:
        return Response(
            message.SerializeToString(), status_code=status, media_type=PROTOBUF, headers=headers
        )
    # Compact, as every other answer of the API (MessageToJson puts a space after each
    # colon and comma).
    body = json.dumps(json_format.MessageToDict(message), separators=(",", ":"))
    return Response(body, status_code=status, media_type=JSON, headers=headers)
