"""From an HTTP body to validated, transformed events: read (bounded), decompress (bounded),
parse, check the project, validate, run the validator and transform hooks.

Valid bodies take the fast path: msgspec structs derived from the contract (fast_validate.py),
carried as they are to the spool and the sinks. Anything off or unusual goes to pydantic
(validate_items), whose per-field answers are the API's; the events it accepts are turned
into the same structs. Plugins that implement validate_event or transform_events get
pydantic models, as documented (only then: the built-ins work on the structs).

Nothing here knows about sinks or storage: the result goes to `writer.submit`.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import secrets
import threading
import time
import types
import weakref
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pluggy
from pydantic import ValidationError
from pydantic_core import from_json
from starlette.requests import ClientDisconnect, Request

from . import fast_validate
from .admission import BODY_CHARGE, Charge
from .auth import Principal
from .errors import Problem
from .plugins import call_hook
from .schema import EVENT_ADAPTER, EVENT_LIST_ADAPTER, EVENT_TYPES, ID_FIELD_PATTERN
from .settings import Settings

# Bounds of a rejection answer (docs/API.md): fields listed per rejected event, and rejected
# events listed per answer (`rejected_count` has them all).
MAX_ERRORS_PER_EVENT = 20
MAX_REJECTIONS_LISTED = 1_000

_ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
# Labels pydantic puts in an error path for the branch of a union, not a field name.
_BRANCH_LABELS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}

# Bodies at least this big are validated and encoded on a worker thread (app.py): a thread hop
# costs about 80 us, while 64 KiB of events take about 3 ms of validation.
OFFLOAD_MIN_BYTES = 64 * 1024
# ... but only valid events: a body the fast validator declines gets pydantic's per-event
# answer, up to ~10x the cost (64 KB of invalid events: 25-48 ms). From this size on, that
# answer is built on a worker thread too (app.py), so the event loop never waits ~3 ms for it.
DETAILED_OFFLOAD_MIN_BYTES = 4 * 1024
# pydantic-core holds the GIL for a whole call, so a worker thread only lets the event loop
# run between calls: big bodies are validated in slices of about this many bytes (~5 ms each)
# or events, never in one call of hundreds of milliseconds.
SLICE_BYTES = 128 * 1024
SLICE_EVENTS = 256
_WS = rb"[ \t\n\r]*"  # JSON's whitespace only (\s would also take \x0b and \x0c)
_BATCH_HEAD = re.compile(rb"\A" + _WS + rb"\{" + _WS + rb'"events"' + _WS + rb":" + _WS + rb"\[")
_BATCH_TAIL = re.compile(rb"\]" + _WS + rb"\}" + _WS + rb"\Z")
_LIST_HEAD = re.compile(rb"\A" + _WS + rb"\[")
_LIST_TAIL = re.compile(rb"\]" + _WS + rb"\Z")
_BETWEEN = re.compile(rb"\}" + _WS + rb"," + _WS + rb"\{")


@dataclass(slots=True)
class Rejection:
    index: int
    errors: list[dict[str, str]]
    event_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "errors": self.errors}
        if self.event_id is not None:
            out["event_id"] = self.event_id
        return out


@dataclass(slots=True)
class Outcome:
    accepted: list[Any] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    # The accepted events' spool encoding when it was made on the way (from pydantic models,
    # or with the fill-in on a worker thread: app._finish_and_encode).
    payload: bytes | None = None


# --- reading the body -------------------------------------------------------------------------


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
            shown = charset if len(charset) <= 64 else charset[:64] + "..."
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
) -> bytes:
    """A request's body within the settings' limits (size on the wire and decompressed,
    total and idle time): what every ingest route reads, whatever the body's format.
    `headers`: the request's, when the caller has found them already. `max_bytes`: a
    smaller cap for both sizes (a dashboard form, a webhook), timed and budgeted alike."""
    head = headers or IngestHeaders.of(request)
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
        charge=request.scope.get(BODY_CHARGE),
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
    decompressor = zlib.decompressobj(_ENCODINGS[encoding]) if encoding in _ENCODINGS else None
    limit = max_decompressed_bytes if decompressor else max_bytes
    received = 0
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
                    pending = decompressor.unconsumed_tail
                    if pending:
                        await asyncio.sleep(0)
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
    if decompressor is not None and decompressor.unused_data:
        raise Problem(
            400,
            "bad_encoding",
            f"there are bytes after the end of the {encoding} stream",
            field="body",
        )
    if decompressor is not None and not decompressor.eof:
        raise Problem(
            400, "bad_encoding", f"body ends before the {encoding} stream does", field="body"
        )
    return b"".join(parts)


_INFLATE_STEP = 1024 * 1024  # about 1 ms of inflating


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


def _too_large(limit: int, what: str) -> Problem:
    return Problem(
        413, "payload_too_large", f"{what} is larger than the limit of {limit} bytes", field="body"
    )


# The deepest nesting of arrays and objects pydantic-core's parser takes, whatever is inside
# the innermost (tests/test_bad_input.py sends this depth and one more).
MAX_JSON_DEPTH = 200


def parse_json(body: bytes) -> Any:
    """The body's JSON value (see parse_events_json)."""
    return parse_events_json(body)[0]


