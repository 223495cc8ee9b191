"""The built-in, opt-in per-user daily USD budget: a `check_quota` plugin for host requests.

A host request whose user has spent `budget_usd` or more today (UTC) on prompt calls is
denied before its handler runs (429, Retry-After: the seconds to the next UTC midnight).
Spend is what WatchLLM knows from stored cost: the sum of `cost_estimate_usd` (the client's,
or the one computed from the model's price) of the user's prompt calls stored today.

It is read through the store for all the project's users at once (one grouped query, so
its cost does not grow with the number of users making requests), and that read is reused
for `cache_s`; after that it is read again in the background while decisions go on with the
old value, up to twice `cache_s` old; a request that finds it older than that (after a
quiet spell) waits for a new read, as a project's first request of the day does. So the
spend a decision sees is behind by at most: the outbox interval (recorded events), the
writer's flush_interval_s (to the store), twice `cache_s`; requests in that window can go
over the budget by what they cost.

Reading the whole day every `cache_s` costs the store more the busier the day: about 100 ms
of chDB CPU at 300,000 calls (FINAL, which collapses an event's copies, is most of it),
every 2 s, on the cores the host's requests need. So the day is split at a cut `recent_s`
(5 minutes) before the last whole-day read: the part before it (settled: calls are stored
within seconds of their timestamp) is read once every `settled_read_s` (60 s), and only the
part after it every `cache_s` (about 4 ms). A call stored more than `recent_s` after its
timestamp (a client that buffered it, a store that was down) is counted at the next
whole-day read, within `settled_read_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio

from ..analytics.queries import COST_NANOS
from ..hookspecs import hookimpl
from ..quota import QuotaDecision

log = logging.getLogger("watchllm.middleware")

if TYPE_CHECKING:
    from ..app import WatchLLM
    from ..auth import Principal

# Each user's spend since `since`, split at `cut` (before it: settled; from it: recent).
# FINAL: a copy of an event delivered twice counts once (the tables' ReplacingMergeTree).
SPEND_SINCE = f"""
SELECT user_id,
  sumIf({COST_NANOS}, timestamp < {{cut:DateTime64(3, 'UTC')}}) AS settled,
  sumIf({COST_NANOS}, timestamp >= {{cut:DateTime64(3, 'UTC')}}) AS recent
FROM events FINAL
WHERE project_id = {{project:String}} AND timestamp >= {{since:DateTime64(3, 'UTC')}}
  AND event_type = 'prompt_call' AND user_id IS NOT NULL
