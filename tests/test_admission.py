"""Pushback under overload (ingest/admission.py), over real HTTP: request bodies past the memory
budget and requests that wait too long for a place are answered 503 with Retry-After at
once, and what was accepted is kept."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import Running, prompt_call

from watchllm_ext.hookspecs import hookimpl

KIB = 1024


def _batch(prefix: str, n: int, prompt_chars: int) -> bytes:
    events = [prompt_call(f"{prefix}{i}", prompt="x" * prompt_chars) for i in range(n)]
    return json.dumps({"events": events}).encode()


def _head(server: Running, body: bytes, path: str = "/v1/events/batch") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {server.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from the socket: status, headers (lower-case), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before an answer: {data!r}"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    size = int(headers.get("content-length", "0"))
    while len(rest) < size:
        piece = sock.recv(65536)
        assert piece
        rest += piece
    return int(lines[0].split()[1]), headers, rest[:size]


def test_bodies_past_the_memory_budget_get_503_at_once(server_factory: Any) -> None:
    server = server_factory(
        max_body_bytes=256 * KIB,
        max_decompressed_bytes=256 * KIB,
        max_body_memory_bytes=900 * KIB,  # four of the bodies below, not five
        max_body_memory_per_project_bytes=900 * KIB,  # all of it: one project sends them
    )
    bodies = [_batch(f"h{n}-", 20, 10_000) for n in range(4)]  # ~200 KB each
    assert all(200 * KIB < len(b) < 256 * KIB for b in bodies)
    held = []
    try:
        # Four requests send all of their bodies but 1 KB: the server holds the rest.
        for body in bodies:
            sock = socket.create_connection(("127.0.0.1", server.thread.port), timeout=30)
            sock.sendall(_head(server, body) + body[:-KIB])
            held.append(sock)
        time.sleep(1.0)  # (read by the server as it comes)
        fifth = _batch("f-", 20, 10_000)
        sock = socket.create_connection(("127.0.0.1", server.thread.port), timeout=30)
        with sock:
            sock.sendall(_head(server, fifth) + fifth)
            started = time.monotonic()
            status, headers, answer = _read_answer(sock)
            assert status == 503, answer
            assert time.monotonic() - started < 5
            assert headers["retry-after"] == "1"
            problem = json.loads(answer)
            assert problem["error"] == "overloaded" and problem["field"] == "body"
            assert "max_body_memory_bytes" in problem["message"]
        # The held ones finish and are accepted; their charge is given back.
        for sock, body in zip(held, bodies, strict=True):
            sock.sendall(body[-KIB:])
            status, _, answer = _read_answer(sock)
            assert status == 202, answer
    finally:
        for sock in held:
            sock.close()
    again = server.client.post(
        "/v1/events/batch",
        content=fifth,
        headers={**server.headers(), "Content-Type": "application/json"},
    )
    assert again.status_code == 202, again.text
    server.flush()
    stored = server.query("SELECT count() AS n FROM events FINAL")[0]["n"]
    assert stored == 5 * 20


class _Gate:
    """A transform that holds the first big batch's worker thread (its place) until let go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    @hookimpl
    def transform_events(self, events: list[Any], principal: Any) -> None:
        if any(e.event_id.startswith("slow-") for e in events):
            self.entered.set()
            assert self.go.wait(30)


def test_a_request_that_waits_too_long_for_a_place_gets_503(server_factory: Any) -> None:
    gate = _Gate()
    server = server_factory(plugin_objects=(gate,), ingest_threads=1, ingest_queue_timeout_s=0.5)
    headers = {**server.headers(), "Content-Type": "application/json"}
    big = 100  # events of ~1 KB: a body over 64 KiB, worked on in a place of its own
    answers: dict[str, httpx.Response] = {}

    def send(name: str, body: bytes) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answers[name] = client.post("/v1/events/batch", content=body, headers=headers)

    slow = threading.Thread(target=send, args=("slow", _batch("slow-", big, 1_000)))
    slow.start()
    assert gate.entered.wait(30)
    started = time.monotonic()
    send("waiting", _batch("wait-", big, 1_000))
    waited = time.monotonic() - started
    refused = answers["waiting"]
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"] == "overloaded"
    assert "ingest_queue_timeout_s" in refused.json()["message"]
    assert 0.4 < waited < 5
    gate.go.set()
    slow.join(30)
    assert answers["slow"].status_code == 202, answers["slow"].text
    # Once the place is free, the refused batch goes in as its client sends it again.
    send("again", _batch("wait-", big, 1_000))
    assert answers["again"].status_code == 202, answers["again"].text
    server.flush()
    assert server.query("SELECT count() AS n FROM events FINAL")[0]["n"] == 2 * big


