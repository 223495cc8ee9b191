"""Slow and idle clients are cut off, and big batches never starve the event loop: real
sockets against the server `watchllm serve` runs (uvicorn with serving.uvicorn_options) on
loopback."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import free_port, make_settings, prompt_call

from watchllm_ext.app import create_app
from watchllm_ext.hookspecs import hookimpl
from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
from watchllm_ext.keys import KeyStore
from watchllm_ext.serving.protocol import uvicorn_options

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
BODY_IDLE_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.0


class Served:
    def __init__(self, tmp_path: Path, plugins: tuple[Any, ...] = ()) -> None:
        self.settings = make_settings(
            tmp_path,
            port=free_port(),
            header_timeout_s=HEADER_TIMEOUT_S,
            body_timeout_s=BODY_TIMEOUT_S,
            body_idle_timeout_s=BODY_IDLE_TIMEOUT_S,
            keep_alive_timeout_s=KEEP_ALIVE_S,
            log_level="warning",
        )
        self.key = KeyStore(self.settings.keys_path).create("acme", scope="admin")
        self.app = create_app(self.settings, plugins=plugins)
        self.server = uvicorn.Server(uvicorn.Config(self.app, **uvicorn_options(self.settings)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.sockets: list[socket.socket] = []

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.settings.port), timeout=10)
        self.sockets.append(sock)  # closed at the end of the test
        return sock

    def head(self, path: str, length: int) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        ).encode()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(Served(tmp_path))


def _serve(s: Served) -> Iterator[Served]:
    s.thread.start()
    deadline = time.monotonic() + 30
    while not s.server.started:
        assert s.thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield s
    for sock in s.sockets:
        sock.close()
    s.server.should_exit = True
    s.thread.join(timeout=60)


def _closed_after(sock: socket.socket, dribble: bytes = b"", every_s: float = 0.2) -> float:
    """Send `dribble` one byte at a time every `every_s` (then wait) until the server closes
    the connection; the seconds that took. Anything the server sent first is ignored."""
    start = time.monotonic()
    sock.setblocking(False)
    sent = 0
    while time.monotonic() - start < 30:
        if sent < len(dribble):
            try:
                sock.send(dribble[sent : sent + 1])
                sent += 1
            except OSError:
                return time.monotonic() - start  # reset by the server
        time.sleep(every_s)
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            return time.monotonic() - start
        if data == b"":
            return time.monotonic() - start
    raise AssertionError("the server kept the connection open for 30 s")


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response, read until the server closes the connection."""
    sock.settimeout(15)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_dribbled_headers_are_cut_off_and_healthz_keeps_answering(served: Served) -> None:
    slow = [served.connect() for _ in range(20)]
    for sock in slow:
        sock.sendall(b"POST /v1/events/batch HTTP/1.1\r\nHost: t\r\n")
    with ThreadPoolExecutor(len(slow)) as pool:
        waits = pool.map(lambda s: _closed_after(s, b"X-Slow: " + b"a" * 200), slow)
        with httpx.Client(base_url=served.url, timeout=5) as client:
            for _ in range(5):  # while they dribble
                t0 = time.monotonic()
                assert client.get("/healthz").status_code == 200
                assert time.monotonic() - t0 < 0.5
                time.sleep(0.1)
        for waited in waits:
            # Closed at the header deadline (plus one poll), long before the 40 s dribble ends.
            assert HEADER_TIMEOUT_S - 0.1 < waited < HEADER_TIMEOUT_S + 1.5, waited


def test_a_connection_that_sends_nothing_is_closed(served: Served) -> None:
    waited = _closed_after(served.connect())
    assert waited < HEADER_TIMEOUT_S + 1.5, waited