GROUP BY user_id
"""


def _start_of_day(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


class UserDailyBudget:
    """`check_quota` for the host middleware's calls (n_events = 0 with a user); ingestion's
    own calls (n_events >= 1) and requests without a user are none of its business."""

    def __init__(
        self,
        wl: WatchLLM,
        budget_usd: float,
        cache_s: float = 2.0,
        recent_s: float = 300.0,
        settled_read_s: float = 60.0,
    ) -> None:
        if budget_usd < 0:
            raise ValueError("budget_usd must be 0 or more")
        self.wl = wl
        self.budget_usd = budget_usd
        self.cache_s = cache_s
        self.recent_s = recent_s
        self.settled_read_s = settled_read_s
        # project -> (each user's settled spend in nanodollars, the cut it ends at, the
        # monotonic time of that whole-day read); touched only by the project's one read
        self._settled: dict[str, tuple[dict[str, int], datetime, float]] = {}
        # project -> (each user's spend in USD, monotonic time read, and the bounds of the
        # day it is for as epoch seconds: a float comparison per request, no datetime)
        self._cache: dict[str, tuple[dict[str, float], float, float, float]] = {}
        self._pending: dict[str, asyncio.Future[dict[str, float]]] = {}
        self._refreshing: set[asyncio.Task[dict[str, float]]] = set()
        self.queries = 0  # store reads made, for the tests and the docs' staleness figures

    @hookimpl
    def check_quota(
        self, principal: Principal, n_events: int, user_id: str | None
    ) -> QuotaDecision | Awaitable[QuotaDecision] | None:
        if n_events or user_id is None:
            return None
        project = principal.project_id
        cached = self._cache.get(project)
        if cached is not None:
            spends, read_at, day_start, day_end = cached
            age = time.monotonic() - read_at
            # Older than twice cache_s (a quiet spell: no request renewed it), it is not
            # used: the request waits for a new read, as the day's first one does.
            if day_start <= time.time() < day_end and age < 2 * self.cache_s:
                if age >= self.cache_s and project not in self._pending:
                    # Stale: decide on it now and read again in the background, so under
                    # steady traffic no request waits for the store.
                    task = asyncio.get_running_loop().create_task(
                        self.spend_today(project, datetime.now(UTC))
                    )
                    self._refreshing.add(task)
                    task.add_done_callback(self._refreshed)
                spend = spends.get(user_id, 0.0)
                if spend < self.budget_usd:
                    # Under the budget: no opinion (the host only acts on a denial), so the
                    # common case builds no decision and reads no clock as a datetime.
                    return None
                return self.decide(spend, datetime.now(UTC))
        return self._read_then_decide(project, user_id, datetime.now(UTC))

    def _refreshed(self, task: asyncio.Task[dict[str, float]]) -> None:
        self._refreshing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("reading the users' spend failed: %s", task.exception())

    async def _read_then_decide(self, project: str, user_id: str, now: datetime) -> QuotaDecision:
        spends = await self.spend_today(project, now)
        return self.decide(spends.get(user_id, 0.0), now)

    async def spend_today(self, project: str, now: datetime) -> dict[str, float]:
        """Each user's stored spend today; concurrent callers share one store read."""
        pending = self._pending.get(project)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()
        self._pending[project] = future
        try:
            day = _start_of_day(now)
            spends = await anyio.to_thread.run_sync(self._read, project, day, now)
            start = day.timestamp()
            self._cache[project] = (spends, time.monotonic(), start, start + 86_400)
            future.set_result(spends)
            return spends
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._pending[project]

    def _read(self, project: str, day: datetime, now: datetime) -> dict[str, float]:
        store = self.wl.store
        if store is None:
            raise RuntimeError("the WatchLLM store is not open")
        self.queries += 1
        settled = self._settled.get(project)
        if settled is not None and (
            settled[1] < day or time.monotonic() - settled[2] >= self.settled_read_s
        ):
            settled = None  # yesterday's (its cut is before today's start), or due again
        if settled is None:
            # The whole day, split at a new cut (not before the day's start).
            cut = max(day, now - timedelta(seconds=self.recent_s))
            read_at = time.monotonic()
            rows = store.query(SPEND_SINCE, {"project": project, "since": day, "cut": cut})
            before = {row["user_id"]: int(row["settled"] or 0) for row in rows}
            self._settled[project] = (before, cut, read_at)
        else:
            before, cut, _ = settled
            rows = store.query(SPEND_SINCE, {"project": project, "since": cut, "cut": cut})
        spends = {user: nanos / 1e9 for user, nanos in before.items()}
        for row in rows:
            user = row["user_id"]
            spends[user] = (before.get(user, 0) + int(row["recent"] or 0)) / 1e9
        return spends

    def decide(self, spend: float, now: datetime) -> QuotaDecision:
        reset = (_start_of_day(now) + timedelta(days=1) - now).total_seconds()
        # The rate-limit headers count US cents (they are integers).
        limit = round(self.budget_usd * 100)
        remaining = max(0, int((self.budget_usd - spend) * 100))
        if spend < self.budget_usd:
            return QuotaDecision(True, limit=limit, remaining=remaining, reset_s=reset)
        return QuotaDecision(
            False,
            retry_after_s=reset,
            limit=limit,
            remaining=0,
            reset_s=reset,
            # The IETF RateLimit fields too: a daily window, quota in cents.
            policy=f'"user-daily-usd";q={limit};w=86400',
            ratelimit=f'"user-daily-usd";r=0;t={max(1, round(reset))}',
            reason=f"this user has spent ${spend:.4f} today (UTC), their daily budget is "
            f"${self.budget_usd:.2f}; it starts again at midnight UTC",
        )
