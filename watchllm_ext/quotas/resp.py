"""A lean, pipelined Redis connection for the quota check: the one Redis call per request on
the ingest path.

Why not redis-py there: its asyncio client spends about 100 µs of Python per command on
loopback on top of the round trip (a pool behind a lock, a retry wrapper, observability hooks,
StreamReader reads), and its p99 is several times that on a busy event loop; the quota check
must add under 0.5 ms p99 (docs/BENCHMARKS.md, bench/bench_quota.py). Here the RESP2 protocol
is spoken over one asyncio.Protocol connection per event loop: the commands of concurrent
requests are pipelined on it, Redis answers them in order, and each reply goes to the request
at the head of the queue. No pool, no lock, no task per call. The protocol itself is not
ours: commands are packed by redis-py's packer and replies read by hiredis, Redis's own C
parser (the one redis-py uses when it is installed).

A request that stops waiting (its timeout) keeps its place in the queue: its reply is still
read when it comes and handed to the request's `on_late`, so the caller learns whether Redis
ran the command (and can take back what it counted meanwhile). A connection lost with
requests in flight hands them LOST: whether Redis ran them cannot be known.

Everything else (usage show/set, plans, billing ids, the CLI) goes through redis-py: rare
calls. URLs are read by redis-py's parse_url; `rediss://` (TLS) stays with redis-py
(`supports`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.connection import Connection

log = logging.getLogger("watchllm.quotas")

Arg = bytes | str | int | float


# What parse_url gives that this client uses; anything else is a redis-py option.
_OURS = {"host", "port", "db", "username", "password", "path", "connection_class"}


class ReplyError(Exception):
    """An error reply from Redis (`-ERR ...`, `-NOSCRIPT ...`)."""


class ConnectionLost(ConnectionError):
    """The connection closed before this request's reply came."""


class _Lost:
    """What `on_late` gets for a request whose connection closed before its reply."""

    def __repr__(self) -> str:
        return "LOST"


LOST = _Lost()


# Commands are packed by redis-py's own packer (RESP arrays of bulk strings), replies read by
# hiredis (Redis's C parser, redis-py's optional one): only the pipelining here is ours.
_PACKER = Connection()


def encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP."""
    return b"".join(_PACKER.pack_command(*args))


INCOMPLETE = False  # what `Replies.next` answers while a reply is not whole yet


class Replies:
    """The replies of one connection, read as bytes arrive (TCP gives no message boundaries).
    Bulk strings are bytes, nil is None, an error reply is a ReplyError (returned, not
    raised); a byte stream that is not RESP raises hiredis.ProtocolError."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=ReplyError)

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def next(self) -> Any:
        """The next whole reply, or INCOMPLETE."""
        return self._reader.gets()


class Request:
    """One command in flight: its future, and what to do with a reply nobody waits for."""

    __slots__ = ("future", "on_late", "sent_at")

    def __init__(self, future: asyncio.Future[Any], sent_at: float) -> None:
        self.future = future
        self.sent_at = sent_at
        self.on_late: Callable[[Any], None] | None = None

    def late(self, value: Any) -> None:
        if self.on_late is not None:
            try:
                self.on_late(value)
            except Exception:  # a callback's bug must not break the connection's reads
                log.exception("handling a late Redis reply failed")


class RespProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Request] = deque()
        self.replies = Replies()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        replies = self.replies
        queue = self.queue
        try:
            replies.feed(data)
            while queue:
                value = replies.next()
                if value is INCOMPLETE:
                    break
                request = queue.popleft()
                future = request.future
                if future.done():  # given up (timeout) or cancelled: late
                    request.late(value)
                else:
                    future.set_result(value)
        except hiredis.ProtocolError as exc:
            self.abort(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._fail(exc or ConnectionLost("Redis closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        queue, self.queue = self.queue, deque()
        for request in queue:
            if request.future.done():
                request.late(LOST)
            else:
                error = ConnectionLost(f"the connection to Redis closed: {exc}")
                request.future.set_exception(error)

    def abort(self, exc: BaseException) -> None:
        """Close now, failing every request in flight (a stuck or garbled connection)."""
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def send(self, payload: bytes) -> Request:
        """Write one command; its reply resolves the request's future. ConnectionLost when the
        connection is closing (uvloop raises RuntimeError on a closed transport's write)."""
        transport = self.transport
        if self.lost is not None or transport is None or transport.is_closing():
            raise ConnectionLost(f"the connection to Redis is closed: {self.lost}")
        request = Request(self.loop.create_future(), self.loop.time())
        try:
            transport.write(payload)
        except RuntimeError as exc:
            raise ConnectionLost(f"the connection to Redis is closed: {exc}") from exc
        self.queue.append(request)
        return request

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RespClient:
    """One pipelined connection to the Redis at `url`, made in the running event loop on first
    use and made again after it is lost. `scripts` are loaded at each connect, so EVALSHA
    finds them (a Redis restarted empty, too)."""

    def __init__(self, url: str, connect_timeout_s: float, stale_s: float) -> None:
        params: dict[str, Any] = dict(parse_url(url))
        self.path: str | None = params.get("path")
        self.host: str = params.get("host") or "localhost"
        self.port = int(params.get("port") or 6379)
        self.db = int(params.get("db") or 0)
        self.username: str | None = params.get("username")
        self.password: str | None = params.get("password")
        self.connect_timeout_s = connect_timeout_s
        # A reply this late means the connection is stuck (a hung Redis): drop it and its queue.
        self.stale_s = stale_s
        self.scripts: dict[str, tuple[str, bytes]] = {}  # name -> (sha1, script)
        self._conn: RespProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[RespProtocol] | None = None

    @staticmethod
    def supports(url: str) -> bool:
        """redis:// and unix:// URLs with no options of redis-py's in the query (they are
        redis-py's to honour); TLS (rediss://) stays with redis-py too."""
        params = parse_url(url)
        cls = params.get("connection_class")
        return (cls is None or cls is UnixDomainSocketConnection) and set(params) <= _OURS

    def add_script(self, name: str, text: str) -> None:
        self.scripts[name] = (hashlib.sha1(text.encode()).hexdigest(), text.encode())

    def ready(self) -> RespProtocol | None:
        """The open connection of this event loop, or None (connect first)."""
        conn = self._conn
        if (
            conn is None
            or conn.lost is not None
            or conn.transport is None
            or conn.transport.is_closing()
            or self._loop is not asyncio.get_running_loop()
        ):
            return None
        queue = conn.queue
        if queue and conn.loop.time() - queue[0].sent_at > self.stale_s:
            conn.abort(TimeoutError(f"no reply from Redis in {self.stale_s:g} s"))
            return None
        return conn

    async def connect(self) -> RespProtocol:
        """The open connection, connecting (once, shared by every caller) when there is none.
        A caller that stops waiting does not stop the connect: the next one gets it."""
        conn = self.ready()
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        task = self._connecting
        if task is None or task.get_loop() is not loop:
            task = self._connecting = loop.create_task(self._open(loop))
            task.add_done_callback(self._connected)
        return await asyncio.shield(task)

    def _connected(self, task: asyncio.Task[RespProtocol]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._conn, self._loop = task.result(), task.get_loop()

    async def _open(self, loop: asyncio.AbstractEventLoop) -> RespProtocol:
        async with asyncio.timeout(self.connect_timeout_s):
            if self.path:
                transport, conn = await loop.create_unix_connection(
                    lambda: RespProtocol(loop), self.path
                )
            else:
                transport, conn = await loop.create_connection(
                    lambda: RespProtocol(loop), self.host, self.port
                )
            # uvloop may call connection_made only after create_connection has returned.
            conn.transport = transport  # type: ignore[assignment]
            sent: list[Request] = []
            try:
                # Pipelined: one round trip for the handshake and the scripts.
                if self.password is not None:
                    who = [self.username] if self.username else []
                    sent.append(conn.send(encode(["AUTH", *who, self.password])))
                if self.db:
                    sent.append(conn.send(encode(["SELECT", self.db])))
                for _, text in self.scripts.values():
                    sent.append(conn.send(encode(["SCRIPT", "LOAD", text])))
                for request in sent:
                    reply = await request.future
                    if isinstance(reply, ReplyError):
                        raise reply
            except BaseException:
                for request in sent:  # nobody will read what they would fail with
                    request.future.cancel()
                conn.close()
                raise
        return conn

    def evalsha(
        self, conn: RespProtocol, name: str, keys: Sequence[str], args: Sequence[Arg]
    ) -> Request:
        sha, _ = self.scripts[name]
        return conn.send(encode(["EVALSHA", sha, len(keys), *keys, *args]))

    def eval(
        self, conn: RespProtocol, name: str, keys: Sequence[str], args: Sequence[Arg]
    ) -> Request:
        """EVAL with the script's text (after a SCRIPT FLUSH: EVALSHA answers NOSCRIPT)."""
        _, text = self.scripts[name]
        return conn.send(encode(["EVAL", text, len(keys), *keys, *args]))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
