"""Reading an ingest request's body: its content type, its size on the wire and decompressed, and
its total and idle time, all bounded (docs/API.md, "Limits")."""

from __future__ import annotations

import asyncio
import math
import weakref
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from ..errors import Problem, echo
from ..settings import Settings
from .admission import BODY_CHARGE, Charge

_ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return  # no header: treat the body as JSON, as most JSON APIs do
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise Problem(
            415,
            "unsupported_media_type",
            f"Content-Type {media or '(empty)'!r} is not supported; send application/json",
            field="Content-Type",
        )
    check_json_charset(parameters)


# UTF-8, its common alias, and ASCII (whose bytes are the same in UTF-8).
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def check_json_charset(parameters: str) -> None:
    """415 for a JSON content type whose parameters (what follows its first ';') name a
    charset other than UTF-8: the body is read as UTF-8, the encoding of JSON exchanged
    between systems (RFC 8259, section 8.1), so UTF-16 or Latin-1 text would be misread."""
    if "=" not in parameters:
        return  # no parameter (the usual case)
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() != "charset":
            continue
        charset = value.strip()
        if len(charset) >= 2 and charset[0] == charset[-1] == '"':
            charset = charset[1:-1]  # a quoted-string (RFC 9110 5.6.6)
        if charset.lower() not in _UTF8_CHARSETS:
            shown = echo(charset)
            raise Problem(
                415,
                "unsupported_media_type",
                f"Content-Type charset {shown!r} is not supported: only UTF-8 JSON is"
                " accepted (RFC 8259); send the body as UTF-8, with charset=utf-8 or no"
                " charset",
                field="Content-Type",
            )


@dataclass(slots=True)
class IngestHeaders:
    """The headers an ingest route reads, found in one pass over the request's: what
    `request.headers.get(name)` gives for each (the first of a repeated header; names are
    lower-case in ASGI), without building a Headers object and scanning it once per name,
    which costs a single event more than its own bookkeeping."""

    authorization: str | None = None
    content_type: str | None = None
    content_length: str | None = None
    content_encoding: str | None = None

    @classmethod
    def of(cls, request: Request) -> IngestHeaders:
        found = cls()
        for name, value in request.scope["headers"]:
            attribute = _INGEST_HEADERS.get(name)
            if attribute is not None and getattr(found, attribute) is None:
                setattr(found, attribute, value.decode("latin-1"))
        return found


_INGEST_HEADERS = {
    b"authorization": "authorization",
    b"content-type": "content_type",
    b"content-length": "content_length",
    b"content-encoding": "content_encoding",
}


async def read_request_body(
    request: Request,
    settings: Settings,
    headers: IngestHeaders | None = None,
    max_bytes: int | None = None,
    tenant: str | None = None,
) -> bytes:
    """A request's body within the settings' limits (size on the wire and decompressed,
    total and idle time): what every ingest route reads, whatever the body's format.
    `headers`: the request's, when the caller has found them already. `max_bytes`: a
    smaller cap for both sizes (a dashboard form, a webhook), timed and budgeted alike.
    `tenant`: the project of the request's key, whose share of the bodies' memory budget
    it is charged to (admission.py); None: the share of requests without a key."""
    head = headers or IngestHeaders.of(request)
    charge: Charge | None = request.scope.get(BODY_CHARGE)
    if charge is not None and tenant is not None:
        charge.for_tenant(tenant)
    return await read_body(
        request.receive,
        content_length=head.content_length,
        content_encoding=head.content_encoding,
        max_bytes=settings.max_body_bytes if max_bytes is None else max_bytes,
        max_decompressed_bytes=(
            settings.max_decompressed_bytes if max_bytes is None else max_bytes
        ),
        timeout_s=settings.body_timeout_s,
        idle_timeout_s=settings.body_idle_timeout_s,
        charge=charge,
    )