def parse_events_json(body: bytes) -> tuple[Any, bool]:
    """The body's JSON value, and whether it held an integer literal longer than the parser
    reads (4,300 characters): each is a TooLongInt in the value (validate_items with
    `too_long` refuses it where it is). 400 for a body that is not JSON."""
    if not body.strip():
        raise Problem(400, "malformed_json", "the body is empty; send a JSON value", field="body")
    try:
        return from_json(body, allow_inf_nan=False), False
    except ValueError as exc:
        if str(exc).startswith(_OUT_OF_RANGE):
            return _parse_long_numbers(body, exc), True
        raise _not_json(exc) from None


def _not_json(exc: ValueError) -> Problem:
    # pydantic-core's message carries the position: "... at line 1 column 17".
    text = str(exc)
    if text.startswith("recursion limit exceeded"):
        # Valid JSON, only deeper than the parser goes: say so, not "invalid" (docs/API.md).
        where = text.removeprefix("recursion limit exceeded").strip()
        return Problem(
            400,
            "malformed_json",
            f"the JSON nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
            f" ({where}); send it less deeply nested",
            field="body",
        )
    return Problem(400, "malformed_json", f"invalid JSON: {exc}", field="body")


# --- numbers longer than the parser reads ----------------------------------------------------
#
# pydantic-core's parser reads an integer literal of at most 4,300 characters (Python's
# int_max_str_digits), and fails the whole body with "number out of range" past that, also for
# a number whose integer part is that long (1000...0.5). Such a number is valid JSON, only out
# of the range of every number field: it gets the answer a 4,300-digit one gets, a 422 naming
# its field (docs/EVENTS.md), not a 400 for the whole body. The body is parsed again with each
# such literal replaced by one of the same length (a placeholder padded with spaces, so the
# position of any other error is the same): an integer by a marker turned into a TooLongInt,
# a float by its value (what the parser would have read: infinity, mostly).

_OUT_OF_RANGE = "number out of range"
# A string (skipped whole: possessive, so a long one costs one pass), or a number literal
# whose integer part has 4,300 digits or more, not inside another token.
_LONG_NUMBER = re.compile(
    rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
    rb"|(?<![0-9A-Za-z_.+\-])-?[0-9]{4300,}(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![0-9A-Za-z_.+\-])",
    re.DOTALL,
)


class TooLongInt(int):
    """An integer literal longer than the parser reads, as +-10**4300: over the range of every
    integer field, and not a number a float field takes, as the literal itself would be."""


_TOO_LONG = TooLongInt(10**4300)
_TOO_LONG_NEGATIVE = TooLongInt(-(10**4300))


