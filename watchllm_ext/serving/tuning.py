"""Process-wide tuning. `tune_for_serving` is what `watchllm serve` applies (a host app that
mounts WatchLLM keeps its own collector thresholds, switch interval and thread priorities:
those are its choices, not a library's). `freeze_startup_heap` is what every app does once
started (the setting gc_freeze_at_start), hosted or not: it costs the host nothing but the
collection of cycles among objects that existed before."""

from __future__ import annotations

import gc
import os
import sys
import threading

# The nice value of the threads Python did not start (the embedded store's), once
# tune_for_serving set it; 0: threads are left as they are (a host app, or the setting 0).
_native_threads_nice = 0


def tune_for_serving(native_threads_nice: int = 0) -> None:
    # What exists after start-up lives as long as the process: take it out of the collector's
    # scans, and collect young objects less often (measured: +40% events/s, p99 halved).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    # The sinks build rows in a worker thread; with the default 5 ms switch interval every
    # request that waits for the GIL behind it waits up to 5 ms per wake-up (a convoy).
    sys.setswitchinterval(0.0005)
    # The embedded store's threads yield the CPU to requests (the setting store_threads_nice).
    global _native_threads_nice
    _native_threads_nice = native_threads_nice
    lower_native_threads()


def lower_native_threads() -> int:
    """Run every thread of this process that Python did not start at the nice value
    tune_for_serving set (a lower CPU priority); returns how many were changed.

    Why: chDB parses, builds the views' rows and merges in its own pools of threads, several
    at once; when every core is busy they take CPU time from the event loop and the request
    threads. At a higher nice value they still take every core that requests leave idle, and
    the GIL holds Python to about one core, so on two cores or more the store keeps about
    one core while requests come in (never starved; what it cannot take waits in the spool,
    whose cap answers 503). Analytics queries run in the same threads and yield to ingestion
    alike. Off by default (store_threads_nice = 0): on a shared 2-core machine it showed no
    clear gain, the request path being held more by the GIL than by the CPU.

    chDB starts threads as it needs them, so the store sink calls this before each insert
    (a look at /proc/self/task: about 0.1 ms). Linux only; elsewhere nothing is changed."""
    nice = _native_threads_nice
    if nice <= 0:
        return 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0  # not Linux: no per-thread priorities to set
    python = {thread.native_id for thread in threading.enumerate()}
    changed = 0
    for name in tids:
        tid = int(name)
        if tid in python:
            continue
        try:
            # A thread chDB raised itself (its memory watcher runs at -20) keeps its priority.
            if 0 <= os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except OSError:
            continue  # the thread has ended since the listing
    return changed


def freeze_startup_heap() -> None:
    """Collect once, then take every object alive now out of the collector's scans.

    Measured with single events: a full collection walked ~100,000 start-up objects
    (modules, pydantic's schemas, the app) for 60-70 ms of CPU, 100-150 ms on a loaded
    machine, with the event loop stopped: the single-event p99. Frozen, a full collection
    scans only what was made since. Objects made later are collected as always."""
    gc.collect()
    gc.freeze()
