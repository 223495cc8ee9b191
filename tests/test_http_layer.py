"""The HTTP layer against hostile clients (helper R's findings 4, 5, 13): real sockets against
the server `watchllm serve` runs (uvicorn with serving.uvicorn_options) on loopback.

- a client that leaves in the middle of its body is no server error (no ERROR log, no
  traceback, counted as status 499, nothing spooled, nothing for Sentry);
- request headers are capped (`max_header_bytes`): 431 with a JSON body, and an unfinished
  header block is cut off at the cap, not read for ever;
- requests the HTTP parser refuses get the API's JSON problem body naming the header;
- two Authorization headers are refused (400 naming Authorization) on every route.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from conftest import free_port, make_settings, prompt_call

from watchllm_ext import hookimpl
from watchllm_ext.app import create_app
from watchllm_ext.ingest.validate import DETAILED_OFFLOAD_MIN_BYTES, OFFLOAD_MIN_BYTES
from watchllm_ext.keys import KeyStore
from watchllm_ext.observability.metrics import count_refused
from watchllm_ext.serving.protocol import uvicorn_options

MAX_HEADER_BYTES = 8192


class Served:
    def __init__(self, tmp_path: Path, plugins: tuple[Any, ...] = (), **overrides: Any) -> None:
        self.settings = make_settings(
            tmp_path,
            port=free_port(),
            header_timeout_s=30.0,  # far off: a close within seconds is the cap's, not this
            max_header_bytes=MAX_HEADER_BYTES,
            **{"log_level": "warning", **overrides},
        )
        self.key = KeyStore(self.settings.keys_path).create("acme", scope="admin")
        self.app = create_app(self.settings, plugins=plugins)
        refused = count_refused(self.app.state.watchllm)  # as cmd_serve
        options = uvicorn_options(self.settings, refused)
        self.server = uvicorn.Server(uvicorn.Config(self.app, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.sockets: list[socket.socket] = []

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.settings.port), timeout=10)
        self.sockets.append(sock)
        return sock

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def accepted(self) -> int:
        writer = self.app.state.watchllm.writer
        assert writer is not None
        return writer.accepted_events_total

    def request_count(self, route: str, status: int) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        pattern = (
            r'^watchllm_http_request_duration_seconds_count\{[^}]*route="'
            + re.escape(route)
            + r'"[^}]*status="'
            + str(status)
            + r'"[^}]*\} (\S+)$'
        )
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else 0.0


class Records(logging.Handler):
    """Every log record of the loggers it is attached to (uvicorn's do not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    # The root and uvicorn's own (which does not propagate): each record reaches one of them.
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "watchllm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers[:2]:
        lg.addHandler(handler)
    logging.getLogger("watchllm").setLevel(logging.INFO)
    yield handler
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    s.start()
    yield s
    s.stop()


def _read_all(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _refused_head(sock: socket.socket, length: int | str) -> bytes:
    """Send a batch's head with a key that is not valid and `length` as its Content-Length;
    the 401 the server answers at once, before any of the body."""
    sock.sendall(
        b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wllm_nope\r\n"
        + f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
    )
    answer = b""
    while b"}" not in answer:
        answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    return answer


def _response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _wait_for(check: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        time.sleep(0.05)


# --- 4: a client that leaves in the middle of its body -------------------------------------

BODY = json.dumps({"events": [prompt_call("d1")]}).encode()
ONE = json.dumps(prompt_call("h1")).encode()
CUTS = {
    "content-length cut": b"Content-Length: 1000\r\n\r\n" + BODY[:20],
    "chunked, then closed": b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + BODY[:5] + b"\r\n",
    "bad chunk framing": b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
}
ROUTES = {
    "/v1/events/batch": "/v1/events/batch",
    "/v1/projects/acme/events": "/v1/projects/{project_id}/events",
    "/v1/traces": "/v1/traces",
}


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("path", list(ROUTES))
def test_a_client_that_leaves_mid_body_is_no_server_error(
    served: Served, records: Records, path: str, cut: str
) -> None:
    route = ROUTES[path]
    sock = served.connect()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {served.key}\r\n"
        "Content-Type: application/json\r\n".encode()
        + CUTS[cut]
    )
    if cut == "bad chunk framing":
        status, headers, body = _response(_read_all(sock))
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(body)["field"] == "body"
    else:
        time.sleep(0.3)  # the app is reading the body when the client goes
    sock.close()
    # Bad framing is answered 400 by the server itself, and counted so; a client that just
    # goes is 499 (no answer was sent).
    counted = 400 if cut == "bad chunk framing" else 499
    _wait_for(lambda: served.request_count(route, counted) == 1)
    assert served.request_count(route, 500) == 0
    assert served.accepted() == 0  # nothing of it was spooled
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not [r for r in records.records if r.exc_info]  # no traceback at any level
    # One line: the server's own warning of the bad request, or an INFO line naming the route.
    said = [r for r in records.records if r.levelno >= logging.WARNING or r.name == "watchllm.http"]
    assert len(said) == 1, [r.getMessage() for r in said]
    if cut == "bad chunk framing":
        assert said[0].levelno == logging.WARNING and said[0].name == "uvicorn.error"
    else:
        assert said[0].name == "watchllm.http" and said[0].levelno == logging.INFO
        assert path in said[0].getMessage()
    # The server goes on as before.
    r = httpx.post(
        served.url + "/v1/events/batch",
        content=BODY,
        headers={"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 202 and served.accepted() == 1


def test_a_disconnect_is_not_sent_to_sentry(tmp_path: Path) -> None:
    import sentry_sdk
    from sentry_sdk.envelope import Envelope
    from sentry_sdk.transport import Transport

    from watchllm_ext.observability.sentry import init_sentry

    class Capture(Transport):
        def __init__(self) -> None:
            super().__init__(None)
            self.events: list[dict[str, Any]] = []

        def capture_envelope(self, envelope: Envelope) -> None:
            self.events += [i.payload.json for i in envelope.items if i.type == "event"]

    transport = Capture()
    dsn = "http://public@127.0.0.1:9/1"
    assert init_sentry(make_settings(tmp_path, sentry_dsn=dsn), transport=transport)
    served = Served(tmp_path, sentry_dsn=dsn)  # create_app keeps the running client
    served.start()
    try:
        sock = served.connect()
        sock.sendall(
            f"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {served.key}"
            "\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        time.sleep(0.3)
        sock.close()
        _wait_for(lambda: served.request_count("/v1/events/batch", 499) == 1)
        # The control: an error that is one reaches the transport (Sentry is wired up).
        sentry_sdk.capture_message("control", level="error")
        sentry_sdk.flush()
        _wait_for(lambda: len(transport.events) >= 1)
        time.sleep(0.2)
        assert [
            e.get("message") or e.get("logentry", {}).get("message") for e in transport.events
        ] == ["control"]
    finally:
        served.stop()
        sentry_sdk.get_client().close(timeout=0)
        sentry_sdk.get_global_scope().set_client(None)


# --- 5: the header block's size ----------------------------------------------------------------


def _padding(n: int) -> bytes:
    return b"X-Pad: " + b"a" * n + b"\r\n"


def test_headers_over_the_cap_get_431_and_a_closed_connection(served: Served) -> None:
    sock = served.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + _padding(MAX_HEADER_BYTES) + b"\r\n")
    status, headers, body = _response(_read_all(sock))
    assert status == 431 and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "error": "headers_too_large",
        "message": f"the request line and headers are larger than the limit of"
        f" {MAX_HEADER_BYTES} bytes",
        "field": "headers",
    }


def test_headers_just_under_the_cap_are_served(served: Served) -> None:
    sock = served.connect()
    sock.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        + _padding(MAX_HEADER_BYTES - 200)
        + b"\r\n"
    )
    assert _response(_read_all(sock))[0] == 200


def test_an_unfinished_header_block_is_cut_off_at_the_cap(served: Served) -> None:
    # Headers that never end: past the cap the server answers and closes at once (the header
    # deadline is 30 s off); just under it, it waits for the rest.
    under = served.connect()
    under.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * (MAX_HEADER_BYTES - 200))
    over = served.connect()
    started = time.monotonic()
    over.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * (MAX_HEADER_BYTES + 100))
    status, _, body = _response(_read_all(over))
    assert status == 431 and json.loads(body)["field"] == "headers"
    assert time.monotonic() - started < 5
    under.settimeout(1.0)
    with pytest.raises(TimeoutError):
        under.recv(1)  # still waiting for its headers
    # More bytes on the refused connection are not read: it is closed (after a lingering
    # second in which what the client still sends is dropped).
    with pytest.raises(OSError):
        for _ in range(500):
            over.sendall(b"a" * 65536)
            time.sleep(0.01)