def _parse_long_numbers(body: bytes, exc: ValueError) -> Any:
    marker = f"0.{secrets.randbits(52) | 1:016d}".encode()  # a float no client can foresee
    value_of = {float(marker): _TOO_LONG, -float(marker): _TOO_LONG_NEGATIVE}
    pieces: list[bytes] = []
    done = replaced = 0
    for found in _LONG_NUMBER.finditer(body):
        token = found.group()
        if token[:1] == b'"':
            continue
        try:
            from_json(token)
            continue  # read as it is (4,300 digits exactly)
        except ValueError as error:
            if not str(error).startswith(_OUT_OF_RANGE):
                continue
        if token.lstrip(b"-").isdigit():
            literal = b"-" + marker if token[:1] == b"-" else marker
            replaced += 1
        else:
            number = float(token)  # no length limit for floats: correctly rounded
            if math.isfinite(number):
                literal = repr(number).encode()
            else:
                literal = b"-1e999" if number < 0 else b"1e999"  # how the parser reads 1e999
        pieces += (body[done : found.start()], literal, b" " * (len(token) - len(literal)))
        done = found.end()
    if not pieces:
        raise _not_json(exc) from None
    pieces.append(body[done:])
    try:
        holder = [from_json(b"".join(pieces), allow_inf_nan=False)]
    except ValueError as again:
        raise _not_json(again) from None  # the body's first other error, at its position
    if replaced and _restore(holder, value_of) != replaced:
        raise _not_json(exc) from None  # a marker not found where it was put: as before
    return holder[0]


def _restore(value: Any, value_of: dict[float, TooLongInt]) -> int:
    """Put the TooLongInts in place of their markers (in place); how many."""
    count = 0
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return 0
    for key, item in items:
        if type(item) is float:
            found = value_of.get(item)
            if found is not None:
                value[key] = found
                count += 1
        elif isinstance(item, dict | list):
            count += _restore(item, value_of)
    return count


def _holds_too_long(value: Any) -> bool:
    if isinstance(value, TooLongInt):
        return True
    if isinstance(value, dict):
        return any(_holds_too_long(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_too_long(v) for v in value)
    return False


def _too_long_as_infinity(value: Any) -> Any:
    """A copy of `value` with each TooLongInt as the infinity of its sign."""
    if isinstance(value, TooLongInt):
        return math.inf if value > 0 else -math.inf
    if isinstance(value, dict):
        return {k: _too_long_as_infinity(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_too_long_as_infinity(v) for v in value]
    return value


# --- what the server fills in --------------------------------------------------------------------

_uuid7_lock = threading.Lock()  # ingest runs on the event loop and on worker threads
_uuid7_last = [0, 0]  # [unix ms, 42-bit counter] of the last id
_COUNTER_BITS = 42  # rand_a (12 bits) and the top 30 bits of rand_b: RFC 9562 6.2, method 1
_getrandbits = random.getrandbits  # the module's generator is reseeded after a fork


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) in its canonical text form: 48 bits of Unix milliseconds, then a
    counter that starts at a random value each millisecond and counts up within it, then 32
    random bits. Ids from one process sort by creation time, and those of one millisecond
    by creation order (a clock that steps back keeps the last millisecond)."""
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _uuid7_last
        if ms > last_ms:
            last_ms, counter = ms, _getrandbits(_COUNTER_BITS - 1)  # half the room to count
        else:
            counter += 1
            if counter >> _COUNTER_BITS:  # 2**41 ids in one millisecond: borrow the next
                last_ms, counter = last_ms + 1, _getrandbits(_COUNTER_BITS - 1)
        _uuid7_last[0], _uuid7_last[1] = last_ms, counter
    value = (
        (last_ms << 80)
        | (0x7 << 76)  # version
        | ((counter >> 30) << 64)  # rand_a: the counter's top 12 bits
        | (0b10 << 62)  # variant
        | ((counter & 0x3FFF_FFFF) << 32)
        | _getrandbits(32)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def receipt_time() -> datetime:
    """Now, at the millisecond (what the store keeps): the timestamp given to every event of
    one request that has none."""
    # The epoch plus a timedelta: the same datetime as fromtimestamp().replace(), in half
    # the time (it is made for every request).
    return _EPOCH + timedelta(milliseconds=time.time_ns() // 1_000_000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- validating ---------------------------------------------------------------------------------


def _is_branch_label(item: int | str) -> bool:
    return isinstance(item, str) and (
        item in _BRANCH_LABELS or "[" in item or item.startswith(("function-", "constrained-"))
    )


def field_path(loc: tuple[int | str, ...]) -> str:
    """('tool_calls', 0, 'tool_name') -> 'tool_calls[0].tool_name'."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 0 and item in EVENT_TYPES:
            continue  # the discriminator tag pydantic puts first
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if _is_branch_label(item):
            continue
        parts.append(f".{item}" if parts else item)
    return "".join(parts) or "(event)"


def _relevant(errors: list[Any]) -> list[Any]:
    """Drop a union branch's "wrong type" error when another branch of the same union got
    further: for a chat-message prompt with a bad role, "prompt should be a string" is noise.
    """

    def split(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], int] | None:
        for k, item in enumerate(loc):
            if k > 0 and _is_branch_label(item):
                return loc[:k], len(loc) - k - 1  # (union point, depth inside the branch)
        return None

    further: set[tuple[int | str, ...]] = set()
    for err in errors:
        found = split(tuple(err["loc"]))
        if found and (found[1] > 0 or not err["type"].endswith("_type")):
            further.add(found[0])
    kept = []
    for err in errors:
        found = split(tuple(err["loc"]))
        at_top_wrong_type = found and found[1] == 0 and err["type"].endswith("_type")
        if at_top_wrong_type and found[0] in further:
            continue
        kept.append(err)
    return kept


