"""What `watchllm serve` gives uvicorn: its options, and an HTTP protocol that drops a client
whose request headers do not arrive in time or grow too big, and that answers the requests
its parser refuses with the API's JSON problem body.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but waits for ever for the
headers of a request (a slowloris client dribbling one header line every few seconds holds
its connection as long as it likes), and its httptools parser has no cap on their size (a
client could send megabytes of one header; uvicorn keeps them all). Bodies are timed by the
app itself (ingest.read_body), so that a host app mounting WatchLLM gets that part too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from ..errors import Problem
from ..settings import Settings

# What a request's Transfer-Encoding may be: chunked alone (RFC 9112 6.1). Another coding
# before it (gzip, chunked) was ignored and the body read as if plain; a proxy in front that
# reads it otherwise would see another request boundary.
_TE_RULE = "Transfer-Encoding must be chunked alone (send Content-Encoding to compress)"
_NOT_A_PATH = (
    "the request target is not a URL path such as /v1/events/batch (CONNECT is not served)"
)

# What a parser's error message says -> (our message, the field it names): the parser's
# words are the only clue to which header was wrong. Looked up by substring, lower-case.
# The first row is API.md's promise for a Content-Length that is not a number: the same body
# as the app's own check (ingest.read_body) gives in a host app.
_PARSER_ERRORS: tuple[tuple[str, str, str], ...] = (
    ("invalid character in content-length", "Content-Length is not a number", "Content-Length"),
    ("content-length overflow", "Content-Length is out of range", "Content-Length"),
    ("duplicate content-length", "send one Content-Length header, not several", "Content-Length"),
    (
        "can't be present with",  # llhttp: Transfer-Encoding can't be present with Content-Length
        "send Content-Length or Transfer-Encoding, not both",
        "Transfer-Encoding",
    ),
    ("transfer-encoding", _TE_RULE, "Transfer-Encoding"),  # llhttp: chunked twice, or not last
    ("chunk", "the chunked body's framing is not valid HTTP", "body"),
    (
        "header value",
        "a header value holds a character HTTP does not allow (a control character such as NUL,"
        " or a line folded onto the next, which HTTP/1.1 no longer allows)",
        "headers",
    ),
    ("header", "a header name holds a character HTTP does not allow", "headers"),
    ("content-length", "Content-Length is not valid", "Content-Length"),
)


# The scope key of a request the protocol answered itself while the app was reading its body:
# the status it sent (the app then sees a disconnect, and counts the request under it).
ANSWERED = "watchllm.answered_by_server"


def parser_problem(text: str) -> Problem:
    """The 400 for a request the HTTP parser refused with the message `text`."""
    lowered = text.lower()
    for clue, message, field in _PARSER_ERRORS:
        if clue in lowered:
            return Problem(400, "bad_request", message, field=field)
    return Problem(400, "bad_request", f"the request is not valid HTTP ({text})", field="request")


def headers_too_large(limit: int) -> Problem:
    return Problem(
        431,
        "headers_too_large",
        f"the request line and headers are larger than the limit of {limit} bytes",
        field="headers",
    )


def problem_bytes(problem: Problem, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response carrying `problem`, closing the connection: what the
    protocol writes itself, with no app behind it. The body is JSONResponse's encoding."""
    body = json.dumps(
        problem.body(), ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode()
    phrase = HTTPStatus(problem.status).phrase
    lines = [f"HTTP/1.1 {problem.status} {phrase}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    lines += [
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n\r\n",
        body,
    ]
    return b"".join(lines)


# What h11 (uvicorn's protocol without httptools) says of a header block over its
# max_incomplete_event_size. h11 caps only a block still incomplete: one that arrives whole
# in one read is let through; httptools, uvicorn's choice when installed (uvicorn[standard]),
# is capped exactly (on_headers_complete).
_H11_TOO_LARGE = "Receive buffer too long"


# How long a connection answered with a 4xx by the protocol itself (431, a parser's 400) keeps
# reading (and dropping) what the client still sends before it is closed.
_LINGER_S = 1.0


# uvloop's timers count whole milliseconds: one may fire up to this much before its time.
_TIMER_SLACK_S = 0.002


class _OneSendPerAnswer:
    """A connection's transport that holds a response head until the first write of its
    body, so that an answer with a small body goes out in one send() instead of two (a
    loopback send is ~5 us here, 2-3% of a single event's CPU; uvicorn writes them apart).
    Starlette sends the body right after the head, in the same turn of the event loop; a head
    with no body then (HEAD, 204, a stream whose first chunk waits) goes at the loop's next
    turn. Held bytes always go before anything written after them, and before the close."""

    __slots__ = ("_flush_soon", "_held", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_soon = self._flush

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if self._transport.is_closing():
            # The client has gone. uvicorn marks only the newest request of a pipeline as
            # disconnected, so an earlier one still answers; uvloop raises on a closed
            # transport, and each such answer was two ERROR tracebacks in the log.
            self._held = None
            return
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif type(data) is bytes and data.startswith(b"HTTP/1.") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush_soon)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def writelines(self, lines: Any) -> None:
        self._flush()
        if not self._transport.is_closing():
            self._transport.writelines(lines)

    def write_eof(self) -> None:
        self._flush()
        if not self._transport.is_closing():
            self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeadersTooLarge(Exception):
    """Raised from the parser's headers-complete callback: the parser stops there, and
    uvicorn's handling of a parser error calls send_400_response, which answers 431."""


class _Refused(Exception):
    """Raised from the headers-complete callback, as _HeadersTooLarge: answer `problem`."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


_SERVED_VERSIONS = frozenset({"1.1", "1.0"})


def head_problem(headers: list[tuple[bytes, bytes]], http_version: str) -> Problem | None:
    """Why a request's head cannot be served (None: it can). The version: 1.1 or 1.0. Host
    (RFC 9112 3.2): exactly one in an HTTP/1.1 request, at most one in HTTP/1.0 (h11,
    uvicorn's other parser, checks the same; httptools does not). Transfer-Encoding: none, or
    chunked alone and not in HTTP/1.0."""
    if http_version not in _SERVED_VERSIONS:
        # httptools reads "HTTP/2.0" and "HTTP/0.9" as versions; neither is this framing.
        return Problem(
            505,
            "http_version_not_supported",
            f"HTTP/{http_version} is not served here: send HTTP/1.1 (or HTTP/1.0)",
            field="HTTP-version",
        )
    hosts = 0
    codings = []
    for name, value in headers:  # one pass, ~5 headers: a few hundred ns a request
        if name == b"host":
            hosts += 1
        elif name == b"transfer-encoding":
            codings.append(value)
    if hosts > 1 or (hosts == 0 and http_version != "1.0"):
        how = "more than one Host header" if hosts else "no Host header (HTTP/1.1 needs one)"
        return Problem(400, "bad_request", f"the request has {how}", field="Host")
    if not codings:
        return None
    if http_version == "1.0":  # RFC 9112 6.1: HTTP/1.0 has no chunked framing
        return Problem(
            400, "bad_request", "Transfer-Encoding is not HTTP/1.0", field="Transfer-Encoding"
        )
    if b", ".join(codings).strip().lower() != b"chunked":
        return Problem(501, "not_implemented", _TE_RULE, field="Transfer-Encoding")
    return None


def header_timeout_protocol(
    timeout_s: float,
    max_header_bytes: int = 64 * 1024,
    quiet_ingest: bool = False,
    refused: Callable[[Problem], None] | None = None,
    drain_timeouts: tuple[float, float] = (10.0, 60.0),
    drain_max_bytes: int = 50 * 1024 * 1024 + 64 * 1024,
) -> type[asyncio.Protocol]:
    """uvicorn's own HTTP protocol (httptools when installed, else h11) with a deadline on the
    headers of each request: from the connection's start, and from the first bytes of each
    later request on a kept-alive connection. Past it, the connection is closed. (With
    httptools) the rest of a body answered early (a 503 while it was coming) is under that
    deadline too, moved on by each piece that comes, as a body's idle time is
    (`drain_timeouts`: the body's idle and whole limits, body_idle_timeout_s and
    body_timeout_s): a client still sending (a slow link, a server reading slowly under
    load) is not cut off; one that stalls, or drips the rest for ever, is; and so is one
    that sends more of it than `drain_max_bytes` (the largest body the server ever reads,
    max_decompressed_bytes: past it, reading on only burns a core). Request
    headers (with the request line) over `max_header_bytes` get 431 and the connection is
    closed; a request the parser refuses gets a JSON 400 (parser_problem). `quiet_ingest`:
    the access log leaves out ingest requests answered 2xx (QuietIngestAccessLog). `refused`
    is told of each answer this layer gives itself (the app never sees those requests)."""
    base: type[Any]
    try:  # uvicorn's choice when httptools is installed (the module imports it)
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    headers_complete = getattr(base, "on_headers_complete", None)  # httptools' callbacks
    message_begin = getattr(base, "on_message_begin", None)
    message_complete = getattr(base, "on_message_complete", None)
    response_complete = base.on_response_complete
    # httptools tells where its parser is: its bytes are counted exactly from each request's
    # first byte to the end of its headers. h11 caps a header block itself
    # (h11_max_incomplete_event_size, uvicorn_options); under it only the deadline is ours.
    counting = headers_complete is not None
    drain_idle_s, drain_whole_s = drain_timeouts

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        # The headers' deadline (loop time), None when none is running. The timer behind it
        # is kept across requests, not made and cancelled for each one (~2 us a request of
        # the event loop): once it fires it looks at the deadline then, and sleeps again
        # until it if a later request moved it.
        _header_deadline: float | None = None
        _header_timer: asyncio.TimerHandle | None = None
        # (h11) Both of uvicorn's protocols set `self.cycle` to a new object once a request's
        # headers are complete: the deadline is met when `cycle` changed since it was set.
        _cycle_at_timer: Any = None
        # (httptools) Whether the parser is in a request's head (request line and headers):
        # from the connection's start, and from the end of each request (its body parsed,
        # whether or not the app read it or answered early) to the end of the next one's
        # headers. Bytes are counted only there: a body is never taken for headers, and a
        # pipelined request's head is counted while the one before it is still served.
        _in_head = True
        # Bytes received in the head so far (from the first chunk that began in it): an
        # upper bound of its size while it is the only message begun in those chunks.
        _header_bytes = 0
        _chunk_counted = True  # the chunk being parsed was counted from its first byte
        _begun_in_chunk = 0  # requests begun in the chunk being parsed
        # The head began in a chunk also holding something before it: its count is not its
        # size, so its size is worked out exactly once its headers are complete.
        _head_unsure = False
        _refused = False
        # (httptools) The answer to pipelined bytes refused while the requests before them
        # were served: sent once they are answered.
        _after_response: Problem | None = None
        # (httptools) A request's headers completed in the chunk being parsed (the deadline
        # armed for them is met, even when its whole request came in that chunk and the parser
        # is in the next head again), and whether a next request began after them.
        _head_done = False
        _next_begun = False
        _peer_done = False  # the client half-closed; close once its requests are answered
        _drained = 0  # bytes read of the body of a request answered early (a 401, a 503)
        _armed_at = 0.0  # loop time the deadline was last armed

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if quiet_ingest:  # the request cycles log through it (uvicorn gives them ours)
                self.access_logger = QuietIngestAccessLog(self.access_logger)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            # Every write of this connection goes through it (the request cycles' too: they
            # are given self.transport), so the order of the bytes is kept.
            self.transport = _OneSendPerAnswer(transport, self.loop)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # answered (or closing): what still comes is read and dropped
            draining = False  # the body of a request answered early (a 401, 413, 503)
            if self._header_deadline is None:
                if self._awaiting_request():
                    self._arm()  # the first bytes of a new request on a kept-alive connection
            elif counting and not self._in_head and self._between_requests():
                self._drained_more()
                draining = True
            if counting:
                in_head = self._in_head
                if in_head:
                    self._header_bytes += len(data)
                self._chunk_counted = in_head
                self._begun_in_chunk = 0
            super().data_received(data)
            if draining and not self._in_head and self._between_requests() and not self._refused:
                # Still that body (its end, and a pipelined request after it, are not in this
                # read): its bytes count against the cap.
                self._drained += len(data)
                if self._drained > drain_max_bytes:
                    self._stop_draining()
                    return
            if self._head_done:
                self._head_done = False
                self._disarm()  # met: the next request's first bytes arm it again
                if self._next_begun:
                    self._arm()  # a pipelined request's head began in this chunk: its own
            if self._header_deadline is None:
                return
            if not self._headers_pending():
                self._disarm()  # headers complete
            elif counting and self._header_bytes > max_header_bytes and not self._refused:
                # Still no end of the headers past the cap: answer and stop reading, so an
                # unfinished header block never holds more than about the cap in memory.
                self._answer(headers_too_large(max_header_bytes))

        def on_message_begin(self) -> None:
            self._drained = 0
            self._next_begun = True
            self._begun_in_chunk += 1
            if not self._chunk_counted or self._begun_in_chunk > 1:
                self._head_unsure = True
            message_begin(self)

        def on_headers_complete(self) -> None:
            # The exact size only when the count could be over the cap or is not this head's
            # (usually neither: no per-request sum).
            if self._header_bytes > max_header_bytes or self._head_unsure:
                size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
                if size > max_header_bytes:
                    raise _HeadersTooLarge()
            problem = head_problem(self.headers, self.parser.get_http_version())
            if problem is not None:
                raise _Refused(problem)
            self._in_head = self._head_unsure = self._next_begun = False
            # The count was the head's: a body's bytes are not counted, and one still coming
            # after an early answer (413, 503) must not be taken for an over-long next head.
            self._header_bytes = 0
            self._head_done = True
            headers_complete(self)  # the base's, called directly: super() costs ~0.3 us here

        def on_message_complete(self) -> None:
            self._in_head = True
            self._header_bytes = 0
            # The rest of this read was counted before the count restarted: a next head that
            # begins in it is sized exactly at its end (on_headers_complete).
            self._chunk_counted = False
            message_complete(self)

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this inside its `except` of the parser's error: that error says
            # what was wrong (uvicorn's own message is a fixed plain-text sentence).
            error = sys.exc_info()[1]
            if error is not None and isinstance(error.__context__, _Refused):
                self._answer(error.__context__.problem)
                return
            if error is not None and (
                isinstance(error.__context__, _HeadersTooLarge)
                or str(error) == _H11_TOO_LARGE  # h11's cap on a header block (uvicorn_options)
            ):
                problem = headers_too_large(max_header_bytes)
            elif (
                error is not None
                and type(error.__context__).__name__ == "HttpParserInvalidURLError"
            ):
                # uvicorn's parse of the target failed in its callback ("User callback error"):
                # a CONNECT's host:port, or a target that is no URL.
                problem = Problem(400, "bad_request", _NOT_A_PATH, field="request")
            else:
                problem = parser_problem(str(error) if error is not None else msg)
            self._answer(problem)

        def _answer(self, problem: Problem) -> None:
            """Answer `problem` and close: at once, or after the requests before it when the
            bytes refused are a pipelined request's; only close when an answer now would
            garble one under way."""
            self._refused = True
            self._disarm()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                if counting and self._in_head:
                    # A pipelined request's bytes, while the one before is served: the client
                    # gets that one's answer (and those of any queued between), then ours
                    # (on_response_complete), as HTTP/1.1 keeps answers in order.
                    self._after_response = problem
                    # Nothing more is read meanwhile (what comes is not served): the client's
                    # bytes wait in the socket's buffers, not in our memory.
                    self.transport.pause_reading()
                    return
                if cycle.response_started:
                    # An answer is under way (a second one would garble it): close; the app
                    # sees a disconnect and writes nothing more.
                    cycle.disconnected = True
                    cycle.message_event.set()
                    self.transport.close()
                    return
                # The app is reading this request's body (bad chunk framing): it will see a
                # disconnect; this tells it the client got this answer (observability/metrics).
                cycle.scope[ANSWERED] = problem.status
            self._send_and_close(problem)

        def eof_received(self) -> bool | None:
            """The client has ended its side (a half-close: `nc -N`, some proxies) and waits
            for its answers: the connection stays open until the requests it sent whole are
            answered, then closes. A request whose body was cut short cannot complete: the
            connection closes at once, as it did for all (the app sees a disconnect), and
            then an event answered 2xx was a stored event whose client never heard so."""
            pipeline = getattr(self, "pipeline", None)  # (httptools) newest first
            newest = pipeline[0][0] if pipeline else self.cycle
            # Nothing under way, a body still to come, or (httptools) a head begun: close.
            if newest is None or newest.response_complete or newest.more_body or self._next_begun:
                return None
            self._peer_done = True
            return True  # keep writing: on_response_complete closes after the last answer

        def on_response_complete(self) -> None:
            problem = self._after_response
            if self._peer_done and problem is None and not self.pipeline:
                response_complete(self)
                if not self.transport.is_closing():
                    self.transport.close()  # the last answer the client waits for is out
                return
            if problem is None or self.pipeline:
                response_complete(self)  # the base's: the next pipelined request starts
                return
            self._after_response = None
            self.server_state.total_requests += 1
            self._send_and_close(problem)

        def _send_and_close(self, problem: Problem) -> None:
            if self.transport.is_closing():
                return
            if refused is not None:
                refused(problem)
            self.transport.write(problem_bytes(problem, self.server_state.default_headers))
            # A lingering close: the client may still be sending (a header block of
            # megabytes); closing with its bytes unread would reset the connection before it
            # reads the answer. End our side, drop what comes, close in a moment.
            self.transport.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(_LINGER_S, self.transport.close)
            else:
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _awaiting_request(self) -> bool:
            """Whether the connection waits for a request's headers: in a head, or (httptools)
            still receiving the body of a request already answered (an early 401 or 413: the
            rest of that body, then the next head, are under the deadline too)."""
            if counting:
                return self._in_head or self._between_requests()
            return self._between_requests()

        def _headers_pending(self) -> bool:
            """Whether the headers the deadline was armed for are still to come."""
            if counting:
                return self._in_head or self._between_requests()
            return self.cycle is self._cycle_at_timer

        def _drained_more(self) -> None:
            """A piece of the body of a request answered early (a 503 or 413 while it came):
            the client is sending, so the deadline moves on by the body's idle limit, within
            its whole limit from the rest's first piece. Cut at the first deadline instead, a
            client sending a big body over a slow link (10 MB at 1 MB/s) was reset while
            still sending, most often before it read its answer."""
            now = self.loop.time()
            self._header_deadline = min(now + drain_idle_s, self._armed_at + drain_whole_s)

        def _stop_draining(self) -> None:
            """Past `drain_max_bytes` of an answered body the connection ends: a 401 to
            `Content-Length: 999999999999` and a stream of zeros was read and dropped at half
            a core for the body's whole limit (60 s)."""
            self._refused = True  # nothing more of it is parsed
            self._disarm()
            # Its answer is out: end our side, read no more, close in a moment (closing with
            # unread bytes resets the connection, maybe before the client read its answer).
            self.transport.pause_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)

        def _arm(self) -> None:
            self._cycle_at_timer = self.cycle
            # Deadlines only move later, so a timer already set fires before this one is due.
            self._armed_at = now = self.loop.time()
            self._header_deadline = now + timeout_s
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._headers_late)

        def _disarm(self) -> None:
            self._header_deadline = None

        def _headers_late(self) -> None:
            self._header_timer = None
            deadline = self._header_deadline
            if deadline is None:
                return  # met; the next request's first bytes set the timer again
            left = deadline - self.loop.time()
            if left > _TIMER_SLACK_S:  # a later request's deadline: not due yet
                self._header_timer = self.loop.call_later(left, self._headers_late)
                return
            self._header_deadline = None
            if self._headers_pending() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