def test_the_rest_of_a_refused_body_is_dropped_and_the_connection_goes_on(
    server_factory: Any,
) -> None:
    """413 before the body is read: the answer comes at once, the rest of the body is read and
    dropped (closing with it unread would reset the connection before the client read the
    answer), and the next request on the connection gets its own answer, nothing else."""
    server = server_factory(max_body_bytes=64 * KIB)
    body = _batch("big-", 100, 1_000)
    assert len(body) > 64 * KIB
    small = _batch("ok-", 1, 10)
    with socket.create_connection(("127.0.0.1", server.thread.port), timeout=30) as sock:
        sock.sendall(_head(server, body) + body[: 32 * KIB])
        status, _, answer = _read_answer(sock)
        assert status == 413, answer
        sock.sendall(body[32 * KIB :] + _head(server, small) + small)
        status, _, answer = _read_answer(sock)
        assert status == 202, answer
    # Streamed past the limit (no Content-Length to refuse up front): the same.
    with socket.create_connection(("127.0.0.1", server.thread.port), timeout=30) as sock:
        head = _head(server, body).replace(
            f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked"
        )
        chunk = body[: 80 * KIB]
        sock.sendall(head + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, _, answer = _read_answer(sock)
        assert status == 413, answer
        rest = body[80 * KIB :]
        sock.sendall(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n")
        again = _batch("ok2-", 1, 10)
        sock.sendall(_head(server, again) + again)
        status, _, answer = _read_answer(sock)
        assert status == 202, answer


def test_the_waits_of_one_request_share_its_budget() -> None:
    """Within one_wait_budget (an OTLP request: a worker's place, then the server's to decode
    and to validate), the waits together last about the timeout, not the timeout each; a
    free place is still taken once the budget is spent; outside it each wait has its own."""
    import anyio

    from watchllm_ext.ingest.admission import MIN_WAIT_S, acquire_within, one_wait_budget

    async def main() -> None:
        held = anyio.CapacityLimiter(1)
        free = anyio.CapacityLimiter(1)
        held.acquire_on_behalf_of_nowait(object())  # taken for good: every wait runs out
        started = anyio.current_time()
        with one_wait_budget(0.3):
            assert not await acquire_within(held.acquire, 2.0)
            first = anyio.current_time() - started
            assert not await acquire_within(held.acquire, 2.0)
            assert await acquire_within(free.acquire, 2.0)  # spent, yet a free place is taken
            free.release()
        together = anyio.current_time() - started
        assert 0.25 < first < 0.6
        assert together < 0.3 + MIN_WAIT_S + 0.3
        started = anyio.current_time()
        assert not await acquire_within(held.acquire, 0.2)
        assert not await acquire_within(held.acquire, 0.2)
        assert anyio.current_time() - started > 0.35  # no budget: 0.2 s each

    anyio.run(main)


def _gzip_head(key: str, length: int, path: str = "/v1/events/batch") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_one_project_cannot_hold_the_whole_body_budget(server_factory: Any) -> None:
    """A tenant's gzip bodies that inflate, then trickle (never complete, within the time
    limits) once held the whole budget: every other project's requests were 503 for as long
    as it liked. Now a project holds at most its share; the others go on."""
    server = server_factory(
        max_body_bytes=256 * KIB,
        max_decompressed_bytes=256 * KIB,
        max_body_memory_bytes=1024 * KIB,  # the default share: a quarter, 256 KiB
    )
    other = server.keys.create("other", scope="admin")
    inflating = json.dumps({"events": [prompt_call("x", prompt="x" * 240_000)]}).encode()
    packed = gzip.compress(inflating)[:-8]  # all but the trailer: the stream stays open
    held = []
    try:
        # acme's first body inflates to ~240 KB of its 256 KiB share, and stays open.
        sock = socket.create_connection(("127.0.0.1", server.thread.port), timeout=30)
        sock.sendall(_gzip_head(server.key, len(packed) + 100) + packed)
        held.append(sock)
        time.sleep(1.0)
        # acme's second: past its share, 503 naming the per-project setting, at once.
        sock = socket.create_connection(("127.0.0.1", server.thread.port), timeout=30)
        held.append(sock)
        sock.sendall(_gzip_head(server.key, len(packed) + 100) + packed)
        status, headers, answer = _read_answer(sock)
        assert status == 503, answer
        assert headers["retry-after"] == "1"
        message = json.loads(answer)["message"]
        assert "project acme's requests hold" in message, message
        assert "max_body_memory_per_project_bytes" in message
        # Another project's requests are taken meanwhile.
        for n in range(3):
            taken = server.client.post(
                "/v1/events/batch",
                content=_batch(f"other-{n}-", 1, 150_000),
                headers={**server.headers(other), "Content-Type": "application/json"},
            )
            assert taken.status_code == 202, taken.text
    finally:
        for sock in held:
            sock.close()


def test_bytes_after_the_end_of_a_gzip_stream_are_refused_when_they_come(
    server: Running,
) -> None:
    """The stream's end, then one byte: 400 at once, not after the rest of a declared length
    trickles in (which held the inflated body, and its charge, up to body_timeout_s)."""
    packed = gzip.compress(json.dumps({"events": [prompt_call("t1")]}).encode())
    with socket.create_connection(("127.0.0.1", server.thread.port), timeout=30) as sock:
        sock.sendall(_gzip_head(server.key, len(packed) + 100) + packed + b"x")
        started = time.monotonic()
        status, _, answer = _read_answer(sock)
        assert time.monotonic() - started < 5
    assert status == 400, answer
    assert json.loads(answer)["message"] == "there are bytes after the end of the gzip stream"


def test_the_budget_counts_each_tenant_and_gives_back_what_it_held() -> None:
    from watchllm_ext.errors import Problem
    from watchllm_ext.ingest.admission import BodyBudget, Charge

    budget = BodyBudget(1000, share=400)
    signin, acme, beta = Charge(budget), Charge(budget), Charge(budget)
    acme.for_tenant("acme")
    beta.for_tenant("beta")
    signin.take(400)  # requests without a key: one share together
    with pytest.raises(Problem, match="requests without a key hold 400 bytes"):
        Charge(budget).take(1)
    acme.take(300)
    with pytest.raises(Problem, match="project acme's requests hold 300 bytes"):
        acme.take(101)
    beta.take(300)
    with pytest.raises(Problem, match="max_body_memory_bytes"):
        beta.take(1)  # 1,000 held in all
    assert budget.by_tenant == {"": 400, "acme": 300, "beta": 300}
    for charge in (signin, acme, beta):
        charge.release()
        charge.release()  # twice: nothing more
    assert budget.held == 0 and budget.by_tenant == {}
    with pytest.raises(RuntimeError):
        signin.take(1)
        signin.for_tenant("acme")  # read before the key was known: stays where it was charged
