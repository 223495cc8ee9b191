"""An OTLP body decoded and mapped in a worker process: `python -m watchllm_ext.otel.worker`.

Why a process: decoding a span (protobuf reads) and mapping it (rows, events) is pure Python,
about 30 us a span, and under the GIL it was half of what the server's one core for Python
could do. Here it runs on another core. The worker does only what needs no plugin and keeps
no state: parse the body, check each span, map it, and hand back the rows as the spool keeps
them and the events as JSON. The server validates the events, runs the plugin hooks, spools
and answers (ingest.ingest_mapped): nothing is accepted until the server has spooled it, so a
worker that dies loses nothing (the server does that body's work itself: pool.py).

Its argument is the server's pid. On stdin and stdout, frames: a 4-byte big-endian length,
then msgpack. A request is (body, protobuf, project id, receipt time in ms, the most spans a
request may hold); the answer a `MappedBody`. A frame that starts with events_worker.JOB_MARK
is a body of events instead, validated and encoded for the spool (events_worker.py): the same
processes serve both.
One byte b"R" on stdout says the worker is ready (its imports done). The worker ends when
stdin closes (the server stopped or died), or when the server is no longer its parent (it
died while this was busy).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

import msgspec

from ..errors import Problem
from ..ingest.worker import JOB_MARK, answer_job
from ..serving.tuning import tune_for_serving
from .decode import DEFAULT_MAX_SPANS, parse_json, parse_protobuf, spans_of
from .frames import body_first, read_frame, write_frame
from .mapped import map_spans
from .rows import encode_rows

READY = b"R"
PARENT_CHECK_S = 1.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MappedBody(msgspec.Struct, array_like=True):
    """What a body became (ingest.MappedSpans, with the rows and events as JSON), or why not.

    `problem`: the body does not decode (status, code, message, field: a Problem to answer);
    `crash`: the worker failed in an unexpected way (the server does the work itself)."""

    spans: int = 0  # spans decoded (each costs a unit of quota, as in-process)
    decode_rejected: int = 0  # spans refused by the decoder (rejected: and by the mapping)
    rows: bytes = b"[]"  # JSON array of SpanRow, the spool's form
    n_rows: int = 0
    events: bytes = b"[]"  # JSON array of the LLM spans' events
    event_rows: list[int] = []
    names: list[str] = []
    unmapped: dict[str, int] = {}
    rejected: int = 0
    problems: list[str] = []
    problem: tuple[int, str, str, str | None] | None = None
    crash: str | None = None


Request = tuple[bytes, bool, str, int, int]

_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(Request).decode
_encode_events = msgspec.json.Encoder().encode
decode_answer = msgspec.msgpack.Decoder(MappedBody).decode


def encode_request(
    body: bytes,
    protobuf: bool,
    project: str,
    received: datetime,
    max_spans: int = DEFAULT_MAX_SPANS,
) -> list[bytes]:
    """A body for map_body, as a frame's parts (the body not copied: body_first)."""
    received_ms = (received - _EPOCH) // timedelta(milliseconds=1)
    return body_first(_encode((b"", protobuf, project, received_ms, max_spans)), body)


def map_body(
    body: bytes,
    protobuf: bool,
    project: str,
    received_ms: int,
    max_spans: int = DEFAULT_MAX_SPANS,
) -> MappedBody:
    """Decode and map one body (the receiver's in-process steps, minus validation and hooks).
    A body over the span limit (`max_spans`, the server's max_batch_events) or another bound
    on its structure is refused before its spans are read (decode.check_request)."""
    try:
        request = parse_protobuf(body, max_spans) if protobuf else parse_json(body, max_spans)
        decoded = spans_of(request)
    except Problem as problem:
        return MappedBody(problem=(problem.status, problem.code, problem.message, problem.field))
    received = _EPOCH + timedelta(milliseconds=received_ms)
    mapped = map_spans(decoded.spans, project, received, decoded.rejected, decoded.problems)
    return MappedBody(
        spans=len(decoded.spans),
        decode_rejected=decoded.rejected,
        rows=encode_rows(mapped.rows),
        n_rows=len(mapped.rows),
        events=_encode_events(mapped.events),
        event_rows=mapped.event_rows,
        names=mapped.names,
        unmapped=dict(mapped.unmapped),
        rejected=mapped.rejected,
        problems=mapped.problems,
    )


def _end_with(server: int) -> None:
    """End this worker once the server is gone, even in the middle of a body (stdin's end
    is seen only between bodies; a server killed by a signal runs no clean-up)."""
    while os.getppid() == server:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def serve(stdin: BinaryIO, stdout: BinaryIO, server: int | None = None) -> None:
    """Answer frames until stdin ends, or the process `server` (the parent's pid, given by
    the server itself: it may be gone before this starts) is no longer the parent."""
    tune_for_serving()  # as the server: start-up objects out of the collector's scans
    parent = os.getppid() if server is None else server
    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()
    stdout.write(READY)
    stdout.flush()
    while (data := read_frame(stdin)) is not None:
        if data.startswith(JOB_MARK):  # an events body (events_worker.py)
            write_frame(stdout, answer_job(data))
            stdout.flush()
            continue
        try:
            answer = map_body(*_decode_request(data))
        except Exception:  # a bug, not the body's fault: the server redoes it and logs it
            answer = MappedBody(crash=traceback.format_exc(limit=20))
        write_frame(stdout, _encode(answer))
        stdout.flush()


if __name__ == "__main__":
    # The server went away (killed mid-frame, even: EOFError): nothing to say of it in the
    # log the worker shares with the server, whose own end is what the reader should see.
    with contextlib.suppress(BrokenPipeError, EOFError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]) if sys.argv[1:] else None)