def test_the_cap_is_per_request_on_a_kept_alive_connection(served: Served) -> None:
    # Many requests on one connection, their headers together far over the cap: each is
    # counted on its own. Then one over the cap on the same connection is refused.
    sock = served.connect()
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + _padding(MAX_HEADER_BYTES // 2) + b"\r\n"
    sock.settimeout(10)
    for _ in range(6):
        sock.sendall(request)
        data = b""
        while b'"ok"' not in data and b"}" not in data:
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + _padding(MAX_HEADER_BYTES) + b"\r\n")
    assert _response(_read_all(sock))[0] == 431


class SlowQuota:
    """Holds every ingest request in its quota check for a while (the loop keeps serving):
    a request still being served when the next one on its connection arrives."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s

    @hookimpl
    async def check_quota(self, principal: Any, n_events: int, user_id: Any, route: Any) -> None:
        await anyio.sleep(self.hold_s)


def _one_event_request(key: str, event_id: str) -> bytes:
    body = json.dumps(prompt_call(event_id)).encode()
    return (
        b"POST /v1/projects/acme/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_a_pipelined_requests_headers_are_capped_while_the_one_before_is_served(
    tmp_path: Path, records: Records
) -> None:
    # Headers that arrive while the request before them on the connection is still served
    # were not counted: a client could pipeline one request, then send hundreds of MB of one
    # header block, all kept in memory. Now they are counted from their first byte; past the
    # cap nothing more is read, and once the first request is answered the 431 follows and
    # the connection is closed.
    served = Served(tmp_path, plugins=(SlowQuota(3.0),))
    served.start()
    try:
        sock = served.connect()
        sock.sendall(_one_event_request(served.key, "pipelined-1"))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: ")
        sent = [0]

        def pad() -> None:  # until the server closes (or 64 MB)
            with contextlib.suppress(OSError):
                while sent[0] < 64 << 20:
                    sock.sendall(b"a" * 65536)
                    sent[0] += 65536

        padding = threading.Thread(target=pad, daemon=True)
        padding.start()
        sock.settimeout(15)
        out = b""
        while b"HTTP/1.1 431" not in out:
            chunk = sock.recv(65536)
            assert chunk, out[:600]
            out += chunk
        # The server stopped reading at the cap while the first request was served (3 s):
        # what was sent by then is what the kernel's buffers took, not 64 MB.
        assert sent[0] < 16 << 20
        assert out.startswith(b"HTTP/1.1 202") and b'"pipelined-1"' in out, out[:600]
        padding.join(15)
        assert not [r for r in records.records if r.levelno >= logging.ERROR]
        assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
    finally:
        served.stop()


def test_the_rest_of_a_body_answered_early_is_not_taken_for_headers(served: Served) -> None:
    # A 401 before the body is read (a wrong key): the body that follows is the request's,
    # dropped by the parser, not the next request's headers (it was counted so: a 431 was
    # appended to the 401, and the connection reset).
    sock = served.connect()
    sock.settimeout(10)
    body = b"x" * (MAX_HEADER_BYTES * 20)
    first = _refused_head(sock, len(body))
    sock.sendall(body)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    rest = _read_all(sock)
    assert b"431" not in first + rest
    assert rest.startswith(b"HTTP/1.1 200") and rest.count(b"HTTP/1.1") == 1


def test_the_rest_of_a_body_answered_early_is_read_only_up_to_the_largest_body(
    tmp_path: Path,
) -> None:
    """A 401 to `Content-Length: 999999999999` and a stream of zeros: the server reads and
    drops the rest (so that a client still sending gets to read its answer) only up to the
    largest body it ever reads, max_decompressed_bytes, then ends the connection. It read
    such a stream at half a core until the body's whole limit (60 s)."""
    served = Served(tmp_path, max_body_bytes=64 * 1024, max_decompressed_bytes=256 * 1024)
    served.start()
    try:
        sock = served.connect()
        sock.settimeout(10)
        _refused_head(sock, 999_999_999_999)
        sent = [0]

        def zeros() -> None:
            piece = b"0" * 65536
            with contextlib.suppress(OSError):
                while sent[0] < 64 << 20:
                    sock.sendall(piece)
                    sent[0] += len(piece)

        sender = threading.Thread(target=zeros, daemon=True)
        started = time.monotonic()
        sender.start()
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):  # the server's end: EOF (then a reset, it read no more)
                pass
        assert time.monotonic() - started < 8
        sender.join(15)
        assert not sender.is_alive()
        # What it sent: the cap and what the kernel's buffers took meanwhile, not 64 MB.
        assert sent[0] < 32 << 20, sent
        assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
    finally:
        served.stop()