# The paths of the ingest routes (app.py, otel/receiver.py) as the access log sees them
# (`watchllm serve` mounts the app at the root): events, batches and OTLP spans.
_INGEST_PATHS = frozenset({"/v1/events/batch", "/v1/traces", "/api/public/otel/v1/traces"})


def is_ingest_path(path: str) -> bool:
    path = path.partition("?")[0]
    if path in _INGEST_PATHS:
        return True
    # /v1/projects/{project_id}/events
    return path.startswith("/v1/projects/") and path.endswith("/events") and path.count("/") == 4


class QuietIngestAccessLog:
    """uvicorn's access logger, minus the lines of ingest requests answered 2xx: making and
    writing a line took a quarter of a single event's time in the server (`watchllm serve`,
    wrk, 32 connections: 4,500 requests/s with the lines, 6,000 without); their count and
    latency are in /metrics. Refusals (4xx, 5xx) and every other route are logged as before."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        # uvicorn's arguments: client, method, path with query, HTTP version, status.
        quiet = len(args) == 5 and args[1] == "POST" and 200 <= args[4] < 300
        if quiet and is_ingest_path(args[2]):
            return
        self._logger.info(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def uvicorn_options(
    settings: Settings, refused: Callable[[Problem], None] | None = None
) -> dict[str, Any]:
    """Keyword arguments for uvicorn.run / uvicorn.Config, from the settings; `refused`: see
    header_timeout_protocol (observability.metrics.count_refused counts them in /metrics)."""
    quiet = settings.access_log == "quiet-ingest"
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log != "off",
        "lifespan": "on",
        "http": header_timeout_protocol(
            settings.header_timeout_s,
            settings.max_header_bytes,
            quiet,
            refused,
            (settings.body_idle_timeout_s, settings.body_timeout_s),
            max(settings.max_body_bytes, settings.max_decompressed_bytes)
            + settings.max_header_bytes,
        ),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        # No route is a WebSocket: an Upgrade request is served as plain HTTP (uvicorn's
        # WebSocket layer would answer it a text/plain 400 of its own).
        "ws": "none",
        # Only read when uvicorn runs h11 (no httptools): its own cap on a header block.
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
