"""The analytics API's store queries: their own threads, a share per project, a time limit.

Why: a query waits in a worker thread while the store reads (chDB runs one read at a time),
and anyio's default threads are the ones ingestion (big bodies), the writer (batches, the
store sink), /readyz and the dashboard's sign-in use too. Forty slow text searches of one
project took all forty: every other project's reads, big ingest bodies and the writer then
waited tens of seconds behind them, and /readyz reported the instance down. Here:

- queries run on `analytics_threads` threads of their own, handed out in turn between the
  projects waiting (slots.FairSlots): a project's query waits behind at most one query of
  each other project, however many one of them has queued; a query waits for a thread at
  most `analytics_queue_timeout_s`, then 503 with Retry-After;
- a project has at most `analytics_queries_per_project` queries running or waiting; one
  more is 429 with Retry-After (a flood is refused, not queued);
- a query runs at most `analytics_query_timeout_s` in the store (ClickHouse's
  max_execution_time), then 503 naming the limit.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio

from ..errors import Problem
from ..slots import FairSlots
from ..store.base import StoreError

T = TypeVar("T")

# The limits and the project of the analytics request being served: routes._context sets
# it, so that each of the request's queries counts against its project's share.
SERVING: ContextVar[tuple[StoreReads, str] | None] = ContextVar(
    "watchllm_analytics_serving", default=None
)
_TIMEOUT_CODE = "(TIMEOUT_EXCEEDED)"  # ClickHouse's error 159, in chDB's and the server's text
RETRY_AFTER_S = 2


class StoreReads:
    """Runs the analytics API's store queries within the limits of the settings."""

    def __init__(
        self, threads: int, per_project: int, queue_timeout_s: float, query_timeout_s: float
    ) -> None:
        self.threads = threads
        self.per_project = per_project
        self.queue_timeout_s = queue_timeout_s
        self.query_timeout_s = query_timeout_s
        self._waiting: dict[str, int] = {}  # project -> its queries running or waiting
        # Per event loop (tests run several): the places, by project in turn, and the
        # threads' limiter (the places admit no more than it has).
        self._limiters: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[FairSlots, anyio.CapacityLimiter]
        ] = weakref.WeakKeyDictionary()

    async def query(
        self, project: str, store: Any, sql: str, args: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """`store.query(sql, args)` within the limits; Problems for the refusals. (The
        analytics queries have no SETTINGS clause of their own: the limit is appended.)"""
        limited = f"{sql}\nSETTINGS max_execution_time = {self.query_timeout_s:g}"
        try:
            rows: list[dict[str, Any]] = await self.run(project, store.query, limited, args)
        except StoreError as exc:
            if _TIMEOUT_CODE in str(exc):
                raise Problem(
                    503,
                    "query_timeout",
                    f"the query ran longer than analytics_query_timeout_s"
                    f" ({self.query_timeout_s:g} s): narrow its time range or filters",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from None
            raise
        return rows

    async def run(self, project: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on one of the analytics threads, counted against `project`'s share."""
        waiting = self._waiting.get(project, 0)
        if waiting >= self.per_project:
            raise Problem(
                429,
                "too_many_queries",
                f"this project has {waiting} analytics queries running or waiting, the most"
                " it may (analytics_queries_per_project); retry when one has answered",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._waiting[project] = waiting + 1
        try:
            places, threads = self._limiters_here()
            try:
                with anyio.fail_after(self.queue_timeout_s):
                    await places.acquire(project)
            except TimeoutError:
                raise Problem(
                    503,
                    "store_busy",
                    f"no analytics thread was free within {self.queue_timeout_s:g} s"
                    " (analytics_queue_timeout_s): other queries run",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from None
            try:
                return await anyio.to_thread.run_sync(fn, *args, limiter=threads)
            finally:
                places.release()
        finally:
            left = self._waiting[project] - 1
            if left:
                self._waiting[project] = left
            else:
                del self._waiting[project]

    def _limiters_here(self) -> tuple[FairSlots, anyio.CapacityLimiter]:
        loop = asyncio.get_running_loop()
        found = self._limiters.get(loop)
        if found is None:
            found = FairSlots(self.threads), anyio.CapacityLimiter(self.threads)
            self._limiters[loop] = found
        return found