def test_a_request_pipelined_after_a_drained_body_is_served(tmp_path: Path) -> None:
    """The cap counts the answered body's bytes only: a request sent right after it (in the
    same reads) is served, even when the two together pass the cap (they were counted as
    one, and the connection ended before the second was answered)."""
    served = Served(tmp_path, max_body_bytes=64 * 1024, max_decompressed_bytes=256 * 1024)
    served.start()
    try:
        cap = 256 * 1024 + MAX_HEADER_BYTES
        first = b"x" * (cap - 4096)
        second = json.dumps({"events": [prompt_call("after-drain", prompt="y" * 60_000)]})
        sock = served.connect()
        sock.settimeout(10)
        _refused_head(sock, len(first))
        sock.sendall(first[:1])  # (the read that sets the deadline again is not counted)
        time.sleep(0.2)
        sock.sendall(first[1:-100])
        time.sleep(0.3)  # read and dropped: under the cap by 4 KB
        # The body's last bytes and the next request (60 KB) in one read: the server's event
        # loop is held up while they come.
        served.server.servers[0].get_loop().call_soon_threadsafe(time.sleep, 0.3)
        sock.sendall(
            first[-100:]
            + b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            + f"Authorization: Bearer {served.key}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(second)}\r\n\r\n{second}".encode()
        )
        rest = _read_all(sock)
        assert rest.startswith(b"HTTP/1.1 202"), rest[:300]
    finally:
        served.stop()


def test_a_long_head_that_begins_in_the_read_ending_the_one_before_is_capped(
    served: Served,
) -> None:
    # One read held the end of request 1's head and all of request 2's, with a header over the
    # cap: request 2's bytes in it were counted before request 1 completed (the count then
    # restarted), so its head went unmeasured and was served.
    sock = served.connect()
    sock.settimeout(10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
    time.sleep(0.3)  # request 1's head begins in a read of its own
    big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES * 12) + b"\r\n"
    sock.sendall(
        b"X-A: b\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n" + big + b"Connection: close\r\n\r\n"
    )
    out = _read_all(sock)
    # Request 2 is refused, not served: request 1's answer, then the 431, then the close.
    assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1 200") == 1, out[:600]
    assert b"HTTP/1.1 431" in out, out[:600]