def _readable(err: Any) -> str:
    """pydantic's message, with datetimes in its context shown as RFC 3339, not repr(); an
    id's pattern said in words."""
    pattern = err.get("ctx", {}).get("pattern")
    if err["type"] == "string_pattern_mismatch" and pattern == ID_FIELD_PATTERN:
        return _ID_RULE
    return _DATETIME_REPR.sub(_iso_of_repr, err["msg"])


_ID_RULE = "an id is letters, digits and _ . : - (not dots alone)"


_DATETIME_REPR = re.compile(r"datetime\.datetime\((\d+), (\d+), (\d+)[^)]*\)\)?")


def _iso_of_repr(match: re.Match[str]) -> str:
    year, month, day = (int(g) for g in match.groups())
    return f"{year:04d}-{month:02d}-{day:02d}T00:00:00Z"


def describe_errors(exc: ValidationError) -> list[dict[str, str]]:
    seen: dict[str, list[str]] = {}
    for err in _relevant(exc.errors(include_url=False)):
        path = field_path(tuple(err["loc"]))
        message = _readable(err)
        if err["type"] == "union_tag_invalid":
            path = "event_type"
        elif err["type"] == "union_tag_not_found":
            path = "event_type"
            message = f"event_type is required; one of: {', '.join(EVENT_TYPES)}"
        messages = seen.setdefault(path, [])
        if message not in messages:
            messages.append(message)
    found = [{"field": path, "message": " or ".join(msgs)} for path, msgs in seen.items()]
    if len(found) > MAX_ERRORS_PER_EVENT:
        # An event with thousands of unknown keys must not make a huge answer: the first
        # fields, then a count (docs/API.md).
        more = len(found) - MAX_ERRORS_PER_EVENT
        found = found[:MAX_ERRORS_PER_EVENT]
        found.append({"field": "(event)", "message": f"and {more} more fields with errors"})
    return found


def check_projects(items: list[Any], principal: Principal, at: str = "") -> None:
    """A body that names another project than the key's is refused whole (403). `at`: where
    the events are in the body, for the field path (`events` in a batch: events[1].project_id;
    nothing for an array or an event alone: [1].project_id)."""
    for index, item in enumerate(items):
        if isinstance(item, dict):
            project = item.get("project_id")
            # A non-string project_id is a schema error (422), reported by validation.
            if isinstance(project, str) and project != principal.project_id:
                raise _wrong_project(index, project, principal, at)


