"""body.read_body's time limits, kept by one timer per event loop for every body being read
(body._BodyDeadlines): each read gets its own 408 at its own deadline, a cancel from
elsewhere stays a cancel, and nothing is left behind. The server-level answers (a dribbled
body, a body that stops) are in test_slow_clients.py."""

from __future__ import annotations

import asyncio
import gc
import gzip
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
import uvloop

from watchllm_ext.errors import Problem
from watchllm_ext.ingest import body

EARLY = 0.002
Receive = Callable[[], Awaitable[Mapping[str, Any]]]


def _pieces(pieces: list[bytes], every_s: float) -> Receive:
    """An ASGI receive that gives `pieces`, one each `every_s`, then waits for ever."""
    queue = list(pieces)

    async def receive() -> Mapping[str, Any]:
        if not queue:
            await asyncio.Event().wait()
        await asyncio.sleep(every_s)
        chunk = queue.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    return receive


async def _read(receive: Receive, timeout_s: float, idle_timeout_s: float) -> bytes:
    return await body.read_body(
        receive,
        content_length=None,
        content_encoding=None,
        max_bytes=1 << 20,
        max_decompressed_bytes=1 << 20,
        timeout_s=timeout_s,
        idle_timeout_s=idle_timeout_s,
    )


async def _timed(read: Awaitable[bytes]) -> tuple[bytes | Problem, float]:
    started = time.monotonic()
    try:
        result: bytes | Problem = await read
    except Problem as exc:
        result = exc
    return result, time.monotonic() - started


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine on a new loop of each kind the server may use."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(main: Awaitable[Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(main)  # type: ignore[arg-type]

    return runner


def test_reads_on_one_loop_each_time_out_at_their_own_deadline(run: Any) -> None:
    async def main() -> list[tuple[bytes | Problem, float]]:
        return await asyncio.gather(
            # Stops after one piece: 408 once idle for 0.6 s.
            _timed(_read(_stops_after(b"a"), 30, 0.6)),
            # Steady pieces every 0.1 s, never idle 0.5 s: complete after ~0.6 s.
            _timed(_read(_pieces([b"x"] * 6, 0.1), 30, 0.5)),
            # Never idle, but over its whole-body limit of 0.6 s.
            _timed(_read(_pieces([b"y"] * 30, 0.05), 0.6, 10)),
            # A later read with a shorter limit than the timer is armed for (0.5 s: the
            # steady read's first idle deadline): its own 408 comes at 0.15 s.
            _timed(_later(_read(_stops_after(b"z"), 30, 0.1), 0.05)),
        )

    (stopped, t_stopped), (steady, t_steady), (slow, t_slow), (short, t_short) = run(main())
    assert isinstance(stopped, Problem) and stopped.status == 408, stopped
    # A timer may fire up to a millisecond early (uvloop counts in milliseconds); the upper
    # bounds leave room for a loaded machine.
    assert 0.6 - EARLY <= t_stopped < 0.6 + 0.4, t_stopped
    assert steady == b"xxxxxx" and 0.55 < t_steady < 1.5, (steady, t_steady)
    assert isinstance(slow, Problem) and slow.status == 408
    assert 0.6 - EARLY <= t_slow < 0.6 + 0.4, t_slow
    assert isinstance(short, Problem) and short.status == 408
    assert 0.15 - EARLY <= t_short < 0.15 + 0.25, t_short  # 0.05 before it began, 0.1 idle
    assert stopped.code == "request_timeout" and stopped.field == "body"


