"""Places for CPU work, shared fairly between projects.

Big request bodies are validated and encoded on worker threads, `ingest_threads` at a time.
Handed out first come first served, one project sending a stream of big (or big and invalid:
their detailed answer costs ~10x) batches on several connections made every other project's
big batch wait behind all of it: a 78 KB batch went from 6-24 ms to 0.2-2.5 s behind three
connections of 5 MB invalid batches. Here a place freed while others wait goes to the project
next in turn (round robin over the projects waiting, first come first served within one), so
each waiting project gets the next place after at most one request of every other project.
"""

from __future__ import annotations

from collections import deque

import anyio


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False  # the place was handed to this waiter (it must give it back)


class FairSlots:
    """`places` places; `acquire(key)` waits for one, `release()` gives it back (to the next
    key in turn when some wait). For use on one event loop; not thread-safe."""

    def __init__(self, places: int) -> None:
        self._free = places
        # Waiters by key, keys in turn order: the first key is served next, then goes last.
        self._waiting: dict[str, deque[_Waiter]] = {}

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    async def acquire(self, key: str) -> None:
        if self._free > 0:
            self._free -= 1  # (a free place means no one waits: release hands places over)
            return
        waiter = _Waiter()
        self._waiting.setdefault(key, deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            # Cancelled (the client left, a deadline): a place already handed over goes on to
            # the next in turn; else the waiter leaves its queue.
            if waiter.granted:
                self.release()
            else:
                queue = self._waiting.get(key)
                if queue is not None:
                    queue.remove(waiter)
                    if not queue:
                        del self._waiting[key]
            raise

    def release(self) -> None:
        if not self._waiting:
            self._free += 1
            return
        key = next(iter(self._waiting))
        queue = self._waiting.pop(key)
        waiter = queue.popleft()
        if queue:
            self._waiting[key] = queue  # its next request waits for every other key's turn
        waiter.granted = True
        waiter.event.set()