def _wrong_project(index: int, project: Any, principal: Principal, at: str) -> Problem:
    return Problem(
        403,
        "forbidden",
        f"event {index} names project {project!r} but the key belongs to project "
        f"{principal.project_id!r}",
        field=f"{at}[{index}].project_id",
    )


def events_at(shape: Literal["batch", "events"]) -> str:
    """Where a body of this shape holds its events (check_projects' `at`)."""
    return "events" if shape == "batch" else ""


def validate_fast(body: bytes, shape: Literal["batch", "events"]) -> list[Any] | None:
    """The all-valid fast path: one msgspec pass over the raw bytes into event structs
    (fast_validate.py). None when anything is off or unusual; the slow path then finds and
    reports it (or accepts what msgspec hands over)."""
    return fast_validate.validate_fast(body, shape)


def validate_sliced(body: bytes, shape: Literal["batch", "events"]) -> list[Any] | None:
    """`validate_fast` for big bodies, in slices of about SLICE_BYTES: the events array is cut
    between two events (at `},{`), each piece validated as a JSON array of its own. A cut that
    falls inside a string or a nested value leaves the piece before it unterminated, so that
    piece fails and the answer is None, as for anything else that is off: the caller then
    takes the whole-body path, which finds and reports it. Same events as `validate_fast`."""
    head, tail = (_BATCH_HEAD, _BATCH_TAIL) if shape == "batch" else (_LIST_HEAD, _LIST_TAIL)
    opened = head.match(body)
    closed = tail.search(body, max(0, len(body) - 4096))
    if opened is None or closed is None or closed.start() < opened.end():
        return validate_fast(body, shape)  # one event object, or an unusual layout
    start, end = opened.end(), closed.start()
    events: list[Any] = []
    view = memoryview(body)  # each piece copied once, in the join (slice and `+` copied thrice)
    while start < end:
        cut = _BETWEEN.search(body, min(start + SLICE_BYTES, end), end)
        stop = cut.start() + 1 if cut else end
        piece = fast_validate.validate_list(b"".join((b"[", view[start:stop], b"]")))
        if piece is None:
            return None
        events.extend(piece)
        start = cut.end() - 1 if cut else end
    return events or None


def finish_fast(
    events: list[Any],
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None = None,
    at: str = "",
) -> Outcome:
    """Project check, fill-in, plugin validators and transforms for fast-path events. `at`:
    where the events are in the body (check_projects)."""
    project = principal.project_id
    if pm.hook.validate_event.get_hookimpls() or _third_party(
        pm.hook.transform_events.get_hookimpls()
    ):
        for index, event in enumerate(events):
            if event.project_id is not None and event.project_id != project:
                raise _wrong_project(index, event.project_id, principal, at)
        return _finish(list(enumerate(events)), Outcome(), principal, pm, received_at)
    # Only built-ins see them (the usual case): _finish's fill-in in one pass over the structs,
    # with the project check (a 403 leaves the structs to be dropped), every one accepted.
    received = received_at or receipt_time()
    for index, event in enumerate(events):
        if event.project_id is not None and event.project_id != project:
            raise _wrong_project(index, event.project_id, principal, at)
        event.project_id = project
        if event.event_id is None:
            event.event_id = uuid7()
        if event.timestamp is None:
            event.timestamp = received
    call_hook(pm.hook.transform_events, events=events, principal=principal)
    return Outcome(accepted=events)


