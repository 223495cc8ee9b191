"""USD spend for budgets: the cost WatchLLM computed for stored events, read from the store.

A project's month is read as the analytics read a range (analytics/queries.py): the hourly
rollup for whole hours it has computed, raw deduplicated events for the rest, so the read
stays small however long the month has run. A user's day is read from the events. Answers are
cached per project (and user) for `quota_budget_refresh_s`: a stale value is served while a
fresh one is read in the background, so a budget check costs a dict lookup, not a query
(and a budget is exact to within that delay plus the writer's flush interval).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from ..analytics import queries as Q
from ..store.base import Store
from .plans import month_start, next_month

log = logging.getLogger("watchllm.quotas")

# Spend rows kept (projects, and users of projects with a per-user budget): least recently
# used past this are dropped and read again when next asked for.
MAX_CACHED = 10_000

MONTH_SPEND = f"""
SELECT sum(cost_nanousd) AS nanousd
FROM ({Q._COMBINED.format(bucket_rollup="0", bucket_raw="0")})
"""

USER_DAY_SPEND = f"""
SELECT sum({Q.COST_NANOS}) AS nanousd
FROM events FINAL
WHERE project_id = {{project:String}} AND user_id = {{user:String}}
  AND timestamp >= {{from:DateTime64(3, 'UTC')}} AND timestamp < {{to:DateTime64(3, 'UTC')}}
"""


def month_spend_usd(store: Store, project: str, now: datetime | None = None) -> float:
    now = now or datetime.now(UTC)
    start = month_start(now)
    end_hour = now.replace(minute=0, second=0, microsecond=0)
    rows = store.query(
        MONTH_SPEND,
        {
            "project": project,
            "from": start,
            "to": next_month(now),
            "first_hour": start,
            "end_hour": end_hour,
        },
    )
    return int(rows[0]["nanousd"] or 0) / 1e9 if rows else 0.0


def user_day_spend_usd(store: Store, project: str, user: str, now: datetime | None = None) -> float:
    now = now or datetime.now(UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    rows = store.query(
        USER_DAY_SPEND,
        {"project": project, "user": user, "from": start, "to": start + timedelta(days=1)},
    )
    return int(rows[0]["nanousd"] or 0) / 1e9 if rows else 0.0


class SpendCache:
    """Cached spend per key, read with `read` (a blocking function, run on a thread)."""

    def __init__(self, refresh_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh_s = refresh_s
        self._clock = clock
        self._values: OrderedDict[tuple[str, ...], tuple[float, float]] = OrderedDict()
        self._reading: dict[tuple[str, ...], asyncio.Task[float]] = {}

    async def get(self, key: tuple[str, ...], read: Callable[[], float]) -> float:
        held = self._values.get(key)
        if held is not None:
            self._values.move_to_end(key)
            value, at = held
            if self._clock() - at >= self.refresh_s and key not in self._reading:
                task = asyncio.ensure_future(self._read(key, read))
                self._reading[key] = task
                task.add_done_callback(_log_failure)
            return value
        # First ask: wait for the read (shared with any other request asking meanwhile).
        task = self._reading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._read(key, read))
            self._reading[key] = task
        return await asyncio.shield(task)

    async def _read(self, key: tuple[str, ...], read: Callable[[], float]) -> float:
        try:
            value = await anyio.to_thread.run_sync(read)
            self._values[key] = (value, self._clock())
            self._values.move_to_end(key)
            while len(self._values) > MAX_CACHED:
                self._values.popitem(last=False)
            return value
        finally:
            self._reading.pop(key, None)

    def forget(self) -> None:
        self._values.clear()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning(
            "reading spend for a budget failed (the last value is kept): %s", task.exception()
        )
