"""Process-wide tuning that `watchllm serve` applies (a host app that mounts WatchLLM keeps
its own settings: these are its choices, not a library's)."""

from __future__ import annotations

import gc
import sys


def tune_for_serving() -> None:
    # What exists after start-up lives as long as the process: take it out of the collector's
    # scans, and collect young objects less often (measured: +40% events/s, p99 halved).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    # The sinks build rows in a worker thread; with the default 5 ms switch interval every
    # request that waits for the GIL behind it waits up to 5 ms per wake-up (a convoy).
    sys.setswitchinterval(0.0005)
