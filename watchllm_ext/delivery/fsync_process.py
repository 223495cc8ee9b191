"""The group commit's fsyncs in a small helper process (fsync_child.py is its program).

Why a process and not a worker thread: a Python thread has to take the GIL before it can
start an fsync, and the event loop holds the GIL while it serves requests. Under 32
connections of single events the worker thread waited a median 1.3 ms (p99 4.6 ms) for it
before a 0.25 ms fsync could begin, while every request of the round waited too. The helper
takes no GIL of ours: it gets the spool's descriptors over a Unix socket (SCM_RIGHTS) and
starts the fsync about 50 µs after it is asked (docs/PERFORMANCE.md).

The spool asks for one round at a time; the helper answers each message before it reads the
next, so a reply always belongs to the request in flight.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from .fsync_child import LOST, MAX_FDS_PER_MESSAGE, REPLY

CHILD = Path(__file__).with_name("fsync_child.py")


class HelperGone(Exception):
    """The helper process has exited, or its socket no longer works."""


class FsyncFailed(OSError):
    """An fsync in the helper failed: `index` is its descriptor's place in the request (those
    before it are on disk; it and those after it are not)."""

    def __init__(self, index: int, errno: int) -> None:
        super().__init__(errno, os.strerror(errno))
        self.index = index


def supported() -> bool:
    """Can this platform pass descriptors to another process (Unix sockets, SCM_RIGHTS), and
    is sys.executable a Python that can run the helper's program (not a frozen app's binary,
    which would take the program's path for its own arguments)?"""
    return (
        hasattr(socket, "send_fds")
        and hasattr(socket, "AF_UNIX")
        and bool(sys.executable)
        and not getattr(sys, "frozen", False)
    )


class FsyncProcess:
    """A running helper: `fsync(fds)` from the event loop, `close()` when done."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self._sock = sock

    @classmethod
    def start(cls) -> FsyncProcess:
        """Start the helper (blocking: a few milliseconds; run it off the event loop)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # -I -S: no environment, no site-packages: the program needs the stdlib only.
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(CHILD), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(process, ours)

    async def fsync(self, fds: Sequence[int]) -> None:
        """fsync `fds` in this order, in the helper. Raises FsyncFailed for the first that
        failed, HelperGone if the helper cannot answer. Not cancelled part-way (a reply left
        unread would be taken for the next request's): a cancel waits for the fsync, as one
        on a worker thread does."""
        with anyio.CancelScope(shield=True):
            for first in range(0, len(fds), MAX_FDS_PER_MESSAGE):
                chunk = fds[first : first + MAX_FDS_PER_MESSAGE]
                try:
                    socket.send_fds(self._sock, [bytes([len(chunk)])], chunk)
                    index, errno = REPLY.unpack(await self._reply())
                except OSError as exc:
                    raise HelperGone(f"its socket failed: {exc}") from None
                if index == LOST:
                    raise HelperGone("it did not receive every descriptor sent")
                if index >= 0:
                    raise FsyncFailed(first + index, errno)

    async def _reply(self) -> bytes:
        got = b""
        while len(got) < REPLY.size:
            await anyio.wait_readable(self._sock)
            try:
                data = self._sock.recv(REPLY.size - len(got))
            except BlockingIOError:
                continue
            if not data:
                raise HelperGone(f"it has exited (code {self.process.poll()})")
            got += data
        return got

    def close(self, timeout_s: float = 5.0) -> None:
        """Close its socket (it exits once its fsync in flight, if any, is done) and reap it,
        killed if it has not exited within `timeout_s`. Blocking: off the event loop. One
        stuck in a hung fsync may outlive even SIGKILL for a while: it is left to exit then
        (reaped by whoever adopts it) rather than wait for without end."""
        self._sock.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