def test_a_body_answered_midway_is_not_taken_for_headers(tmp_path: Path) -> None:
    # The head came with much of its body in one read (counted while in the head), and the
    # app answered 413 midway through the body: the rest of the body was then counted against
    # the next head's cap (that count was left from the first read), and answered 431. Early
    # answers midway are common under overload (503 past max_body_memory_bytes).
    served = Served(tmp_path, max_body_bytes=64 * 1024)
    served.start()
    try:
        sock = served.connect()
        sock.settimeout(10)
        piece = b"x" * (100 * 1024)
        sock.sendall(
            b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\n"
            + f"Authorization: Bearer {served.key}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(piece):x}\r\n".encode()
            + piece
            + b"\r\n"
        )
        first = b""
        while b"}" not in first:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 413"), first
        for _ in range(5):  # the rest of the body, read and dropped
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        rest = _read_all(sock)
        assert b"431" not in first + rest
        assert rest.startswith(b"HTTP/1.1 200") and rest.count(b"HTTP/1.1") == 1
    finally:
        served.stop()


def test_a_bad_request_pipelined_behind_one_being_served_is_answered_after_it(
    tmp_path: Path,
) -> None:
    # The parser refuses the second request while the first is still served: a 400 written
    # then would be read as the first one's answer (and closing dropped the first request).
    # The first is answered, then the 400 goes out and the connection is closed.
    served = Served(tmp_path, plugins=(SlowQuota(1.0),))
    served.start()
    try:
        sock = served.connect()
        sock.sendall(
            _one_event_request(served.key, "pipelined-2")
            + b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Note: a\x00b\r\n\r\n"
        )
        out = _read_all(sock)
        first, _, second = out.partition(b"HTTP/1.1 400")
        assert first.startswith(b"HTTP/1.1 202") and b'"pipelined-2"' in first, out[:600]
        assert second, out[:600]
        status, headers, body = _response(b"HTTP/1.1 400" + second)
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(body)["field"] == "headers"
        assert served.accepted() == 1
    finally:
        served.stop()


def test_a_header_block_far_over_the_cap_still_reads_its_431(served: Served) -> None:
    # The server answers at the cap while the client is still sending: closed at once with
    # bytes unread, the connection was reset and the client never read the answer.
    sock = served.connect()
    sock.settimeout(10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + _padding(8 << 20) + b"\r\n")
    status, _, body = _response(_read_all(sock))
    assert status == 431 and json.loads(body)["error"] == "headers_too_large"


def test_a_connect_or_a_websocket_upgrade_gets_a_json_answer(served: Served) -> None:
    sock = served.connect()
    sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    status, headers, body = _response(_read_all(sock))
    assert (status, headers["connection"]) == (400, "close")
    assert json.loads(body) == {
        "error": "bad_request",
        "message": "the request target is not a URL path such as /v1/events/batch"
        " (CONNECT is not served)",
        "field": "request",
    }
    # No route is a WebSocket: the upgrade is served as plain HTTP (a JSON 404 here).
    sock = served.connect()
    sock.sendall(
        b"GET /v1/stream HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade, close\r\n\r\n"
    )
    status, headers, body = _response(_read_all(sock))
    assert status == 404 and json.loads(body)["error"] == "not_found"


# --- 13: requests the parser refuses --------------------------------------------------------

NOT_A_NUMBER = {
    "error": "bad_request",
    "message": "Content-Length is not a number",
    "field": "Content-Length",
}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Content-Length: abc", NOT_A_NUMBER),
        (b"Content-Length: +84", NOT_A_NUMBER),
        (b"Content-Length: 0x54", NOT_A_NUMBER),
        (b"Content-Length: -1", NOT_A_NUMBER),
        (
            b"Content-Length: 84\r\nContent-Length: 84",
            {
                "error": "bad_request",
                "message": "send one Content-Length header, not several",
                "field": "Content-Length",
            },
        ),
        (
            b"Content-Length: 84\r\nTransfer-Encoding: chunked",
            {
                "error": "bad_request",
                "message": "send Content-Length or Transfer-Encoding, not both",
                "field": "Transfer-Encoding",
            },
        ),
        (
            b"X-Note: a\x00b",
            {
                "error": "bad_request",
                "message": "a header value holds a character HTTP does not allow (a control"
                " character such as NUL, or a line folded onto the next, which HTTP/1.1 no"
                " longer allows)",
                "field": "headers",
            },
        ),
    ],
)
def test_requests_the_parser_refuses_get_a_json_problem(
    served: Served, header: bytes, expected: dict[str, str]
) -> None:
    sock = served.connect()
    sock.sendall(
        b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + served.key.encode()
        + b"\r\nContent-Type: application/json\r\n"
        + header
        + b"\r\n\r\n"
        + BODY
    )
    status, headers, body = _response(_read_all(sock))
    assert status == 400 and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == expected
    assert served.accepted() == 0