def validate_items(
    items: list[Any],
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None = None,
    too_long: bool = False,
) -> Outcome:
    """The slow path, over parsed JSON: every event validated on its own, so each rejected
    one is reported with its index and fields while the valid ones are accepted.
    `too_long`: the items may hold TooLongInts (parse_events_json)."""
    outcome = Outcome()
    indexed: list[tuple[int, Any]] = []
    # In slices (see SLICE_EVENTS); a slice with a bad event is validated event by event, and
    # so is one that was valid with a TooLongInt in it (where any JSON is taken: see below).
    for first in range(0, len(items), SLICE_EVENTS):
        part = items[first : first + SLICE_EVENTS]
        try:
            events = EVENT_LIST_ADAPTER.validate_python(part)
            if not (too_long and _holds_too_long(part)):
                indexed.extend(enumerate(events, first))
                continue
        except ValidationError:
            pass
        for index, item in enumerate(part, first):
            if not isinstance(item, dict):
                outcome.rejected.append(
                    Rejection(index, [{"field": "(event)", "message": "must be a JSON object"}])
                )
                continue
            try:
                event = EVENT_ADAPTER.validate_python(item)
                if too_long and _holds_too_long(item):
                    # Taken where any JSON is (metadata, tool_input, ...), where a number must
                    # still be finite: refused there as 1e999 is (422 naming the field).
                    event = EVENT_ADAPTER.validate_python(_too_long_as_infinity(item))
                indexed.append((index, event))
            except ValidationError as exc:
                event_id = item.get("event_id")
                outcome.rejected.append(
                    Rejection(
                        index,
                        describe_errors(exc),
                        event_id if isinstance(event_id, str) else None,
                    )
                )
    return _finish(indexed, outcome, principal, pm, received_at)


def _finish(
    indexed: list[tuple[int, Any]],
    outcome: Outcome,
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None = None,
) -> Outcome:
    """The server's part of every accepted event, before any plugin sees it: the key's
    project, and the event_id and timestamp the client left out (schema.SERVER_FILLED), so
    validator and transform hooks, the spool and the store always get complete events."""
    project = principal.project_id
    received = received_at or receipt_time()
    validators = pm.hook.validate_event
    validator_impls = validators.get_hookimpls()
    # Plugins from outside this package see pydantic models, as documented (PLUGINS.md);
    # the structs are converted for them only.
    as_models = _third_party(validator_impls) or _third_party(
        pm.hook.transform_events.get_hookimpls()
    )
    for index, event in indexed:
        if type(event) in _STRUCTS:
            # A struct's attributes are plain slots: setting them costs tens of nanoseconds.
            event.project_id = project
            client_id = event.event_id
            if client_id is None:
                event.event_id = uuid7()
            if event.timestamp is None:
                event.timestamp = received
            if as_models:
                event = fast_validate.to_model(event)
        else:
            data = event.__dict__  # a model: no pydantic __setattr__, which costs a microsecond
            data["project_id"] = project
            client_id = data["event_id"]
            if client_id is None:
                data["event_id"] = uuid7()
            if data["timestamp"] is None:
                data["timestamp"] = received
        if validator_impls:
            problems = _plugin_problems(call_hook(validators, event=event, principal=principal))
            if problems:
                outcome.rejected.append(
                    Rejection(
                        index,
                        [{"field": "(event)", "message": p} for p in problems],
                        client_id,  # an id the server made for a refused event means nothing
                    )
                )
                continue
        outcome.accepted.append(event)
    if outcome.rejected:
        outcome.rejected.sort(key=lambda r: r.index)
    if outcome.accepted:
        call_hook(pm.hook.transform_events, events=outcome.accepted, principal=principal)
        if as_models or any(type(e) not in _STRUCTS for e in outcome.accepted):
            # Back to structs for the spool and the sinks, with the JSON made on the way.
            outcome.accepted, outcome.payload = fast_validate.from_models(outcome.accepted)
    return outcome


_STRUCTS = fast_validate.EVENT_STRUCT_TYPES
# Plugins shipped in this package read events by attribute (the structs or models alike).
_BUILTIN_PREFIX = "watchllm_ext."


def _third_party(impls: list[Any]) -> bool:
    """Whether a plugin from outside this package implements the hook."""
    for impl in impls:
        plugin = impl.plugin
        module = (
            plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
        )
        if not module.startswith(_BUILTIN_PREFIX):
            return True
    return False


def _plugin_problems(results: list[Any]) -> list[str]:
    problems: list[str] = []
    for result in results:
        if not result:
            continue
        if isinstance(result, str):
            problems.append(result)
        else:
            problems.extend(str(p) for p in result)
    return problems
