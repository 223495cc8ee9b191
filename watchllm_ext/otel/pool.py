"""The OTLP receiver's worker processes (worker.py): each decodes and maps one body at a time.

One pool per server process, shared by every app in it: the workers keep no state. It grows
to the largest `otel_worker_processes` an app asked for, a worker at a time, in the
background; until a worker is ready (its imports take ~0.3 s) and whenever none is alive, the
receiver does the work itself, as it does with the setting at 0. A worker that dies, breaks
the protocol or does not answer in CALL_TIMEOUT_S is killed and let go of, and the bodies it
had are done in-process: a worker's answer is only ever an input, so nothing accepted is lost.
Workers run in their own session (a Ctrl-C to the server does not stop them under a request)
and end when their stdin closes, which is when the server ends, however it ends.

The calls block (a pipe each way), so they run on worker threads; an event loop bounds how
many at once with `limiter()` (DEPTH a worker, so a thread never waits for a worker while
holding a place that the spool's fsyncs need), and a request waits at most WAIT_FOR_WORKER_S
for a place before doing its body itself.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio
from anyio.lowlevel import RunVar

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

from ..ingest.admission import acquire_within
from .frames import Parts, read_frame, write_frame
from .worker import READY

log = logging.getLogger("watchllm.otel")

T = TypeVar("T")

# After a worker fails to start, or one dies soon after its start, wait this long before
# starting another (no spawn per request).
START_RETRY_S = 30.0
LIVED_LONG_ENOUGH_S = 10.0
# How long a request waits for a worker's place before doing its body in-process.
WAIT_FOR_WORKER_S = 2.0
# Calls a worker takes at once (one mapped, the next waiting in its pipe).
DEPTH = 2
# A worker that has not answered a call this long after the call was sent is killed (a 512-span
# export takes ~20 ms; OpenTelemetry's exporters give up after 10 s), plus CALL_S_PER_MB for
# each MB of the body (a 50 MB JSON body of 10,000 spans takes ~15 s to decode and map, and
# must not be killed and then done again): a stopped or stuck worker must not hold the
# receiver's places. Its calls then get EOF, and their bodies are done in the server.
CALL_TIMEOUT_S = 8.0
CALL_S_PER_MB = 1.0
# OTLP JSON costs more a MB (json_format is pure Python): the densest JSON body within the
# receiver's bounds on a request's structure (decode.py: empty events and values, one-letter
# keys), 16 MiB, takes 11 s of CPU, which 8 s + 1 s a MB would leave little margin on a busy
# machine. Protobuf's densest, 49 MiB, takes 4 s.
CALL_S_PER_MB_JSON = 2.0
# The most a worker's start (its imports) may take.
START_TIMEOUT_S = 30.0
# How often the watchdog looks at the calls' deadlines.
WATCH_EVERY_S = 0.5
# Each pipe holds a whole 512-span body or its answer (~1 MB): with Linux's 64 KB pipes the
# worker stopped at every 64 KB of an answer until a server thread (which needs the GIL
# between reads) took it. 1 MiB is what an unprivileged process may ask (fs.pipe-max-size).
PIPE_BYTES = 1 << 20
# glibc's malloc in a worker: a body's buffers (the answer's ~1 MB, the decoded messages) come
# from the heap and stay there between bodies, instead of being mapped and unmapped each time
# (every page faulted in again: 71,000 faults and 0.17 s of system time for 102,400 spans,
# 15,000 and 0.09 s with these). The heap keeps up to 64 MB it no longer uses. Set only where
# the environment does not already say.
WORKER_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
    "MALLOC_TOP_PAD_": str(16 << 20),
}


def _widen(fd: int) -> bool:
    """Make the pipe `fd` hold PIPE_BYTES where the system lets it (Linux: not past
    fs.pipe-max-size, nor a user's pipe-user-pages-soft); else it stays as it is. Whether it
    now holds that much."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)  # None off Linux (or without fcntl)
    if setpipe is None:
        return False
    try:
        return fcntl.fcntl(fd, setpipe, PIPE_BYTES) >= PIPE_BYTES
    except OSError:
        return False


class _Worker:
    """One worker process. Up to DEPTH calls at once: the next body waits in the pipe while
    the worker maps the one before, so it never idles between bodies; answers come back in
    the order the bodies went."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the folder holding watchllm_ext
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for name, value in WORKER_MALLOC.items():
            env.setdefault(name, value)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watchllm_ext.otel.worker", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin = self.process.stdin
        self.stdout = self.process.stdout
        self.widened = all([_widen(self.stdin.fileno()), _widen(self.stdout.fileno())])
        self.started = time.monotonic()
        self.in_flight = 0  # counted by the pool, under its lock
        self.broken = False
        # The monotonic time by which the oldest unanswered call (or the start) must be
        # answered; None when nothing is awaited. Read by the pool's watchdog.
        self.deadline: float | None = self.started + START_TIMEOUT_S
        self._deadlines: dict[int, float] = {}
        self._send = threading.Lock()
        self._turn = threading.Condition()
        self._sent = 0  # tickets: the order in which requests went, and answers come
        self._read = 0

    def wait_ready(self) -> None:
        if self.stdout.read(1) != READY:
            raise OSError(f"the worker ended at start (exit code {self.process.wait()})")
        self.deadline = None

    def call(self, request: bytes | Parts, per_mb_s: float | None = None) -> bytes:
        with self._send:
            ticket = self._sent
            self._sent += 1
            with self._turn:
                per_mb = CALL_S_PER_MB if per_mb_s is None else per_mb_s
                size = len(request) if isinstance(request, bytes) else sum(map(len, request))
                allowed = CALL_TIMEOUT_S + per_mb * size / 1e6
                self._deadlines[ticket] = time.monotonic() + allowed
                self.deadline = self._deadlines[min(self._deadlines)]
            try:
                write_frame(self.stdin, request)
                self.stdin.flush()
            except BaseException:
                self._fail()
                raise
        with self._turn:
            while self._read != ticket and not self.broken:
                self._turn.wait()
        try:
            if self.broken:
                raise EOFError("the worker failed under an earlier call")
            answer = read_frame(self.stdout)
            if answer is None:
                raise EOFError("the worker ended")
            return answer
        except BaseException:
            self._fail()  # mid-frame, or gone: its stream cannot be trusted any more
            raise
        finally:
            with self._turn:
                self._read += 1
                self._deadlines.pop(ticket, None)
                self.deadline = self._deadlines[min(self._deadlines)] if self._deadlines else None
                self._turn.notify_all()

    def _fail(self) -> None:
        with self._turn:
            self.broken = True
            self._turn.notify_all()  # calls waiting their turn give up too

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()

    def stop(self) -> None:
        # Killed first: closing stdin would wait for a call still writing into a full pipe.
        self._fail()
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.stdin, self.stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()


class WorkerPool:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live: list[_Worker] = []
        self._starting: list[_Worker | None] = []  # None until the process exists
        self._size = 0
        self._next_start = 0.0  # monotonic time before which no start is tried (after a failure)
        self._watching = False
        self.started_total = 0
        self.lost_total = 0  # workers that died, broke the protocol or timed out
        self.answered_total = 0  # calls a worker answered

    def want(self, size: int) -> None:
        """Have `size` workers (started in the background; calls meanwhile get None)."""
        with self._cond:
            self._size = max(self._size, size)
            self._grow()

    def live(self) -> int:
        """Workers started and not lost."""
        with self._cond:
            return len(self._live)

    def call(
        self,
        request: bytes | Parts,
        size: int,
        decode: Callable[[bytes], T],
        per_mb_s: float | None = None,
    ) -> T | None:
        """(Blocking.) Send `request` to a worker; its answer through `decode`, or None when no
        worker is alive or ready, or the one called failed (do the work in-process). An answer
        `decode` refuses counts as the worker's failure. `per_mb_s`: the seconds a MB of the
        request the worker is given beyond CALL_TIMEOUT_S (CALL_S_PER_MB unless said)."""
        worker = self._acquire(size)
        if worker is None:
            return None
        try:
            answer = decode(worker.call(request, per_mb_s))
            self.answered_total += 1
            return answer
        except Exception as exc:  # OSError, EOFError, a frame or answer that does not decode
            log.warning("a worker process failed (%s); its body is done in-process", exc)
            self._lose(worker)
            return None
        except BaseException:
            self._lose(worker)
            raise
        finally:
            with self._cond:
                worker.in_flight -= 1
                self._cond.notify()

    def _acquire(self, size: int) -> _Worker | None:
        deadline = time.monotonic() + WAIT_FOR_WORKER_S
        with self._cond:
            self._size = max(self._size, size)
            self._grow()
            while True:
                alive = [w for w in self._live if not w.broken]
                if not alive:
                    return None  # none ready yet (or any more): do it here
                worker = min(alive, key=lambda w: w.in_flight)
                if worker.in_flight < DEPTH:
                    worker.in_flight += 1
                    return worker
                left = deadline - time.monotonic()
                if left <= 0:
                    return None  # all busy for too long: do it here
                self._cond.wait(left)

    def _grow(self) -> None:
        """(Holding the lock.) Start workers up to the size, one at a time, in the background."""
        live = len(self._live) + len(self._starting)
        if live >= self._size or self._starting or time.monotonic() < self._next_start:
            return
        self._starting.append(None)
        threading.Thread(target=self._start, name="watchllm-otel-worker-start", daemon=True).start()
        if not self._watching:
            self._watching = True
            threading.Thread(target=self._watch, name="watchllm-otel-watchdog", daemon=True).start()

    def _start(self) -> None:
        worker: _Worker | None = None
        try:
            worker = _Worker()
            with self._cond:
                self._starting[0] = worker  # the watchdog now sees its start deadline
            worker.wait_ready()
        except Exception as exc:
            log.warning(
                "cannot start an OTLP worker process (%s); bodies are decoded in-process,"
                " trying again in %.0f s",
                exc,
                START_RETRY_S,
            )
            if worker is not None:
                worker.stop()
            with self._cond:
                self._starting.clear()
                self._next_start = time.monotonic() + START_RETRY_S
            return
        with self._cond:
            self._starting.clear()
            self.started_total += 1
            self._live.append(worker)
            self._cond.notify_all()
            self._grow()

    def _watch(self) -> None:
        """Kill a worker whose start or oldest call is past its deadline (stopped, stuck)."""
        while True:
            time.sleep(WATCH_EVERY_S)
            now = time.monotonic()
            with self._cond:
                workers = [w for w in [*self._live, *self._starting] if w is not None]
            for worker in workers:
                deadline = worker.deadline
                if deadline is not None and now > deadline and worker.process.poll() is None:
                    log.warning(
                        "an OTLP worker process (pid %d) did not answer in time; killed",
                        worker.process.pid,
                    )
                    worker.kill()  # its calls get EOF: their bodies are done in the server

    def _lose(self, worker: _Worker) -> None:
        worker.stop()
        with self._cond:
            if worker in self._live:
                self._live.remove(worker)
                self.lost_total += 1
                if time.monotonic() - worker.started < LIVED_LONG_ENOUGH_S:
                    # Dying soon after its start (a body that kills it, a broken install): no
                    # respawn per body.
                    self._next_start = time.monotonic() + START_RETRY_S
            self._grow()  # a replacement, in the background
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop the workers (at exit)."""
        with self._cond:
            live, self._live = self._live, []
            self._size = 0
        for worker in live:
            worker.stop()

    def forget(self) -> None:
        """In a forked child: the workers are the parent's, not this process's."""
        self._cond = threading.Condition()
        self._live, self._starting, self._watching = [], [], False


POOL = WorkerPool()
atexit.register(POOL.stop)
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=POOL.forget)

_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("watchllm_otel_worker_limiter")


def limiter(size: int) -> anyio.CapacityLimiter:
    """This event loop's bound on calls at once: DEPTH a worker."""
    try:
        found = _LIMITER.get()
    except LookupError:
        found = anyio.CapacityLimiter(size * DEPTH)
        _LIMITER.set(found)
    found.total_tokens = max(found.total_tokens, size * DEPTH)
    return found


async def map_in_worker(
    request: bytes | Parts,
    size: int,
    decode: Callable[[bytes], T],
    per_mb_s: float | None = None,
) -> T | None:
    """A worker's answer to `request` (worker.py's msgpack) through `decode`, or None: do it
    in-process (no worker ready, or none had a place within WAIT_FOR_WORKER_S, or it failed).
    `per_mb_s`: as WorkerPool.call."""
    places = limiter(size)
    # Within the request's wait budget (admission.one_wait_budget), which the server's own
    # places then share.
    if not await acquire_within(places.acquire, WAIT_FOR_WORKER_S):
        return None
    try:
        return await anyio.to_thread.run_sync(POOL.call, request, size, decode, per_mb_s)
    finally:
        places.release()