def test_a_bad_content_length_answers_as_in_a_host_app(served: Served) -> None:
    """The body under `watchllm serve` is byte for byte the app's own (ingest.read_body),
    which a host app's server that lets the header through gets."""
    from watchllm_ext.errors import Problem
    from watchllm_ext.ingest.body import read_body

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    import asyncio

    async def app_answer() -> bytes:
        try:
            await read_body(
                receive,
                content_length="abc",
                content_encoding=None,
                max_bytes=1000,
                max_decompressed_bytes=1000,
            )
        except Problem as problem:
            return bytes(problem.response().body)
        raise AssertionError("no problem")

    sock = served.connect()
    sock.sendall(b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n")
    _, _, body = _response(_read_all(sock))
    assert body == asyncio.run(app_answer())


# --- 13: two Authorization headers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/events/batch"),
        ("POST", "/v1/traces"),
        ("GET", "/v1/analytics/stats"),
    ],
)
def test_two_authorization_headers_are_refused(served: Served, method: str, path: str) -> None:
    good = f"Bearer {served.key}"
    for pair in ([good, "Bearer wrong"], ["Bearer wrong", good], [good, good]):
        r = httpx.request(
            method,
            served.url + path,
            content=BODY if method == "POST" else None,
            headers=[
                ("Authorization", pair[0]),
                ("Authorization", pair[1]),
                ("Content-Type", "application/json"),
            ],
        )
        assert r.status_code == 400, (pair, r.text)
        if path == "/v1/traces":  # OTLP's answer, a Status (test_otel_bad_input: protobuf too)
            assert r.json() == {"code": 3, "message": "send one Authorization header, not 2"}
            continue
        assert r.json() == {
            "error": "bad_request",
            "message": "send one Authorization header, not 2",
            "field": "Authorization",
        }
    assert served.accepted() == 0
    assert served.request_count("unmatched", 400) >= 3


@pytest.mark.parametrize(
    ("title", "values"),
    [
        ("Content-Type", ["application/json", "text/plain"]),
        ("Content-Type", ["application/json", "application/json"]),
        ("Content-Encoding", ["gzip", "br"]),
    ],
)
def test_two_content_type_or_encoding_lines_are_refused(
    served: Served, title: str, values: list[str]
) -> None:
    """The second line was dropped unsaid (202): a proxy that reads the list RFC 9110 makes
    of them (text/plain, or a body gzip then br) sees another request than the server."""
    body = gzip.compress(BODY) if title == "Content-Encoding" else BODY
    headers = [("Authorization", f"Bearer {served.key}"), ("Content-Type", "application/json")]
    headers = [h for h in headers if h[0] != title] + [(title, v) for v in values]
    r = httpx.post(served.url + "/v1/events/batch", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "bad_request",
        "message": f"send one {title} header, not 2",
        "field": title,
    }
    assert served.accepted() == 0


# --- 8: an invalid batch's detailed answer is built off the event loop ----------------------


class ValidationThreads:
    """A validator plugin that notes the thread each event is validated on (every valid event
    of a 207 reaches it)."""

    def __init__(self) -> None:
        self.threads: set[str] = set()

    @hookimpl
    def validate_event(self, event: Any, principal: Any) -> None:
        self.threads.add(threading.current_thread().name)


def _mixed_batch(n: int) -> bytes:
    """`n` events, the first invalid: the fast validator declines the body."""
    events: list[Any] = [{"event_type": 1}]
    events += [{"event_type": "prompt_call", "run_id": "r", "model": "m"}] * (n - 1)
    return json.dumps({"events": events}).encode()


def test_an_invalid_batch_under_the_thread_threshold_is_answered_off_the_loop(
    server_factory: Any,
) -> None:
    plugin = ValidationThreads()
    server = server_factory(plugin_objects=(plugin,))
    headers = {**server.headers(), "Content-Type": "application/json"}
    small = _mixed_batch(3)
    assert len(small) < DETAILED_OFFLOAD_MIN_BYTES
    r = server.client.post("/v1/events/batch", content=small, headers=headers)
    assert r.status_code == 207
    assert plugin.threads and "AnyIO worker thread" not in plugin.threads  # on the loop
    plugin.threads.clear()
    big = _mixed_batch(1000)
    assert DETAILED_OFFLOAD_MIN_BYTES <= len(big) < OFFLOAD_MIN_BYTES
    for path in ("/v1/events/batch", "/v1/projects/acme/events"):
        body = big if path.endswith("batch") else json.dumps(json.loads(big)["events"]).encode()
        r = server.client.post(path, content=body, headers=headers)
        assert r.status_code == 207 and r.json()["accepted"] == 999
        assert r.json()["rejected"][0]["index"] == 0
        assert plugin.threads == {"AnyIO worker thread"}


# --- 10: a batch bigger than the whole spool -------------------------------------------------


