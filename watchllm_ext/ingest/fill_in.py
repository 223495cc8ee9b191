"""What the server fills in for an event that leaves it out: its id (a UUIDv7) and the time it
arrived (docs/EVENTS.md, "What the server fills in")."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

_uuid7_lock = threading.Lock()  # ingest runs on the event loop and on worker threads
_uuid7_last = [0, 0]  # [unix ms, 42-bit counter] of the last id
_COUNTER_BITS = 42  # rand_a (12 bits) and the top 30 bits of rand_b: RFC 9562 6.2, method 1
_getrandbits = random.getrandbits  # the module's generator is reseeded after a fork


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) in its canonical text form: 48 bits of Unix milliseconds, then a
    counter that starts at a random value each millisecond and counts up within it, then 32
    random bits. Ids from one process sort by creation time, and those of one millisecond
    by creation order (a clock that steps back keeps the last millisecond)."""
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _uuid7_last
        if ms > last_ms:
            last_ms, counter = ms, _getrandbits(_COUNTER_BITS - 1)  # half the room to count
        else:
            counter += 1
            if counter >> _COUNTER_BITS:  # 2**41 ids in one millisecond: borrow the next
                last_ms, counter = last_ms + 1, _getrandbits(_COUNTER_BITS - 1)
        _uuid7_last[0], _uuid7_last[1] = last_ms, counter
    value = (
        (last_ms << 80)
        | (0x7 << 76)  # version
        | ((counter >> 30) << 64)  # rand_a: the counter's top 12 bits
        | (0b10 << 62)  # variant
        | ((counter & 0x3FFF_FFFF) << 32)
        | _getrandbits(32)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def receipt_time() -> datetime:
    """Now, at the millisecond (what the store keeps): the timestamp given to every event of
    one request that has none."""
    # The epoch plus a timedelta: the same datetime as fromtimestamp().replace(), in half
    # the time (it is made for every request).
    return _EPOCH + timedelta(milliseconds=time.time_ns() // 1_000_000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