async def read_body(
    receive: Callable[[], Awaitable[Mapping[str, Any]]],
    *,
    content_length: str | None,
    content_encoding: str | None,
    max_bytes: int,
    max_decompressed_bytes: int,
    timeout_s: float = float("inf"),
    idle_timeout_s: float = float("inf"),
    charge: Charge | None = None,
) -> bytes:
    """Read the body from the ASGI `receive`, refusing as soon as it passes a limit (on the
    wire or decompressed), or with 408 when it is not complete within `timeout_s` or a piece
    takes over `idle_timeout_s` (a slow client must not hold a connection and its memory for
    ever). The messages are read as Request.stream() reads them (a disconnect raises
    ClientDisconnect), without its async generator: a single event's body is one message.
    `charge`: each piece kept (decompressed, when compressed) is taken from it as it comes
    (admission.py: 503 past the app's budget for bodies in memory)."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in _ENCODINGS and encoding != "identity":
        raise Problem(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none",
            field="Content-Encoding",
        )
    complete_at = -1  # the declared length, once known
    if content_length is not None:
        try:
            declared = complete_at = int(content_length)
        except ValueError:
            raise Problem(
                400, "bad_request", "Content-Length is not a number", field="Content-Length"
            ) from None
        if declared > max_bytes:
            raise _too_large(max_bytes, "body")
    wbits = _ENCODINGS.get(encoding, 0)
    decompressor = zlib.decompressobj(wbits) if wbits else None
    limit = max_decompressed_bytes if decompressor else max_bytes
    received = 0
    members = 1  # gzip members inflated
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    clock = loop.time
    now = clock()
    deadline = now + timeout_s
    # The read's deadline, watched by its loop's one timer (_BodyDeadlines); moved as pieces
    # come. The clock is read once a piece, and not at all once the declared length has come
    # or the last piece is in.
    task = asyncio.current_task(loop)  # with the loop: no second get_running_loop
    assert task is not None  # read_body is awaited inside a task
    read = _Read(task, min(now + idle_timeout_s, deadline))
    watch = _body_deadlines(loop)
    watch.add(read, loop)
    more = True
    try:
        while more:
            message = await receive()
            if message["type"] != "http.request":
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                continue  # not a body message: Request.stream() skips it too
            chunk: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            if not chunk:
                continue
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes, "body")
            if decompressor is None:
                if charge is not None:
                    charge.take(len(chunk))
                parts.append(chunk)
                size += len(chunk)
            else:
                read.deadline = deadline  # inflating is no idle wait
                pending = chunk
                while pending:
                    if decompressor.eof:  # more after a stream's end: gzip's next member?
                        decompressor = _next_member(pending, wbits, encoding)
                        members += 1
                        if members > MAX_GZIP_MEMBERS:
                            raise _too_many_members()
                        if members % _MEMBERS_A_TURN == 0:
                            await asyncio.sleep(0)  # a body of tiny members is work too
                    try:
                        # At most one byte over the limit, so a bomb never expands in memory;
                        # and at most _INFLATE_STEP per call, with the event loop free between.
                        out = decompressor.decompress(pending, min(_INFLATE_STEP, limit - size + 1))
                    except zlib.error as exc:
                        raise Problem(
                            400,
                            "bad_encoding",
                            f"body is not valid {encoding}: {exc}",
                            field="body",
                        ) from None
                    size += len(out)
                    if size > limit:
                        raise _too_large(limit, "decompressed body")
                    if charge is not None:
                        charge.take(len(out))
                    parts.append(out)
                    # What is left: the rest of this stream (the output was capped), or what
                    # came after its end, looked at at once (not after a trickle of more).
                    pending = decompressor.unconsumed_tail
                    if pending:
                        await asyncio.sleep(0)
                    else:
                        pending = decompressor.unused_data
            if more and received != complete_at:  # the idle deadline of the next wait
                read.deadline = min(clock() + idle_timeout_s, deadline)
    except asyncio.CancelledError:
        # Ours (as asyncio.timeout tells its own): the watch cancelled this read and nobody
        # else cancelled the task meanwhile.
        if read.expired and task.uncancel() <= read.cancelling:
            raise _too_slow(timeout_s, idle_timeout_s) from None
        raise
    finally:
        watch.discard(read)
    if decompressor is not None and not decompressor.eof:
        raise Problem(
            400, "bad_encoding", f"body ends before the {encoding} stream does", field="body"
        )
    if size >= _JOIN_OFF_LOOP_BYTES:
        # Joining copies every byte (45 MB inflated: ~30 ms, the event loop stopped meanwhile);
        # bytes.join lets go of the GIL for it, so a thread does it beside the loop.
        return await loop.run_in_executor(None, b"".join, parts)
    return b"".join(parts)


_INFLATE_STEP = 1024 * 1024  # about 1 ms of inflating
_JOIN_OFF_LOOP_BYTES = 4 * 1024 * 1024  # ~2.5 ms of copying, against a thread's ~0.1 ms hop


class _Read:
    """A body being read: its task, its deadline (loop time), and whether the watch has
    cancelled it for being late. `cancelling`: the task's cancel requests at the start, so
    that a cancel from elsewhere is told from the watch's (as asyncio.timeout does)."""

    __slots__ = ("cancelling", "deadline", "expired", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.expired = False
        self.cancelling = task.cancelling()


class _BodyDeadlines:
    """The deadlines of the bodies being read on one event loop, kept by one timer. A timer
    per read (asyncio.timeout) cost a single event more than the rest of its reading (its
    object, a timer handle, a task look-up, about 4 us of 6); here a read is an entry in a
    set. The timer fires at the earliest deadline it was armed for, cancels the reads that
    are due and arms itself for the next. A read's deadline only moves later, so moving it
    needs no new timer: the timer finds it not yet due and re-arms. A timer armed before an
    earlier one is left to fire for nothing (its generation is old): holding its handle to
    cancel it would keep the loop alive through the loop's entry here."""

    __slots__ = ("armed_at", "generation", "reads")

    def __init__(self) -> None:
        self.reads: set[_Read] = set()
        self.armed_at = math.inf
        self.generation = 0

    def add(self, read: _Read, loop: asyncio.AbstractEventLoop) -> None:
        self.reads.add(read)
        if read.deadline < self.armed_at:
            self._arm(read.deadline, loop)

    def discard(self, read: _Read) -> None:
        self.reads.discard(read)  # the timer, if armed, fires once more for nothing

    def _arm(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        self.generation += 1
        self.armed_at = when
        loop.call_at(when, self._check, self.generation)

    def _check(self, generation: int) -> None:
        if generation != self.generation:
            return  # an older timer: a later one is armed
        loop = asyncio.get_running_loop()
        self.armed_at = math.inf
        # A timer may fire a little early (uvloop counts in milliseconds): due within _EARLY_S.
        due = loop.time() + _EARLY_S
        later = math.inf
        for read in list(self.reads):
            if read.deadline <= due:
                self.reads.discard(read)
                read.expired = True
                read.task.cancel()
            elif read.deadline < later:
                later = read.deadline
        if later < math.inf:
            self._arm(later, loop)


_EARLY_S = 0.001
_body_deadlines_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BodyDeadlines] = (
    weakref.WeakKeyDictionary()
)


def _body_deadlines(loop: asyncio.AbstractEventLoop) -> _BodyDeadlines:
    """The loop's watch (one per loop: tests and host apps run several, one a thread)."""
    found = _body_deadlines_by_loop.get(loop)
    if found is None:
        found = _body_deadlines_by_loop[loop] = _BodyDeadlines()
    return found


def _too_slow(timeout_s: float, idle_timeout_s: float) -> Problem:
    # Connection: close, as the rest of the body may still be on its way.
    return Problem(
        408,
        "request_timeout",
        f"body did not arrive in time (the whole body within {timeout_s:g} s, with no pause"
        f" over {idle_timeout_s:g} s); send it faster or in smaller requests",
        field="body",
        headers={"Connection": "close"},
    )


_GZIP_MAGIC = b"\x1f\x8b"
_MEMBERS_A_TURN = 64  # gzip members inflated between two turns of the event loop
# A member costs ~1.6 us to start however small it is: 10 MB of 20-byte empty members took
# 0.8 s of CPU, 40 times what a JSON body of that size costs. Real bodies hold a few.
MAX_GZIP_MEMBERS = 10_000


def _next_member(data: bytes, wbits: int, encoding: str) -> Any:
    """A decompressor for `data`, which came after the end of a gzip member: the next member
    (RFC 1952: a gzip body is one member or more, as `cat a.gz b.gz` or a compressor that
    flushes in members makes it; a member's header may be cut between two reads). Anything
    else after a stream's end (a deflate stream has one) is refused."""
    if wbits == _ENCODINGS["gzip"] and (data[:2] == _GZIP_MAGIC or data == _GZIP_MAGIC[:1]):
        return zlib.decompressobj(wbits)
    raise _after_the_stream(encoding)


def _too_many_members() -> Problem:
    return Problem(
        400,
        "bad_encoding",
        f"the gzip body has more than {MAX_GZIP_MEMBERS} members; compress it as one stream"
        " (or a few)",
        field="body",
    )


def _after_the_stream(encoding: str) -> Problem:
    return Problem(
        400, "bad_encoding", f"there are bytes after the end of the {encoding} stream", field="body"
    )


def _too_large(limit: int, what: str) -> Problem:
    return Problem(
        413, "payload_too_large", f"{what} is larger than the limit of {limit} bytes", field="body"
    )