def test_a_batch_bigger_than_the_spool_gets_413_not_503(
    server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cap = 64 * 1024
    with caplog.at_level(logging.WARNING, logger="watchllm.settings"):
        server = server_factory(spool_max_bytes=cap, flush_interval_s=5.0)
    warned = [r.getMessage() for r in caplog.records if r.name == "watchllm.settings"]
    expected = "spool_max_bytes (65536) is smaller than max_decompressed_bytes"
    assert any(expected in w for w in warned)
    headers = {**server.headers(), "Content-Type": "application/json"}
    one = {"event_type": "prompt_call", "run_id": "r", "model": "m"}
    # ~290 bytes an event in the spool: 300 make ~87 KB from an 18 KB body; 2,000 a big body.
    for n in (300, 2000):
        body = json.dumps({"events": [one] * n}).encode()
        r = server.client.post("/v1/events/batch", content=body, headers=headers)
        assert r.status_code == 413, r.text
        assert "retry-after" not in r.headers
        assert r.json()["error"] == "payload_too_large"
        assert r.json()["field"] == "body"
        assert f"spool_max_bytes ({cap} bytes)" in r.json()["message"]
    assert server.wl.writer.accepted_events_total == 0
    r = server.client.post("/v1/events/batch", json={"events": [one] * 10}, headers=headers)
    assert r.status_code == 202


def test_without_httptools_the_h11_protocol_answers_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn falls back to h11 when httptools is missing: header_timeout_protocol takes it
    as its base, and its refusals are JSON too (h11 caps an incomplete header block)."""
    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)
    served = Served(tmp_path)
    assert served.server.config.http.__mro__[1].__name__ == "H11Protocol"
    served.start()
    try:
        sock = served.connect()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * MAX_HEADER_BYTES)
        status, _, body = _response(_read_all(sock))
        assert status == 431 and json.loads(body)["field"] == "headers"
        sock = served.connect()
        sock.sendall(b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n")
        status, headers, body = _response(_read_all(sock))
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(body)["field"] == "Content-Length"
    finally:
        served.stop()


def test_spans_bigger_than_the_spool_get_413_not_503(server_factory: Any) -> None:
    from google.rpc import status_pb2
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import SpanKind

    class Collect(SpanExporter):
        def __init__(self) -> None:
            self.spans: list[Any] = []

        def export(self, spans: Any) -> SpanExportResult:
            self.spans.extend(spans)
            return SpanExportResult.SUCCESS

    collect = Collect()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(collect))
    tracer = provider.get_tracer("t")
    for i in range(200):  # LLM spans: a span row and an event each in the spool
        with tracer.start_as_current_span(f"chat {i}", kind=SpanKind.CLIENT) as span:
            span.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "m",
                    "gen_ai.usage.input_tokens": 5,
                }
            )
    provider.shutdown()
    server = server_factory(spool_max_bytes=64 * 1024, flush_interval_s=5.0)
    r = server.client.post(
        "/v1/traces",
        content=encode_spans(collect.spans).SerializeToString(),
        headers={**server.headers(), "Content-Type": "application/x-protobuf"},
    )
    assert r.status_code == 413, r.content
    assert "retry-after" not in r.headers
    status = status_pb2.Status.FromString(r.content)
    assert status.code == 8  # RESOURCE_EXHAUSTED: exporters do not retry it
    assert "spool_max_bytes (65536 bytes)" in status.message
    assert server.wl.writer.accepted_events_total == 0


# --- one send() per answer (serving._OneSendPerAnswer) ---------------------------------------


class _CountedWrites:
    """The real transport, with its writes counted (each is a send() when the socket takes it)."""

    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: Any) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _SlowStream:
    """A plugin route whose streamed answer sends its first chunk only when told to."""

    def __init__(self) -> None:
        self.go = threading.Event()

    @hookimpl
    def register_routes(self, settings: Any) -> list[Any]:
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        async def chunks() -> Any:
            while not self.go.is_set():
                await anyio.sleep(0.01)
            yield b"first"

        async def endpoint(request: Any) -> Any:
            return StreamingResponse(chunks(), media_type="text/plain")

        return [Route("/slow", endpoint)]


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Served, list]]:
    from watchllm_ext.serving import protocol as serving

    writes: list[bytes] = []
    real_init = serving._OneSendPerAnswer.__init__

    def init(self: Any, transport: Any, loop: Any) -> None:
        real_init(self, _CountedWrites(transport, writes), loop)

    monkeypatch.setattr(serving._OneSendPerAnswer, "__init__", init)
    stream = _SlowStream()
    s = Served(tmp_path, plugins=(stream,))
    s.stream = stream  # type: ignore[attr-defined]
    s.start()
    yield s, writes
    stream.go.set()
    s.stop()


def test_an_answer_goes_out_in_one_write(counted: tuple[Served, list]) -> None:
    served, writes = counted
    sock = served.connect()
    for n in range(3):  # kept alive: each answer one write, head and body together
        del writes[:]
        sock.sendall(_one_event_request(served.key, f"one-send-{n}"))
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            data += sock.recv(65536)
        status, _, body = _response(data)
        assert status == 202 and json.loads(body)["accepted"] == 1
        assert len(writes) == 1 and writes[0] == data


def test_a_head_with_no_body_to_follow_still_goes_out(counted: tuple[Served, list]) -> None:
    served, _ = counted
    # HEAD: uvicorn writes the head and never a body.
    head = httpx.head(served.url + "/healthz", timeout=10)
    assert head.status_code in (200, 405)
    # A stream whose first chunk waits: its head reaches the client before the chunk exists.
    with httpx.stream("GET", served.url + "/slow", timeout=10) as answer:
        assert answer.status_code == 200
        assert not served.stream.go.is_set()  # type: ignore[attr-defined]
        served.stream.go.set()  # type: ignore[attr-defined]
        assert answer.read() == b"first"
    assert served.accepted() == 0


# --- Transfer-Encoding: chunked alone (RFC 9112 6.1) -----------------------------------------

TE_RULE = "Transfer-Encoding must be chunked alone (send Content-Encoding to compress)"


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("version", "codings", "status", "message"),
    [
        ("1.1", [b"gzip, chunked"], 501, TE_RULE),
        ("1.1", [b"foo, chunked"], 501, TE_RULE),
        ("1.1", [b"gzip", b"chunked"], 501, TE_RULE),  # two headers: one list
        ("1.1", [b"chunked, identity"], 400, TE_RULE),
        ("1.1", [b"chunked, chunked"], 400, TE_RULE),
        ("1.0", [b"chunked"], 400, "Transfer-Encoding is not HTTP/1.0"),
    ],
)
def test_a_transfer_coding_other_than_chunked_alone_is_refused(
    served: Served, version: str, codings: list[bytes], status: int, message: str
) -> None:
    """Another coding before chunked was ignored and the body read as if plain (202): a proxy
    in front that reads it otherwise would see other request boundaries."""
    sock = served.connect()
    head = (
        f"POST /v1/events/batch HTTP/{version}\r\nHost: t\r\nAuthorization: Bearer {served.key}"
        "\r\nContent-Type: application/json\r\n"
    ).encode()
    head += b"".join(b"Transfer-Encoding: " + c + b"\r\n" for c in codings)
    sock.sendall(head + b"\r\n" + _chunked(BODY))
    got, headers, body = _response(_read_all(sock))
    assert (got, headers["connection"]) == (status, "close")
    assert json.loads(body)["field"] == "Transfer-Encoding"
    assert json.loads(body)["message"] == message
    assert served.accepted() == 0
    # Chunked alone is served as ever.
    ok = httpx.post(
        served.url + "/v1/events/batch",
        content=iter([BODY]),  # an iterator: httpx sends it chunked
        headers={"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert ok.status_code == 202, ok.text


# --- Host (RFC 9112 3.2) and the path's spelling ---------------------------------------------


def _one_event(served: Served, version: str, hosts: list[bytes]) -> bytes:
    """A request of one event, in this HTTP version, with these Host lines."""
    head = f"POST /v1/projects/acme/events HTTP/{version}\r\n".encode()
    head += b"".join(b"Host: " + h + b"\r\n" for h in hosts)
    head += (
        f"Authorization: Bearer {served.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(ONE)}\r\n\r\n"
    ).encode()
    return head + ONE


@pytest.mark.parametrize(
    ("version", "hosts", "message"),
    [
        ("1.1", [], "the request has no Host header (HTTP/1.1 needs one)"),
        ("1.1", [b"t", b"u"], "the request has more than one Host header"),
        ("1.0", [b"t", b"t"], "the request has more than one Host header"),
    ],
)
def test_a_request_without_its_one_host_is_refused(
    served: Served, version: str, hosts: list[bytes], message: str
) -> None:
    sock = served.connect()
    sock.sendall(_one_event(served, version, hosts))
    got, headers, body = _response(_read_all(sock))
    assert (got, headers["connection"]) == (400, "close")
    assert json.loads(body) == {"error": "bad_request", "message": message, "field": "Host"}
    assert served.accepted() == 0
    # HTTP/1.0 without Host is served, as ever.
    sock = served.connect()
    sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert _response(_read_all(sock))[0] == 200


@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_a_request_line_of_another_http_version_is_505(served: Served, version: str) -> None:
    """httptools reads HTTP/2.0 and HTTP/0.9 request lines as versions; they were served as
    HTTP/1.1. (1.2, 3.0 and the like its parser refuses itself: 400.)"""
    sock = served.connect()
    sock.sendall(_one_event(served, version, [b"t"]))
    got, headers, body = _response(_read_all(sock))
    assert (got, headers["connection"]) == (505, "close")
    assert json.loads(body) == {
        "error": "http_version_not_supported",
        "message": f"HTTP/{version} is not served here: send HTTP/1.1 (or HTTP/1.0)",
        "field": "HTTP-version",
    }
    assert served.accepted() == 0
    ok = served.connect()
    ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert _response(_read_all(ok))[0] == 200


def test_what_the_http_layer_answers_itself_is_counted_in_metrics(served: Served) -> None:
    """Those requests never reach the app (no route, no request series): a series of their
    own, by status and error code."""
    for raw in (
        b"GET /healthz HTTP/2.0\r\nHost: t\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * (MAX_HEADER_BYTES + 10),
        b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
        b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n",  # 401
    ):
        sock = served.connect()
        sock.sendall(raw)
        _read_all(sock)
    text = httpx.get(served.url + "/metrics", timeout=10).text
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("watchllm_http_refused_total{")
    }
    assert counted == {
        'watchllm_http_refused_total{reason="http_version_not_supported",status="505"}': 1.0,
        'watchllm_http_refused_total{reason="headers_too_large",status="431"}': 1.0,
        'watchllm_http_refused_total{reason="bad_request",status="400"}': 1.0,
    }, text  # the last request's 401 is the app's: a request series counts it


def test_a_path_with_a_slash_too_many_is_404_not_a_redirect_to_the_host_sent(
    served: Served,
) -> None:
    r = httpx.post(
        served.url + "/v1/projects/acme/events/",
        content=ONE,
        headers={
            "Authorization": f"Bearer {served.key}",
            "Content-Type": "application/json",
            "Host": "evil.example",
        },
        timeout=10,
    )
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json() == {
        "error": "not_found",
        "message": "no route POST /v1/projects/acme/events/ on this server: did you mean"
        " /v1/projects/acme/events, without the trailing slash?",
    }
    assert httpx.get(served.url + "/healthz/", timeout=10).status_code == 404
    # A path that is no route without its slash either gets the general answer.
    lost = httpx.get(served.url + "/v1/nope/", timeout=10).json()["message"]
    assert lost.startswith("no route GET /v1/nope/ on this server (docs/API.md"), lost
    assert served.accepted() == 0


def test_a_method_the_route_does_not_take_is_405_naming_the_ones_it_does(
    served: Served,
) -> None:
    auth = {"Authorization": f"Bearer {served.key}"}
    r = httpx.get(served.url + "/v1/projects/acme/events", headers=auth, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {
        "error": "method_not_allowed",
        "message": "GET is not allowed on /v1/projects/acme/events; it takes POST",
    }
    r = httpx.delete(served.url + "/v1/analytics/stats", headers=auth, timeout=10)
    assert r.status_code == 405, r.text
    assert r.json()["message"].startswith("DELETE is not allowed on /v1/analytics/stats; it takes")


# --- the access log ---------------------------------------------------------------------------


@pytest.mark.parametrize("access_log", ["quiet-ingest", "all"])
def test_the_access_log_leaves_out_accepted_ingest_requests(
    tmp_path: Path, access_log: str
) -> None:
    s = Served(tmp_path, log_level="info", access_log=access_log)
    s.start()
    lines = Records()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(lines)  # uvicorn's own handler stays: the lines are what it writes
    try:
        auth = {"Authorization": f"Bearer {s.key}"}
        with httpx.Client(base_url=s.url, timeout=30) as client:
            one = client.post("/v1/projects/acme/events", headers=auth, json=prompt_call("a1"))
            batch = client.post(
                "/v1/events/batch", headers=auth, json={"events": [prompt_call("a2")]}
            )
            refused = client.post("/v1/events/batch", json={"events": [prompt_call("a3")]})
            invalid = client.post(
                "/v1/events/batch?x=1",
                headers=auth,
                json={"events": [prompt_call("a4", tokens_input=-1)]},
            )
            health = client.get("/healthz")
        assert (one.status_code, batch.status_code) == (202, 202)
        # A query parameter, which an ingest route refuses: the line shows it with the path.
        assert (refused.status_code, invalid.status_code, health.status_code) == (401, 400, 200)
    finally:
        access.removeHandler(lines)
        s.stop()
    logged = [r.getMessage().split(" - ", 1)[1] for r in lines.records]
    refusals = [
        '"POST /v1/events/batch HTTP/1.1" 401',
        '"POST /v1/events/batch?x=1 HTTP/1.1" 400',
        '"GET /healthz HTTP/1.1" 200',
    ]
    accepted = [
        '"POST /v1/projects/acme/events HTTP/1.1" 202',
        '"POST /v1/events/batch HTTP/1.1" 202',
    ]
    assert logged == (refusals if access_log == "quiet-ingest" else accepted + refusals)


def test_the_access_log_can_be_turned_off(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, log_level="info", access_log="off")
    assert uvicorn_options(settings)["access_log"] is False  # uvicorn logs no request then


@pytest.mark.parametrize(
    ("path", "ingest"),
    [
        ("/v1/projects/acme/events", True),
        ("/v1/projects/acme/events?debug=1", True),
        ("/v1/events/batch", True),
        ("/v1/traces", True),
        ("/api/public/otel/v1/traces", True),
        ("/v1/projects/acme/other/events", False),
        ("/v1/projects//events", True),  # a 404: only 2xx answers are left out
        ("/v1/analytics/cost", False),
        ("/v1/events/batch/", False),
    ],
)
def test_ingest_paths_are_the_ingest_routes(path: str, ingest: bool) -> None:
    from watchllm_ext.serving.protocol import is_ingest_path

    assert is_ingest_path(path) is ingest


def test_a_client_that_closes_with_requests_pipelined_leaves_no_error_in_the_log(
    served: Served, records: Records
) -> None:
    """Two hundred single events in one send, then the connection closed: the answers
    still owed go nowhere, quietly (each was two ERROR tracebacks: a write to uvloop's
    closed transport)."""
    pipeline = b"".join(_one_event_request(served.key, f"gone-{n}") for n in range(200))
    for _ in range(5):
        sock = served.connect()
        sock.sendall(pipeline)
        time.sleep(0.2)
        sock.close()
    time.sleep(1.0)
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors][:3]
    assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200


def test_a_client_that_half_closes_after_its_requests_gets_their_answers(served: Served) -> None:
    """`nc -N` and some proxies end their side once the request is sent: the answers still
    come (they were stored, and the client never heard so), then the connection closes.
    A request cut short before its half-close is not answered (it cannot complete)."""
    sock = served.connect()
    sock.sendall(
        _one_event_request(served.key, "half-1") + _one_event_request(served.key, "half-2")
    )
    sock.shutdown(socket.SHUT_WR)
    out = _read_all(sock)
    assert out.count(b"HTTP/1.1 202") == 2, out[:600]
    assert b'"half-1"' in out and b'"half-2"' in out
    cut = served.connect()
    whole = _one_event_request(served.key, "half-cut")
    cut.sendall(whole[:-10])
    cut.shutdown(socket.SHUT_WR)
    assert _read_all(cut) == b""
    _wait_for(lambda: served.accepted() == 2)
