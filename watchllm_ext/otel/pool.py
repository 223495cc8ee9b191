"""The OTLP receiver's worker processes (worker.py): each decodes and maps one body at a time.

One pool per server process, shared by every app in it: the workers keep no state. It grows
to the largest `otel_worker_processes` an app asked for, a worker at a time, in the
background; until a worker is ready (its imports take ~0.3 s) and whenever none is alive, the
receiver does the work itself, as it does with the setting at 0. A worker that dies or breaks
the protocol is let go of, and the body it had is done in-process: a worker's answer is only
ever an input, so nothing accepted is lost. Workers run in their own session (a Ctrl-C to
the server does not stop them under a request) and end when their stdin closes, which is
when the server ends, however it ends.

The calls block (a pipe each way), so they run on worker threads; an event loop bounds how
many at once with `limiter()` (DEPTH a worker, so a thread never waits for a worker while
holding a place that the spool's fsyncs need).
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
from pathlib import Path

import anyio
from anyio.lowlevel import RunVar

from .worker import READY, frame, read_frame

log = logging.getLogger("watchllm.otel")

# After a worker fails to start, wait this long before trying again (no spawn per request).
START_RETRY_S = 30.0
# How long a call waits for a busy worker before doing the work in-process.
WAIT_FOR_WORKER_S = 5.0
# Calls a worker takes at once (one mapped, the next waiting in its pipe).
DEPTH = 2
# A worker that has not answered a call in this long is killed (a body of max_batch_events
# spans takes well under a second): a stopped or stuck worker must not hold the receiver's
# places for ever. Its calls then get EOF, and their bodies are done in the server.
CALL_TIMEOUT_S = 30.0


class _Worker:
    """One worker process. Up to DEPTH calls at once: the next body waits in the pipe while
    the worker maps the one before, so it never idles between bodies; answers come back in
    the order the bodies went."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the folder holding watchllm_ext
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watchllm_ext.otel.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin = self.process.stdin
        self.stdout = self.process.stdout
        self.in_flight = 0  # counted by the pool, under its lock
        self.broken = False
        self._send = threading.Lock()
        self._turn = threading.Condition()
        self._sent = 0  # tickets: the order in which requests went, and answers come
        self._read = 0

    def wait_ready(self) -> None:
        if self.stdout.read(1) != READY:
            raise OSError(f"the worker ended at start (exit code {self.process.wait()})")

    def call(self, request: bytes) -> bytes:
        watchdog = threading.Timer(CALL_TIMEOUT_S, self._kill_stuck)
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._call(request)
        finally:
            watchdog.cancel()

    def _kill_stuck(self) -> None:
        log.warning(
            "an OTLP worker process (pid %d) did not answer in %.0f s; killed",
            self.process.pid,
            CALL_TIMEOUT_S,
        )
        with contextlib.suppress(OSError):
            self.process.kill()

    def _call(self, request: bytes) -> bytes:
        with self._send:
            ticket = self._sent
            self._sent += 1
            self.stdin.write(frame(request))
            self.stdin.flush()
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
            self.broken = True  # mid-frame, or gone: its stream cannot be trusted any more
            raise
        finally:
            with self._turn:
                self._read += 1
                self._turn.notify_all()

    def stop(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            self.stdin.close()  # it ends at the end of its stdin
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            self.stdout.close()


class WorkerPool:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live: list[_Worker] = []
        self._starting = 0
        self._size = 0
        self._next_start = 0.0  # monotonic time before which no start is tried (after a failure)
        self.started_total = 0
        self.lost_total = 0  # workers that died or broke the protocol under a call
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

    def call(self, request: bytes, size: int) -> bytes | None:
        """(Blocking.) Send `request` to a worker; its answer, or None when no worker is alive
        or the one called failed (do the work in-process)."""
        worker = self._acquire(size)
        if worker is None:
            return None
        try:
            answer = worker.call(request)
            self.answered_total += 1
            return answer
        except (OSError, EOFError, ValueError) as exc:
            log.warning("an OTLP worker process failed (%s); its body is done in-process", exc)
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
                if not self._live:
                    return None  # none alive yet (or any more): do it here
                worker = min(self._live, key=lambda w: w.in_flight)
                if worker.in_flight < DEPTH:
                    worker.in_flight += 1
                    return worker
                left = deadline - time.monotonic()
                if left <= 0:
                    return None  # all stuck: do it here
                self._cond.wait(left)

    def _grow(self) -> None:
        """(Holding the lock.) Start workers up to the size, one at a time, in the background."""
        live = len(self._live) + self._starting
        if live >= self._size or self._starting or time.monotonic() < self._next_start:
            return
        self._starting += 1
        threading.Thread(target=self._start, name="watchllm-otel-worker-start", daemon=True).start()

    def _start(self) -> None:
        worker: _Worker | None = None
        try:
            worker = _Worker()
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
                self._starting -= 1
                self._next_start = time.monotonic() + START_RETRY_S
            return
        with self._cond:
            self._starting -= 1
            self.started_total += 1
            self._live.append(worker)
            self._cond.notify_all()
            self._grow()

    def _lose(self, worker: _Worker) -> None:
        worker.stop()
        with self._cond:
            if worker in self._live:
                self._live.remove(worker)
                self.lost_total += 1
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
        self._live, self._starting = [], 0


POOL = WorkerPool()
atexit.register(POOL.stop)
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


async def map_in_worker(request: bytes, size: int) -> bytes | None:
    """A worker's answer to `request` (worker.py's msgpack), or None: do it in-process."""
    return await anyio.to_thread.run_sync(POOL.call, request, size, limiter=limiter(size))