def _stops_after(first: bytes) -> Receive:
    sent = False

    async def receive() -> Mapping[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": first, "more_body": True}

    return receive


async def _later(read: Awaitable[bytes], after_s: float) -> bytes:
    await asyncio.sleep(after_s)
    return await read


def test_a_cancel_from_elsewhere_stays_a_cancel(run: Any) -> None:
    async def main() -> None:
        task = asyncio.create_task(_read(_stops_after(b"a"), 30, 10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A read that is due while someone else cancels its task before it runs again: the
        # cancel wins (as with asyncio.timeout), it is no 408.
        inner = asyncio.create_task(_read(_stops_after(b"b"), 30, 10))
        await asyncio.sleep(0.01)  # it waits for its second piece
        loop = asyncio.get_running_loop()
        watch = body._body_deadlines(loop)
        (read,) = watch.reads
        read.deadline = loop.time()  # due now: the watch's timer cancels it...
        watch._check(watch.generation)
        inner.cancel()  # ...and so does someone else
        with pytest.raises(asyncio.CancelledError):
            await inner
        assert watch.reads == set()

    run(main())


def test_a_body_that_is_there_is_read_whole_and_leaves_nothing_registered(run: Any) -> None:
    async def main() -> None:
        async def whole() -> Mapping[str, Any]:
            return {"type": "http.request", "body": b'{"a":1}', "more_body": False}

        for _ in range(1_000):
            assert await _read(whole, 30, 10) == b'{"a":1}'
        late = asyncio.create_task(_read(_stops_after(b"a"), 30, 0.05))
        with pytest.raises(Problem):
            await late
        watch = body._body_deadlines(asyncio.get_running_loop())
        assert watch.reads == set()

    run(main())


def test_a_closed_loop_is_not_kept_alive_by_its_watch(run: Any) -> None:
    async def main() -> None:
        async def whole() -> Mapping[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        await _read(whole, 30, 10)  # arms the loop's timer for 10 s from now

    before = len(body._body_deadlines_by_loop)
    run(main())
    gc.collect()
    assert len(body._body_deadlines_by_loop) <= before


def _read_all(
    pieces: list[bytes], encoding: str, max_decompressed_bytes: int = 1 << 20
) -> Awaitable[bytes]:
    return body.read_body(
        _pieces(pieces, 0),
        content_length=None,
        content_encoding=encoding,
        max_bytes=1 << 20,
        max_decompressed_bytes=max_decompressed_bytes,
    )


def _outcome(run: Any, read: Awaitable[bytes]) -> bytes | str:
    try:
        return run(read)  # type: ignore[no-any-return]
    except Problem as exc:
        return f"{exc.status} {exc.message}"


def test_a_gzip_body_of_several_members_is_read_whole_wherever_the_reads_cut_it(
    run: Any,
) -> None:
    """RFC 1952: a gzip body is one member or more (`cat a.gz b.gz`, a compressor that
    flushes in members). Each cut of the body into two reads gives the same bytes, also one
    that splits a member's two-byte magic number; an empty member counts too."""
    parts = [b'{"events": [', b"", b'{"a": 1}', b"]}"]
    packed = b"".join(gzip.compress(part) for part in parts)
    for cut in range(len(packed) + 1):
        got = _outcome(run, _read_all([packed[:cut], packed[cut:]], "gzip"))
        assert got == b"".join(parts), cut


@pytest.mark.parametrize(
    ("after", "encoding", "says"),
    [
        (b"x", "gzip", "400 there are bytes after the end of the gzip stream"),
        (b"\x1f", "gzip", "400 body ends before the gzip stream does"),  # a member begun
        (b"\x1f\x8bjunk", "gzip", "400 body is not valid gzip"),
        (b"\x00\x00", "gzip", "400 there are bytes after the end of the gzip stream"),
        (zlib.compress(b"1"), "deflate", "400 there are bytes after the end of the deflate"),
    ],
)
def test_what_follows_a_stream_is_a_member_or_refused(
    run: Any, after: bytes, encoding: str, says: str
) -> None:
    first = gzip.compress(b"[1]") if encoding == "gzip" else zlib.compress(b"[1]")
    for pieces in ([first + after], [first, after]):
        got = _outcome(run, _read_all(pieces, encoding))
        assert isinstance(got, str) and got.startswith(says), (pieces, got)


def test_members_share_the_decompressed_limit(run: Any) -> None:
    member = gzip.compress(b" " * 1000)
    got = _outcome(run, _read_all([member * 5], "gzip", max_decompressed_bytes=4999))
    assert got == "413 decompressed body is larger than the limit of 4999 bytes"
    assert _outcome(run, _read_all([member * 5], "gzip", 5000)) == b" " * 5000


def test_a_body_of_many_tiny_members_lets_the_loop_run(run: Any) -> None:
    """The most members a body may have (empty ones, about 200 KB): read whole, the event
    loop turning meanwhile; one more is refused."""

    async def main() -> tuple[bytes, int]:
        turns = 0
        done = False

        async def count() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count())
        many = gzip.compress(b"") * (body.MAX_GZIP_MEMBERS - 1) + gzip.compress(b"[]")
        got = await _read_all([many], "gzip")
        done = True
        await counter
        return got, turns

    got, turns = run(main())
    assert got == b"[]"
    assert turns >= body.MAX_GZIP_MEMBERS // 64
    one_more = gzip.compress(b"") * body.MAX_GZIP_MEMBERS + gzip.compress(b"[]")
    assert _outcome(run, _read_all([one_more], "gzip")) == (
        f"400 the gzip body has more than {body.MAX_GZIP_MEMBERS} members; compress it as one"
        " stream (or a few)"
    )


def test_a_big_body_is_joined_beside_the_event_loop(run: Any) -> None:
    """The pieces of a body of 4 MiB and more are joined on a thread (bytes.join lets go of
    the GIL): joining 45 MB inflated took ~30 ms with the event loop stopped. Smaller ones
    are joined at once, a thread's hop being dearer than the copy."""
    joined_on: list[str] = []

    def spy(parts: list[bytes]) -> bytes:
        joined_on.append(threading.current_thread().name)
        return b"".join(parts)

    async def main(size: int) -> bytes:
        loop = asyncio.get_running_loop()
        real = loop.run_in_executor

        def run_in_executor(executor: Any, func: Any, *args: Any) -> Any:
            if func == b"".join:
                return real(executor, spy, *args)
            return real(executor, func, *args)

        loop.run_in_executor = run_in_executor  # type: ignore[method-assign]
        return await body.read_body(
            _pieces([gzip.compress(b"x" * size, 1)], 0),
            content_length=None,
            content_encoding="gzip",
            max_bytes=1 << 20,
            max_decompressed_bytes=64 << 20,
        )

    assert run(main(8 << 20)) == b"x" * (8 << 20)
    assert len(joined_on) == 1 and joined_on[0] != "MainThread"
    assert run(main(1 << 20)) == b"x" * (1 << 20)
    assert len(joined_on) == 1  # the small one: at once, on the loop