def test_idle_keep_alive_is_closed_and_a_slow_second_request_too(served: Served) -> None:
    sock = served.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b" 200 " in sock.recv(65536).split(b"\r\n", 1)[0]
    assert _closed_after(sock) < KEEP_ALIVE_S + 1.5  # idle after its answer

    sock = served.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b" 200 " in sock.recv(65536).split(b"\r\n", 1)[0]
    # The next request starts in time, then dribbles its headers: cut at the header deadline.
    waited = _closed_after(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaa")
    assert waited < HEADER_TIMEOUT_S + 1.5, waited


def _body(n: int, prefix: str = "e") -> bytes:
    events = [prompt_call(f"{prefix}{i}", prompt="p" * 150) for i in range(n)]
    return json.dumps({"events": events}).encode()


def test_a_later_request_gets_its_whole_header_deadline(served: Served) -> None:
    # The connection's timer, set at its start, fires while the second request's headers
    # dribble: it must wait on to that request's own deadline, not cut it short.
    sock = served.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b" 200 " in sock.recv(65536).split(b"\r\n", 1)[0]
    time.sleep(0.6 * HEADER_TIMEOUT_S)  # within the keep-alive time
    waited = _closed_after(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaa")
    assert HEADER_TIMEOUT_S - 0.1 < waited < HEADER_TIMEOUT_S + 1.5, waited


def test_a_dribbled_body_gets_408_naming_body(served: Served) -> None:
    body = _body(1)
    sock = served.connect()
    sock.sendall(served.head("/v1/events/batch", len(body)))
    start = time.monotonic()
    # One byte every 0.3 s: never idle for BODY_IDLE_TIMEOUT_S, but far too slow in total.
    sender = threading.Thread(target=_dribble, args=(sock, body, 0.3), daemon=True)
    sender.start()
    status, headers, answer = _read_response(sock)
    waited = time.monotonic() - start
    assert status == 408
    assert headers.get("connection") == "close"
    problem = json.loads(answer)
    assert problem["error"] == "request_timeout" and problem["field"] == "body"
    assert BODY_TIMEOUT_S - 0.1 < waited < BODY_TIMEOUT_S + 1.5, waited


def test_a_body_that_stops_gets_408_after_the_idle_limit(served: Served) -> None:
    body = _body(3)
    sock = served.connect()
    sock.sendall(served.head("/v1/projects/acme/events", len(body)) + body[: len(body) // 2])
    start = time.monotonic()
    status, _, answer = _read_response(sock)
    assert status == 408 and json.loads(answer)["field"] == "body"
    assert time.monotonic() - start < BODY_IDLE_TIMEOUT_S + 1.0
    with httpx.Client(base_url=served.url, timeout=10) as client:  # nothing of it was kept
        assert client.get("/healthz").status_code == 200
        assert served.app.state.watchllm.counters["accepted"] == 0


def _dribble(sock: socket.socket, data: bytes, every_s: float) -> None:
    for i in range(len(data)):
        try:
            sock.send(data[i : i + 1])
        except OSError:
            return  # the server closed it: what the test waits for
        time.sleep(every_s)


# --- big batches ------------------------------------------------------------------------------


def test_a_big_batch_answers_as_a_small_one(served: Served) -> None:
    """The off-loop path (sliced validation, per-event answers, encoding) gives the answer the
    inline path gives: the same rejection for the same bad event, the rest accepted."""
    events: list[dict[str, Any]] = [prompt_call(f"b{i}", prompt="p" * 150) for i in range(600)]
    events[417] = prompt_call("bad", tokens_input="many")
    body = json.dumps({"events": events}).encode()
    assert len(body) > OFFLOAD_MIN_BYTES
    with httpx.Client(base_url=served.url, timeout=60) as client:
        auth = {"Authorization": f"Bearer {served.key}"}
        big = client.post("/v1/events/batch", content=body, headers=auth)
        small = client.post("/v1/events/batch", json={"events": [events[417]]}, headers=auth)
        valid = client.post("/v1/events/batch", content=_body(600, "v"), headers=auth)
    assert big.status_code == 207, big.text
    assert small.status_code == 422
    rejected = big.json()["rejected"]
    assert [r["index"] for r in rejected] == [417]
    assert rejected[0]["errors"] == small.json()["rejected"][0]["errors"]
    assert big.json()["event_ids"] == [e["event_id"] for e in events if e["event_id"] != "bad"]
    assert valid.status_code == 202 and valid.json()["accepted"] == 600
    wl = served.app.state.watchllm
    deadline = time.monotonic() + 30
    while wl.writer.lag_events():  # everything accepted reaches the store, once
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rows = wl.store.query("SELECT count() AS n FROM events WHERE project_id = 'acme'")
    assert rows[0]["n"] == 1199


def test_a_big_gzip_batch_inflates_in_steps_and_is_accepted(served: Served) -> None:
    events = [prompt_call(f"z{i}", prompt="p" * 1_500) for i in range(2_000)]
    raw = json.dumps({"events": events}).encode()
    assert len(raw) > 3 * 1024 * 1024  # several inflate steps, from one small wire body
    with httpx.Client(base_url=served.url, timeout=60) as client:
        answer = client.post(
            "/v1/events/batch",
            content=gzip.compress(raw),
            headers={"Authorization": f"Bearer {served.key}", "Content-Encoding": "gzip"},
        )
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 2_000


def test_big_batches_do_not_starve_healthz(served: Served) -> None:
    """10,000-event batches, four at a time: /healthz keeps answering in a few milliseconds.
    Each sender posts its batch again and again (the same ids: the same work, stored once)
    until /healthz has been asked 30 times meanwhile, however fast the batches go (four
    single batches were over before ten answers once the server got faster)."""
    wanted = 30
    bodies = [_body(10_000, f"s{k}-") for k in range(4)]
    auth = {"Authorization": f"Bearer {served.key}"}
    took: list[float] = []
    statuses: list[int] = []
    waits: list[float] = []

    def post(body: bytes) -> None:
        with httpx.Client(base_url=served.url, timeout=120) as client:
            for _ in range(50):
                if len(waits) >= wanted:
                    return
                t0 = time.monotonic()
                statuses.append(
                    client.post("/v1/events/batch", content=body, headers=auth).status_code
                )
                took.append(time.monotonic() - t0)

    with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=served.url, timeout=30) as client:
        client.get("/healthz")
        senders = [pool.submit(post, body) for body in bodies]
        time.sleep(0.05)
        while not all(sender.done() for sender in senders):
            t0 = time.monotonic()
            assert client.get("/healthz").status_code == 200
            waits.append(time.monotonic() - t0)
            time.sleep(0.01)
        for sender in senders:
            sender.result()
    assert statuses and set(statuses) == {202}, statuses
    waits.sort()
    # The client runs in this process and takes the GIL too, and the test process keeps the
    # default collector settings, so single waits can be long: the bulk of them is what shows
    # starvation (with validation on the loop, each wait lasted a whole batch: 0.3-1 s).
    assert len(waits) >= wanted, (waits, took)
    assert waits[len(waits) // 2] < 0.1, (waits, took)
    assert waits[len(waits) * 9 // 10] < 0.25, (waits, took)


class SlowRule:
    """A plugin rule that takes its time on a worker thread (a big body's validation runs
    there): the request is in work, the event loop free, for about 2 s."""

    @hookimpl
    def validate_event(self, event: Any, principal: Any) -> None:
        time.sleep(2.0 / 100)


def test_a_request_in_work_is_not_cut_off_by_the_header_deadline(tmp_path: Path) -> None:
    """The header deadline armed at a connection's start is met by its first request, even
    one whose head and body came in a single read: a later request on that connection that
    takes longer than header_timeout_s to handle still gets its answer."""
    for s in _serve(Served(tmp_path, plugins=(SlowRule(),))):
        sock = s.connect()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # one read, whole
        assert b" 200 " in sock.recv(65536)
        time.sleep(HEADER_TIMEOUT_S / 4)
        events = [prompt_call(f"slow-{i}", prompt="p" * 700) for i in range(100)]
        plain = json.dumps({"events": events}).encode()
        assert len(plain) >= OFFLOAD_MIN_BYTES  # validated on a worker thread
        body = gzip.compress(plain)  # small: head and body come in one read
        head = s.head("/v1/events/batch", len(body)).replace(
            b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n"
        )
        started = time.monotonic()
        sock.sendall(head + body)
        sock.settimeout(30)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"closed with no answer after {time.monotonic() - started:.1f} s"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 202 "), answer[:200]
        assert time.monotonic() - started > HEADER_TIMEOUT_S  # it did outlast the deadline


def _bad_key_head(s: Served, length: int) -> bytes:
    return s.head("/v1/events/batch", length).replace(s.key.encode(), b"wllm_not_a_key")


def test_the_rest_of_a_body_answered_early_may_come_while_it_keeps_coming(
    served: Served,
) -> None:
    """A request answered before its body was read (here a 401: the key is checked first)
    while the client goes on sending it: a client that keeps sending (a big body over a slow
    link) is not cut off at the header deadline, and the next request on the connection is
    served; one that stalls is cut off after the body's idle limit, one that drips the rest
    for ever at its whole limit."""
    piece = b" " * 1000
    sock = served.connect()
    sock.sendall(_bad_key_head(served, 8 * len(piece)))
    started = time.monotonic()
    for _ in range(8):  # 1.6 s: past HEADER_TIMEOUT_S, within BODY_TIMEOUT_S
        time.sleep(0.2)
        sock.sendall(piece)
    assert time.monotonic() - started > HEADER_TIMEOUT_S
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    answers = b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        answers += chunk
    assert answers.startswith(b"HTTP/1.1 401 "), answers[:200]
    assert answers.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 200 " in answers, answers[-300:]

    stalled = served.connect()
    stalled.sendall(_bad_key_head(served, 10 * len(piece)) + piece)
    time.sleep(0.1)
    stalled.sendall(piece)  # the rest's first piece (the deadline's start), then nothing
    took = _closed_after(stalled)
    assert BODY_IDLE_TIMEOUT_S * 0.8 < took < BODY_IDLE_TIMEOUT_S + 1.5, took

    dripping = served.connect()
    dripping.sendall(_bad_key_head(served, 1_000_000) + piece)
    took = _closed_after(dripping, b"x" * 100, every_s=0.2)  # never idle 1 s, never done
    assert BODY_TIMEOUT_S * 0.8 < took < BODY_TIMEOUT_S + 1.5, took
